"""Benchmark (not a test): the time from a run's start to its first trained step when it resumes 10 %, 50 % and
90 % of the way through an epoch of real JPEG shards, against a fresh start's.

The shards are Flickr8k photos from ../shared/data, built as `imcap shards build` builds them. A first run
trains one epoch, saving a checkpoint at every tenth of it; each start then resumes one of those checkpoints
(resume=<checkpoint>) into a run directory of its own. A start's time runs from launching launch/train.py to
the first line of its metrics.jsonl (train.log_every=1: written after its first step); then it is killed.
The model is small and reads 64 px crops through one data worker, so that the epoch trains in about a minute
on 2 cores and what differs between the starts is where in the epoch they begin.

    .venv/bin/python bench/resume.py [--images 3200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from build_shards import SHARED_DATA, flickr_source

from imcap.data.build import BuildOptions, build_shards

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16


def overrides(shards: Path, runs: Path, steps: int) -> list[str]:
    return [
        f"data.shards={shards}",
        "data.demo=false",
        f"runs_dir={runs}",
        "data.image_size=64",
        "data.train_crop=random",
        "data.feature_cache=false",
        "data.num_workers=1",
        f"data.batch_size={BATCH}",
        "model.encoder.train_layer4=false",
        "model.encoder.batchnorm_stats_images=0",
        "model.decoder.embed_dim=32",
        "model.decoder.hidden_dim=64",
        "model.decoder.attention_dim=32",
        "text.min_word_count=5",
        "train.cpu=true",
        "train.mixed_precision=no",
        "train.epochs=1",
        "train.warmup_steps=5",
        "train.log_every=1",
        f"checkpoint.every_steps={steps // 10}",
        "checkpoint.keep_last=20",
        "eval.max_images=16",
        "eval.meteor=never",
    ]


def launch(args: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/demo.yaml"), *args]
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def time_to_first_step(args: list[str], run_dir: Path, log: Path) -> float:
    """Seconds from launch to the first metrics.jsonl line; the run is killed then."""
    started = time.perf_counter()
    process = launch(args, log)
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        if process.poll() is not None:
            raise SystemExit(f"the run ended before its first step:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--images", type=int, default=3200, help="train images (a multiple of 160: whole tenths)")
    parser.add_argument("--repeats", type=int, default=2, help="starts of each kind; the fastest counts")
    args = parser.parse_args()
    steps = args.images // BATCH
    print(
        f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, load "
        f"average {os.getloadavg()[0]:.1f} at the start; code: {ROOT}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source, _ = flickr_source(args.data, round(args.images * 7 / 6), work)
        shards = work / "shards"
        build_shards(source, shards, BuildOptions(resize=256, shard_samples=100))
        runs = work / "runs"
        common = overrides(shards, runs, steps)
        print(f"{args.images} train images in shards of 100, batches of {BATCH}: {steps} steps an epoch")
        started = time.perf_counter()
        trained = launch([*common, "run_name=epoch"], work / "epoch.log")
        if trained.wait():
            raise SystemExit(f"the epoch's run failed:\n{(work / 'epoch.log').read_text()[-3000:]}")
        print(f"the epoch trained and saved in {time.perf_counter() - started:.0f} s")

        starts = {"fresh start": "none"}
        for tenth in (1, 5, 9):
            starts[f"resumed at {tenth * 10} %"] = str(
                runs / "epoch" / "checkpoints" / f"step-{tenth * steps // 10:06d}"
            )
        seconds = {}
        for repeat in range(args.repeats):
            for name, resume in starts.items():
                run_name = f"{name.replace(' ', '-').replace('%', 'pc')}-{repeat}"
                run = [*common, f"run_name={run_name}", f"resume={resume}"]
                elapsed = time_to_first_step(run, runs / run_name, work / f"{run_name}.log")
                seconds[name] = min(seconds.get(name, elapsed), elapsed)
        print(f"\nfrom launch to the first trained step (fastest of {args.repeats}):")
        for name, value in seconds.items():
            print(f"  {name:<18} {value:6.2f} s")
        ratio = seconds["resumed at 90 %"] / seconds["resumed at 10 %"]
        print(f"resumed at 90 % / resumed at 10 %: {ratio:.2f}x (target: at most 1.2x)")


if __name__ == "__main__":
    main()
