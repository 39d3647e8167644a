"""Checkpoints: atomic saves, latest and best, exact resume after kill -9, preemption signals, safety."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import (
    BEFORE_STEP,
    ROOT,
    TRAIN_LAYER4,
    kill_9,
    logged,
    run_env,
    start_ranks,
    stopped,
    stopping_at,
    tiny_overrides,
    wait_all,
    wait_for,
)
from safetensors.torch import load_file

from imcap.checkpoint import CheckpointError, latest_checkpoint, read_best
from imcap.config import ConfigError, load_config
from imcap.data.streams import DATA_ORDER
from imcap.distributed import EXIT_PREEMPTED, Preempted
from imcap.resume import (
    EpochReader,
    load_checkpoint,
    recover_interrupted_save,
    resolve_resume,
    resume_position,
    safe_torch_load,
)
from imcap.train import train


def exact_overrides(shards, runs, *extra):
    """Two epochs of 6 steps on 2 processes, dropout on (RNG matters), data workers (resume must skip right),
    layer4 trained (its optimizer state and learning rate resume too)."""
    return tiny_overrides(
        shards,
        runs,
        TRAIN_LAYER4,
        "train.cpu=true",
        "train.epochs=2",
        "train.log_every=1",
        "checkpoint.every_steps=2",
        "data.num_workers=2",
        "model.decoder.dropout=0.3",
        "eval.max_images=8",
        *extra,
    )


# Where a run of exact_overrides is killed, and the checkpoint it then resumes from: (step, epoch, batches_in_epoch).
# Each stops both ranks at the same point of their run: before a step (BEFORE_STEP), or after a save returned.
AFTER_SAVE = """
import imcap.checkpoint
save = imcap.checkpoint.Checkpointer.save

def stopping_save(self, state, *args, **kwargs):
    saved = save(self, state, *args, **kwargs)
    if (state.step, state.epoch, state.batches_in_epoch) == {state}:
        stop()
    return saved

imcap.checkpoint.Checkpointer.save = stopping_save
"""
KILL_POINTS = {
    # step 5 done, not saved: resumed 4 batches into the first epoch (data workers skip them), step 5 trained again
    "mid-epoch": (BEFORE_STEP.format(done=5), (4, 0, 4)),
    # the first epoch's last step evaluated and saved as the start of the second, the second not begun
    "at-an-epoch-end": (AFTER_SAVE.format(state=(6, 1, 0)), (6, 1, 0)),
    # step 9 done, not saved: resumed 2 batches into the second epoch, step 9 trained again
    "in-the-second-epoch": (BEFORE_STEP.format(done=9), (8, 1, 2)),
}


@pytest.fixture(scope="module")
def uninterrupted(demo_shards, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("uninterrupted")
    assert wait_all(start_ranks(exact_overrides(demo_shards, runs, "run_name=reference"))) == [0, 0]
    return runs / "reference"


@pytest.mark.parametrize("point, shards", [*((point, "on disk") for point in KILL_POINTS), ("mid-epoch", "over http")])
def test_kill_9_at_a_named_point_then_resume_gives_bitwise_the_weights_of_an_uninterrupted_run(
    demo_shards, tmp_path, uninterrupted, serve, point, shards
):
    """The uninterrupted run reads its shards from disk; one over http reads the same (test_remote_shards)."""
    location = serve(demo_shards)[0] if shards == "over http" else demo_shards
    kill_resume_and_compare(exact_overrides(location, tmp_path, "run_name=interrupted"), tmp_path, uninterrupted, point)


def test_a_static_shape_run_killed_mid_epoch_resumes_bitwise(demo_shards, tmp_path):
    static = ("train.static_shapes=true", "model.encoder.train_layer4=false")  # the option is the decoder's
    assert wait_all(start_ranks(exact_overrides(demo_shards, tmp_path, "run_name=reference", *static))) == [0, 0]
    interrupted = exact_overrides(demo_shards, tmp_path, "run_name=interrupted", *static)
    kill_resume_and_compare(interrupted, tmp_path, tmp_path / "reference", "mid-epoch")


def kill_resume_and_compare(interrupted: list[str], tmp_path: Path, uninterrupted: Path, point: str) -> None:
    """Kill the run of `interrupted` with kill -9 at a KILL_POINT, resume it, and compare its weights and
    log after the resume with those of the uninterrupted run."""
    fault, resumed_at = KILL_POINTS[point]
    run = tmp_path / "interrupted"
    procs = start_ranks(interrupted, log=tmp_path / "log", command=stopping_at(fault))
    wait_for(lambda: all(stopped(p) for p in procs), procs)
    kill_9(procs)
    resumed_from = latest_checkpoint(run)
    # read now: the resumed run prunes old checkpoints (keep_last)
    state = json.loads((resumed_from / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_in_epoch"]) == resumed_at
    first = state["step"]
    logged_before = len(logged(run))
    resumed = wait_all(start_ranks(interrupted, log=tmp_path / "log"))
    log_text = (tmp_path / "log.rank0").read_text()
    assert resumed == [0, 0], log_text[-3000:]
    assert f"resumed from {resumed_from} at step {first} " in log_text

    final_ref = load_file(uninterrupted / "checkpoints" / "step-000012" / "model.safetensors")
    final = load_file(run / "checkpoints" / "step-000012" / "model.safetensors")
    assert final.keys() == final_ref.keys()
    assert all(torch.equal(final[k], final_ref[k]) for k in final), f"killed {point}"
    expected = {r["step"]: r for r in logged(uninterrupted)}
    after_resume = logged(run)[logged_before:]
    assert [r["step"] for r in after_resume] == list(range(first + 1, 13))
    for r in after_resume:
        assert r["lr"] == expected[r["step"]]["lr"] and r["epoch"] == expected[r["step"]]["epoch"]
        assert r["train_loss"] == expected[r["step"]]["train_loss"]  # same samples, same dropout


# Where a run saving every step is killed during the save of step 3, and what of step 3 is then on disk.
CHECKPOINT_FILES = {"model.safetensors", "optimizer.pt", "rng-rank0.pt", "vocab.json", "config.yaml", "state.json"}
WRITE_WEIGHTS = """
import imcap.checkpoint
write = imcap.checkpoint.save_file

def save_file(tensors, path):
    write(tensors, path)
    if os.path.basename(os.path.dirname(path)) == ".tmp-step-000003":
        stop()

imcap.checkpoint.save_file = save_file
"""
REPLACE = """
import imcap.checkpoint
replace = os.replace

def stopping_replace(src, dst):
    if {condition}:
        stop()
    replace(src, dst)

imcap.checkpoint.os.replace = stopping_replace
"""
SAVE_FAULTS = {
    # the weights written into the temporary directory, the rest of the checkpoint not yet
    "weights-written": (WRITE_WEIGHTS, ".tmp-step-000003", {"rng-rank0.pt", "model.safetensors"}),
    # the temporary directory complete, state.json last, not yet renamed to step-000003
    "before-the-rename": (
        REPLACE.format(condition='os.path.basename(src) == ".tmp-step-000003"'),
        ".tmp-step-000003",
        CHECKPOINT_FILES,
    ),
    # step-000003 in place, `latest` not yet replaced by the file that names it
    "before-latest-names-it": (
        REPLACE.format(condition='os.path.basename(dst) == "latest" and open(src).read() == "step-000003"'),
        "step-000003",
        CHECKPOINT_FILES,
    ),
}


@pytest.mark.parametrize("point", list(SAVE_FAULTS))
def test_a_process_killed_during_a_save_leaves_the_previous_checkpoint_as_latest(demo_shards, tmp_path, capsys, point):
    fault, newer, newer_files = SAVE_FAULTS[point]
    overrides = tiny_overrides(demo_shards, tmp_path, "checkpoint.every_steps=1")
    checkpoints = tmp_path / "tiny" / "checkpoints"
    proc = subprocess.Popen(
        [*stopping_at(fault), *overrides],
        cwd=ROOT,
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(lambda: stopped(proc), [proc])
    kill_9([proc])
    assert {p.name for p in (checkpoints / newer).iterdir()} == newer_files  # killed inside the save of step 3
    latest = latest_checkpoint(tmp_path / "tiny")
    assert latest == checkpoints / "step-000002" and (checkpoints / "latest").read_text() == latest.name
    assert {p.name for p in latest.iterdir()} == CHECKPOINT_FILES
    assert resolve_resume("auto", tmp_path / "tiny") == latest
    train(load_config(ROOT / "configs" / "demo.yaml", overrides))  # resumes from latest and finishes
    assert f"resumed from {latest} at step 2 " in capsys.readouterr().out
    assert not list(checkpoints.glob(".tmp-*"))
    assert json.loads((latest_checkpoint(tmp_path / "tiny") / "state.json").read_text())["step"] == 12


def test_sigusr1_to_one_rank_makes_both_save_the_same_step_and_exit_75_then_auto_resume_finishes(demo_shards, tmp_path):
    overrides = tiny_overrides(demo_shards, tmp_path, "train.cpu=true", "train.epochs=2", "train.log_every=1")
    run = tmp_path / "tiny"
    procs = start_ranks(overrides, log=tmp_path / "log")
    wait_for(lambda: any(r["step"] >= 3 for r in logged(run)), procs)
    procs[1].send_signal(signal.SIGUSR1)
    assert wait_all(procs) == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    saved = latest_checkpoint(run)
    step = json.loads((saved / "state.json").read_text())["step"]
    assert 3 <= step < 12 and {p.name for p in saved.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    assert (
        f"stopped by SIGUSR1 at step {step}"
        in (tmp_path / "log.rank0").read_text() + (tmp_path / "log.rank1").read_text()
    )
    assert wait_all(start_ranks(overrides, log=tmp_path / "log")) == [0, 0]
    assert [r["step"] for r in logged(run)] == list(range(1, 13))  # every step once, none twice


def test_a_preemption_at_an_evaluation_step_loses_no_evaluation(demo_shards, tmp_path):
    overrides = tiny_overrides(demo_shards, tmp_path, "eval.every_steps=1", "eval.max_images=8", "train.log_every=1")
    run = tmp_path / "tiny"

    def preempt():  # from another thread, as Slurm would, once a few steps are done
        while not any(r["step"] >= 3 for r in logged(run)):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=preempt, daemon=True).start()
    with pytest.raises(Preempted, match=f"stopped by SIGUSR1 at step .*exiting with {EXIT_PREEMPTED}"):
        train(load_config(ROOT / "configs" / "demo.yaml", overrides))
    train(load_config(ROOT / "configs" / "demo.yaml", overrides))
    assert [r["step"] for r in logged(run, "val_loss")] == list(range(1, 13))


def test_resuming_with_more_accumulation_ends_each_epoch_where_it_ends_with_a_shorter_step(
    demo_shards, tmp_path, caplog
):
    """Saved 3 batches into an epoch of 12 with grad_accum_steps=1, resumed with 2: steps of 2, 2, 2, 2
    and 1 finish that epoch; the next epoch is 6 steps of 2, read from the same loader. Resumed with 2
    data workers where there were none, the rest of the epoch comes in another order: a warning says so."""
    first = tiny_overrides(
        demo_shards, tmp_path, "train.epochs=2", "checkpoint.every_steps=3", "checkpoint.keep_last=10"
    )
    train(load_config(ROOT / "configs" / "demo.yaml", first))
    saved = tmp_path / "tiny" / "checkpoints" / "step-000003"
    assert json.loads((saved / "state.json").read_text())["batches_in_epoch"] == 3
    train(
        load_config(
            ROOT / "configs" / "demo.yaml",
            [*first, "run_name=more-accum", f"resume={saved}", "train.grad_accum_steps=2", "data.num_workers=2"],
        )
    )
    assert (
        "by 1 process(es) with 0 data workers each, in batches of 8: 24 of the epoch's samples were trained. This run "
        "has 1 with 2, in batches of 8, and reads the epoch in another order: it skips the first 3 batches of each "
        "process (24 samples) and trains the other 9 (72 samples), so the epoch is trained on 96 samples where an "
        "uninterrupted one has 96"
    ) in caplog.text
    state = json.loads((latest_checkpoint(tmp_path / "more-accum") / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_in_epoch"]) == (3 + 5 + 6, 2, 0)
    evaluated = logged(tmp_path / "more-accum", "val_loss")
    assert [(r["step"], r["epoch"]) for r in evaluated] == [(8, 1), (14, 2)]


def test_resumed_with_an_accumulation_whose_epoch_ends_before_the_saved_batch_the_next_epoch_begins(
    demo_shards, tmp_path, caplog
):
    """Saved 11 batches into an epoch of 12 with grad_accum_steps=1, resumed with 5 in the same order: this
    run's epoch is 10 batches (2 whole steps), so the saved one is over and the next is its 2 steps."""
    first = tiny_overrides(
        demo_shards, tmp_path, "train.epochs=2", "checkpoint.every_steps=11", "checkpoint.keep_last=10"
    )
    train(load_config(ROOT / "configs" / "demo.yaml", first))
    saved = tmp_path / "tiny" / "checkpoints" / "step-000011"
    resumed = [*first, "run_name=more-accum", f"resume={saved}", "train.grad_accum_steps=5"]
    train(load_config(ROOT / "configs" / "demo.yaml", resumed))
    assert (
        f"{saved} was saved 11 batches into epoch 0, and this run's epoch has 10 batches per process (whole "
        "steps of grad_accum_steps=5): it counts epoch 0 as done and begins epoch 1"
    ) in caplog.text
    state = json.loads((latest_checkpoint(tmp_path / "more-accum") / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_in_epoch"]) == (11 + 2, 2, 0)


def test_resumed_mid_epoch_on_more_processes_the_epoch_is_finished_saying_how_many_samples_it_trains(
    demo_shards, tmp_path
):
    """Saved 5 batches of 8 into an epoch of 96 samples by 1 process: 40 trained. Resumed on 2 processes,
    whose epoch is 6 batches each: 2 of them (32 samples) are skipped, the other 4 trained (64 samples), so
    the epoch is trained on 104 samples. Skipping the saved 5 batches instead left one step of that epoch."""
    first = tiny_overrides(demo_shards, tmp_path, "checkpoint.every_steps=5", "checkpoint.keep_last=10")
    train(load_config(ROOT / "configs" / "demo.yaml", first))
    saved = tmp_path / "tiny" / "checkpoints" / "step-000005"
    more = [*first, "run_name=two", f"resume={saved}", "train.cpu=true", "train.log_every=1"]
    assert wait_all(start_ranks(more, log=tmp_path / "log")) == [0, 0]
    assert [(r["step"], r["epoch"]) for r in logged(tmp_path / "two")] == [(6, 0), (7, 0), (8, 0), (9, 1)]
    log_text = (tmp_path / "log.rank0").read_text()
    assert (
        f"{saved} was saved 5 batches into epoch 0 by 1 process(es) with 0 data workers each, in batches of 8: 40 "
        "of the epoch's samples were trained. This run has 2 with 0, in batches of 8, and reads the epoch in "
        "another order: it skips the first 2 batches of each process (32 samples) and trains the other 4 (64 "
        "samples), so the epoch is trained on 104 samples where an uninterrupted one has 96"
    ) in log_text
    assert f"resumed from {saved} at step 5 (epoch 0, batch 2)" in log_text


def test_the_place_in_an_epoch_read_another_way_is_where_as_many_samples_were_trained(caplog):
    """Saved 3 batches of 8 into the epoch on each of 2 processes: 48 samples trained."""
    saved = {"step": 5, "epoch": 0, "batches_in_epoch": 3, "world_size": 2, "data_workers": 2, "batch_size": 8}
    saved["data_order"] = DATA_ORDER
    assert resume_position(saved, EpochReader(2, 2, 8, 6, 1), Path("c")) == (0, 3) and not caplog.text  # as saved
    # in the same order, resumed with grad_accum_steps=2 and an epoch cut to 2 batches: the 3 saved end it
    assert resume_position(saved, EpochReader(2, 2, 8, 2, 2), Path("c")) == (1, 0)
    assert "this run's epoch has 2 batches per process (whole steps of grad_accum_steps=2)" in caplog.text
    caplog.clear()
    older = {k: v for k, v in saved.items() if k != "data_order"}  # saved by a version with another order
    assert resume_position(older, EpochReader(2, 2, 8, 6, 1), Path("c")) == (0, 3)
    assert "(this version of imcap orders an epoch otherwise)" in caplog.text
    caplog.clear()
    assert resume_position(saved, EpochReader(1, 0, 8, 12, 1), Path("c")) == (0, 6)  # 6 x 8
    assert "trained on 96 samples where an uninterrupted one has 96" in caplog.text
    assert resume_position(saved, EpochReader(1, 0, 16, 6, 1), Path("c")) == (0, 3)  # 3 x 16
    assert resume_position(saved, EpochReader(4, 0, 8, 3, 1), Path("c")) == (0, 1)  # 1 x 4 x 8: 16 more twice
    assert "skips the first 1 batches of each process (32 samples) and trains the other 2 (64 samples), so the " in (
        caplog.text
    )
    assert "epoch is trained on 112 samples where an uninterrupted one has 96" in caplog.text
    # this run's epoch (1 batch on each of 4 processes) holds fewer samples than were trained of it: done
    assert resume_position(saved, EpochReader(4, 0, 8, 1, 1), Path("c")) == (1, 0)
    assert "in which an epoch has 32 samples: it counts epoch 0 as done and begins epoch 1" in caplog.text


@pytest.fixture(scope="module")
def trained_run(demo_shards, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    train(
        load_config(
            ROOT / "configs" / "demo.yaml",
            tiny_overrides(demo_shards, runs, "eval.every_steps=5", "checkpoint.best_metric=val_loss"),
        )
    )
    return runs, demo_shards


def test_the_partial_checkpoint_of_a_run_killed_during_a_save_is_removed_and_the_complete_ones_kept(
    tmp_path, trained_run
):
    runs, _ = trained_run
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / ".tmp-step-000005").mkdir(parents=True)  # killed before its rename
    shutil.copytree(latest_checkpoint(runs / "tiny"), checkpoints / "step-000004")
    recover_interrupted_save(tmp_path, Accelerator(cpu=True))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000004"]


# A checkpoint that looks complete (state.json in place) but is not, and what the warning says of it.
DAMAGE = {
    "weights-cut-short": (
        "model.safetensors",
        lambda b: b[: len(b) // 2],
        r"model\.safetensors is \d+ bytes, \d+ when",
    ),
    "state-json-garbled": ("state.json", lambda b: b[:20], r"state\.json is not readable JSON"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_bitwise_from_the_one_before(
    demo_shards, tmp_path, uninterrupted, damage
):
    name, cut, says = DAMAGE[damage]
    run = tmp_path / "runs" / "reference"
    shutil.copytree(uninterrupted, run)  # saved at steps 8, 10 and 12 (keep_last 3)
    newest = run / "checkpoints" / "step-000012"
    (newest / name).write_bytes(cut((newest / name).read_bytes()))
    logged_before = len(logged(run))
    resumed = wait_all(
        start_ranks(exact_overrides(demo_shards, tmp_path / "runs", "run_name=reference"), log=tmp_path / "log")
    )
    log_text = (tmp_path / "log.rank0").read_text()
    assert resumed == [0, 0], log_text[-3000:]
    assert re.search(f"{re.escape(str(newest))} cannot be resumed from: {re.escape(str(newest))}/{says}", log_text)
    assert f"resumed from {run / 'checkpoints' / 'step-000010'} at step 10 " in log_text
    assert (run / "checkpoints" / "broken-step-000012" / name).exists()  # kept for a look, out of the way

    final_ref = load_file(uninterrupted / "checkpoints" / "step-000012" / "model.safetensors")
    final = load_file(newest / "model.safetensors")  # saved again by the resumed run
    assert final.keys() == final_ref.keys() and all(torch.equal(final[k], final_ref[k]) for k in final)
    expected = {r["step"]: r for r in logged(uninterrupted)}
    assert [(r["step"], r["train_loss"]) for r in logged(run)[logged_before:]] == [
        (step, expected[step]["train_loss"]) for step in (11, 12)
    ]


def test_resuming_from_a_named_checkpoint_that_is_cut_short_is_refused_naming_the_file(trained_run, tmp_path):
    runs, _ = trained_run
    named = tmp_path / "step-000012"
    shutil.copytree(latest_checkpoint(runs / "tiny"), named)
    weights = named / "model.safetensors"
    saved_size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        CheckpointError, match=f"^resume={re.escape(str(named))}: {re.escape(str(weights))} is 100 bytes, {saved_size} "
    ):
        resolve_resume(str(named), tmp_path)


def test_the_end_of_training_is_evaluated_and_best_is_scored_on_its_own_weights(trained_run):
    runs, _ = trained_run
    evaluated = logged(runs / "tiny", "val_loss")
    assert [r["step"] for r in evaluated] == [5, 10, 12]  # 12 steps; every 5, and the end
    assert read_best(runs / "tiny" / "checkpoints") == {
        "name": "step-000012",
        "metric": "val_loss",
        "value": evaluated[-1]["val_loss"],
    }


def test_resuming_into_another_model_size_is_refused_saying_what_differs(trained_run):
    runs, shards = trained_run
    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(shards, runs, "model.decoder.hidden_dim=48"))
    with pytest.raises(
        CheckpointError,
        match=r"does not match the configured model: decoder\.\S+: checkpoint \(.*32.*\), config \(.*48",
    ):
        train(cfg)


def test_resuming_with_another_vocabulary_is_refused_naming_the_words(trained_run, tmp_path):
    runs, shards = trained_run
    changed = tmp_path / "shards"
    changed.mkdir()
    for f in shards.iterdir():
        (changed / f.name).symlink_to(f)
    (changed / "vocab.json").unlink()
    vocab = json.loads((shards / "vocab.json").read_text())
    vocab["words"] = [w for w in vocab["words"] if w != "purple"] + ["zebra"]
    (changed / "vocab.json").write_text(json.dumps(vocab))
    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(changed, runs))
    with pytest.raises(
        CheckpointError, match=r"vocabulary .* differs .* new words \['zebra'\], missing words \['purple'\]"
    ):
        train(cfg)


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/imcap-pickle-ran")


def test_a_checkpoint_holding_a_pickled_object_is_refused_and_its_code_never_runs(trained_run, tmp_path):
    runs, _ = trained_run
    MARKER.unlink(missing_ok=True)
    evil = tmp_path / "optimizer.pt"
    with open(evil, "wb") as f:
        pickle.dump({"optimizer": RunsCode()}, f)
    with pytest.raises(CheckpointError, match="optimizer.pt was not loaded: it holds something other than tensors"):
        safe_torch_load(evil)
    checkpoint = latest_checkpoint(runs / "tiny")
    tampered = tmp_path / checkpoint.name
    tampered.mkdir()
    for f in checkpoint.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    (tampered / "optimizer.pt").write_bytes(evil.read_bytes())
    with pytest.raises(CheckpointError):
        load_checkpoint(tampered, torch.nn.Linear(1, 1), None, None, None)
    assert not MARKER.exists()


def test_a_config_with_python_objects_is_refused_and_runs_nothing(tmp_path):
    MARKER.unlink(missing_ok=True)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"run_name: !!python/object/apply:os.system ['touch {MARKER}']\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    assert not MARKER.exists()


def test_resume_resolution(tmp_path, trained_run):
    runs, _ = trained_run
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(CheckpointError, match="resume=latest, but .* holds no complete checkpoint"):
        resolve_resume("latest", tmp_path)
    latest = latest_checkpoint(runs / "tiny")
    assert resolve_resume("latest", runs / "tiny") == latest == resolve_resume(str(runs / "tiny"), tmp_path)
    assert resolve_resume(str(latest), tmp_path) == latest
    with pytest.raises(CheckpointError, match="not a complete checkpoint directory"):
        resolve_resume(str(tmp_path), tmp_path)
    # a fresh start, or one from an earlier step, into a run with later checkpoints: they would mix
    assert resolve_resume(str(latest), runs / "tiny") == latest
    earlier = tmp_path / "elsewhere" / "step-000005"
    earlier.mkdir(parents=True)
    (earlier / "state.json").write_text(json.dumps({"step": 5, "epoch": 0, "batches_in_epoch": 5, "world_size": 1}))
    for start in ("none", str(earlier)):
        with pytest.raises(CheckpointError, match=f"already holds checkpoints of later steps .*{latest.name}"):
            resolve_resume(start, runs / "tiny")
