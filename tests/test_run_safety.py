"""A run loses no work and says why it stops: places it cannot write refused at start, one run per run
directory, Ctrl-C and SIGTERM honoured wherever the run is (the feature-cache build too)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from helpers import (
    BEFORE_STEP,
    ROOT,
    TRAIN,
    logged,
    read_only,
    run_env,
    stopped,
    stopping_at,
    tiny_overrides,
    wait_for,
)

from imcap.checkpoint import latest_checkpoint
from imcap.config import load_config
from imcap.distributed import EXIT_PREEMPTED
from imcap.run_dir import LOCK, RunDirError, lock_run_dir
from imcap.train import train


def demo_config(overrides):
    return load_config(ROOT / "configs" / "demo.yaml", overrides)


def start(command: list[str], overrides: list[str], log) -> subprocess.Popen:
    """One training process in a session of its own: a signal to its group reaches it and its data workers only."""
    return subprocess.Popen(
        [*command, *overrides], cwd=ROOT, env=run_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def test_an_unwritable_checkpoints_directory_fails_the_run_before_its_first_step_naming_it(demo_shards, tmp_path):
    checkpoints = tmp_path / "tiny" / "checkpoints"
    checkpoints.mkdir(parents=True)
    with read_only(checkpoints):
        with pytest.raises(RunDirError, match=f"^{re.escape(str(checkpoints))} cannot be written"):
            train(demo_config(tiny_overrides(demo_shards, tmp_path)))
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()  # not a step trained


def test_an_unwritable_run_directory_fails_the_run_at_start_naming_it(demo_shards, tmp_path):
    run = tmp_path / "tiny"
    run.mkdir()
    with read_only(run):
        with pytest.raises(RunDirError, match=f"^{re.escape(str(run))} cannot be written"):
            train(demo_config(tiny_overrides(demo_shards, tmp_path)))


def test_a_second_run_in_the_same_run_directory_is_refused_and_the_first_finishes_untouched(demo_shards, tmp_path):
    overrides = tiny_overrides(demo_shards, tmp_path, "train.log_every=1")
    with open(tmp_path / "log", "w") as log:
        first = start(stopping_at(BEFORE_STEP.format(done=2)), overrides, log)
        wait_for(lambda: stopped(first), [first])  # two steps done, the third not begun
        holder = f"process {first.pid} on {socket.gethostname()} holds {tmp_path / 'tiny' / LOCK}"
        with pytest.raises(RunDirError, match=f"is in use by another run: {re.escape(holder)}"):
            train(demo_config(overrides))
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    assert [r["step"] for r in logged(tmp_path / "tiny")] == list(range(1, 13))  # every step once


def test_the_lock_of_a_killed_run_is_taken_by_the_next_run(demo_shards, tmp_path):
    run = tmp_path / "tiny"
    run.mkdir()
    dies_holding_it = (
        f"import os, signal; from imcap.run_dir import lock_run_dir; "
        f"assert lock_run_dir({str(run)!r}) is None; os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = subprocess.run([sys.executable, "-c", dies_holding_it], env=run_env())
    assert killed.returncode == -signal.SIGKILL and (run / LOCK).read_text().split()[0].isdigit()
    assert lock_run_dir(run) is None  # free: the kernel released it with the process
    assert (run / LOCK).read_text() == f"{os.getpid()} {socket.gethostname()}\n"


def test_ctrl_c_saves_a_checkpoint_and_exits_75_as_sigterm_does(demo_shards, tmp_path):
    run = tmp_path / "tiny"
    with open(tmp_path / "log", "w") as log:
        proc = start(TRAIN, tiny_overrides(demo_shards, tmp_path, "train.log_every=1", "data.num_workers=2"), log)
        wait_for(lambda: any(r["step"] >= 3 for r in logged(run)), [proc])
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: to the process and its data workers
        assert proc.wait(timeout=300) == EXIT_PREEMPTED, (tmp_path / "log").read_text()[-3000:]
    step = json.loads((latest_checkpoint(run) / "state.json").read_text())["step"]
    assert 3 <= step < 12 and step == logged(run)[-1]["step"]  # the last step trained is saved
    assert f"stopped by SIGINT at step {step}; checkpoint saved" in (tmp_path / "log").read_text()


SECOND_CTRL_C_BEFORE_THE_SAVE = """
import imcap.checkpoint
maybe_save = imcap.checkpoint.Checkpointer.maybe_save

def interrupted(self, state, evaluation, stopping=False):
    if stopping:  # the first Ctrl-C agreed on: the second comes before its save, raised in this thread
        signal.raise_signal(signal.SIGINT)
    return maybe_save(self, state, evaluation, stopping)

imcap.checkpoint.Checkpointer.maybe_save = interrupted
"""


def test_a_second_ctrl_c_while_the_first_is_being_saved_for_exits_at_once(demo_shards, tmp_path):
    run = tmp_path / "tiny"
    with open(tmp_path / "log", "w") as log:
        proc = start(stopping_at(SECOND_CTRL_C_BEFORE_THE_SAVE), tiny_overrides(demo_shards, tmp_path), log)
        wait_for(lambda: (run / "metrics.jsonl").exists(), [proc])  # training
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130  # 128 + SIGINT
    text = (tmp_path / "log").read_text()
    assert "imcap: interrupted by a second Ctrl-C" in text and "Traceback" not in text
    assert latest_checkpoint(run) is None


SIGTERM_AFTER_THE_FIRST_CACHE_SHARD = """
import imcap.data.feature_cache
cache_shard, written = imcap.data.feature_cache.cache_shard, []

def terminated(*args, **kwargs):
    cached = cache_shard(*args, **kwargs)
    written.append(cached)
    if len(written) == 1:  # raised in this thread: handled before the next shard, where a kill from outside may not be
        signal.raise_signal(signal.SIGTERM)
    return cached

imcap.data.feature_cache.cache_shard = terminated
"""


def test_sigterm_during_the_feature_cache_build_stops_it_after_the_shard_and_exits_75_without_training(
    demo_shards, tmp_path
):
    shards = tmp_path / "shards"  # the demo shards, with a features/ directory of this test's own
    shards.mkdir()
    for f in demo_shards.iterdir():
        if f.is_file():
            (shards / f.name).symlink_to(f)
    run = tmp_path / "tiny"
    overrides = tiny_overrides(shards, tmp_path, "data.feature_cache=true")
    with open(tmp_path / "log", "w") as log:
        proc = start(stopping_at(SIGTERM_AFTER_THE_FIRST_CACHE_SHARD), overrides, log)  # 10 shards to go
        assert proc.wait(timeout=300) == EXIT_PREEMPTED, (tmp_path / "log").read_text()[-3000:]
    assert (
        "stopped by SIGTERM before training; the feature cache's complete shards are kept"
        in (tmp_path / "log").read_text()
    )
    [cache] = (shards / "features").iterdir()
    assert [p.name for p in cache.iterdir()] == ["train-000000.tar"] and not (cache / "cache.json").exists()
    assert not (run / "metrics.jsonl").exists() and latest_checkpoint(run) is None  # nothing trained
