"""Real multi-process DDP on the CPU (gloo), launched the way the README says."""

import json
import subprocess

import pytest
from helpers import ROOT, TRAIN_LAYER4, free_port, run_env, tiny_overrides, two_process_launch


def launch(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("objective", ["xent", "scst"])
def test_two_processes_train_on_disjoint_samples_with_equal_batches_and_stay_identical(
    demo_shards, tmp_path, objective
):
    result = launch(
        *two_process_launch(),
        "tests/ddp_probe.py",
        str(tmp_path),
        *tiny_overrides(
            demo_shards,
            tmp_path,
            TRAIN_LAYER4,
            "train.cpu=true",
            "model.decoder.dropout=0.3",
            f"train.objective={objective}",
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    assert ranks[0]["batches"] == ranks[1]["batches"] == 96 // (8 * 2)  # every rank: the computed count
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])  # disjoint samples
    assert ranks[0]["params"] == ranks[1]["params"]  # DDP kept the replicas identical
    if objective == "scst":  # each rank sampled with a sampler of its own
        assert ranks[0]["objective"] != ranks[1]["objective"]


def test_accelerate_launch_of_the_training_script_runs_two_processes_to_the_end(demo_shards, tmp_path):
    result = launch(
        *two_process_launch(),
        "launch/train.py",
        "--config",
        "configs/demo.yaml",
        *tiny_overrides(demo_shards, tmp_path, "train.cpu=true"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    run = tmp_path / "tiny"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [2, 4, 6]
    assert any(r.get("split") == "val" and "bleu4" in r for r in records)
    assert (run / "checkpoints" / "step-000006" / "model.safetensors").exists()


def test_torchrun_starts_the_same_script_as_two_processes(demo_shards, tmp_path):
    result = launch(
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "launch/train.py",
        "--config",
        "configs/demo.yaml",
        *tiny_overrides(demo_shards, tmp_path, "train.cpu=true", "eval.max_images=4"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) of 1 CPU thread(s), 6 steps per epoch" in result.stdout  # 2 cores shared by 2
