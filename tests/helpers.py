"""Plain helpers shared by the test modules (fixtures are in conftest.py); no test module imports another."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from imcap.config import DataConfig
from imcap.data.batch import Collate
from imcap.data.shards import iter_tar_members, list_shards
from imcap.data.streams import EvalStream, Part, TrainStream, eval_loader, train_loader
from imcap.text import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# make_train_loader's settings for the streams' tests: one small epoch of the demo shards
TRAIN_LOADER = dict(epoch=0, seed=0, batch_size=4, image_size=64, train_crop="random", shuffle_buffer=16)


TRAIN_LAYER4 = "model.encoder.train_layer4=true"  # as configs/demo.yaml trains it


def tiny_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """configs/demo.yaml shrunk to seconds: 64 px (a 2 x 2 grid), small decoder, few images, one epoch, fp32
    (bitwise checks, and one process holds one Accelerate precision), no METEOR (its Java process takes 10 s
    of a test's time; test_metrics and test_evaluation check it), layer4 frozen (trained, it doubles a tiny
    run's time and adds 120 MB of optimizer state to every checkpoint; the tests of exact resume and of
    DDP train it: TRAIN_LAYER4)."""
    return [
        f"data.shards={shards}",
        "data.demo=false",
        f"runs_dir={run_dir}",
        "run_name=tiny",
        "data.image_size=64",
        "train.mixed_precision=no",
        "data.batch_size=8",
        "data.captions_per_image=2",
        "data.num_workers=0",
        "data.feature_cache=false",
        "data.shuffle_buffer=16",
        "model.decoder.embed_dim=16",
        "model.decoder.hidden_dim=32",
        "model.decoder.attention_dim=16",
        "model.encoder.train_layer4=false",
        "train.epochs=1",
        "train.warmup_steps=2",
        "train.log_every=2",
        "eval.batch_size=16",
        "eval.max_length=12",
        "eval.print_samples=1",
        "eval.meteor=never",
        *extra,
    ]


def run_env() -> dict:
    """The environment for subprocesses: this interpreter's scripts first, OpenMP pools of one thread
    (training sets its own torch threads: train.cpu_threads)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous: tests that run at the same time
    on one machine (or a stale process of an earlier run) never meet on a fixed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # port 0: the kernel picks a free one
        return s.getsockname()[1]


@contextmanager
def read_only(directory: Path):
    """`directory` unwritable while the block runs, for root too: chmod does not stop root, an immutable
    directory (chattr +i) does. Skips the test where neither works (a filesystem without attributes)."""
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0
    else:
        os.chmod(directory, 0o555)
        made = True
    try:
        probe = Path(directory) / "probe"
        try:
            probe.touch()
            probe.unlink()
            writable = True
        except OSError:
            writable = False
        if not made or writable:
            pytest.skip(f"{directory} could not be made read-only here")
        yield directory
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(directory)], capture_output=True)
        else:
            os.chmod(directory, 0o755)


def two_process_launch() -> list[str]:
    """`accelerate launch` of two processes on a free rendezvous port, before the script and its arguments."""
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def demo_collate(shards_dir: Path, k: int = 1) -> Collate:
    return Collate(Vocabulary.load(shards_dir / "vocab.json"), 30, k)


def demo_as_jpegs(demo_shards: Path, split: str) -> list[dict]:
    """The demo split's samples, their PNGs re-encoded as JPEGs."""
    samples = []
    for shard in list_shards(str(demo_shards), split):
        members = dict(iter_tar_members(shard))
        for key in sorted(name[: -len(".png")] for name in members if name.endswith(".png")):
            jpeg = image_bytes(Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB"), "JPEG")
            samples.append({"__key__": key, "jpg": jpeg, "json": members[f"{key}.json"]})
    return samples


def make_train_loader(
    shards: list[str],
    collate,
    *,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    epochs: int = 1,
    seed: int = 0,
    skip: int = 0,
    num_batches: int = 1,
    samples_read: dict[int, int] | None = None,
    **data,
):
    """The train loader of a TrainStream; `data` holds DataConfig fields (batch_size, image_size, ...)."""
    epochs = range(epoch, epoch + epochs)
    part = Part(rank, world_size)
    stream = TrainStream(shards, collate, DataConfig(**data), seed, part, epochs, skip, num_batches, samples_read or {})
    return train_loader(stream, num_workers)


def make_eval_loader(
    shards: list[str],
    collate,
    *,
    batch_size: int,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_images: int = 0,
    num_workers: int = 0,
    read_attempts: int = 1,
):
    stream = EvalStream(shards, collate, Part(rank, world_size), batch_size, image_size, max_images, read_attempts)
    return eval_loader(stream, num_workers)


# ------------------------------------------------------------------ training processes, stopped at named points

TRAIN = [sys.executable, "launch/train.py", "--config", "configs/demo.yaml"]


STOP = """import os, signal

def stop():
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen here until the test's kill -9
"""
RUN_TRAIN = """
import runpy, sys
sys.argv[0] = "launch/train.py"
runpy.run_path("launch/train.py", run_name="__main__")
"""


def stopping_at(fault: str) -> list[str]:
    """TRAIN, with `fault` (Python) run first in the training process: it patches a function of imcap so that
    the process stops itself (SIGSTOP) at a named point, where the test kills it with kill_9. The kill lands
    at that point in every run, not wherever a timer happened to meet the run."""
    return [sys.executable, "-c", STOP + fault + RUN_TRAIN, *TRAIN[2:]]


def stopped(proc: subprocess.Popen) -> bool:
    """Whether proc is stopped, as `stop()` of stopping_at leaves it (state T in /proc/PID/stat)."""
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def start_ranks(
    overrides: list[str], world: int = 2, log: Path | None = None, command: list[str] = TRAIN
) -> list[subprocess.Popen]:
    """`world` plain python processes forming one gloo group, as torchrun would start them."""
    port, procs = free_port(), []
    for rank in range(world):
        env = {
            **run_env(),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
        }
        out = open(f"{log}.rank{rank}", "a") if log else subprocess.DEVNULL
        procs.append(
            subprocess.Popen(
                [*command, *overrides], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    return procs


def wait_all(procs, timeout=300) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def logged(run: Path, key: str = "train_loss") -> list[dict]:
    """The run's metrics.jsonl records that hold `key`: training steps, or evaluations with val_loss."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if f'"{key}"' in line]


def wait_for(condition, procs, timeout=300, poll=0.05):
    deadline = time.time() + timeout
    while not condition():
        if any(p.poll() is not None for p in procs):
            raise AssertionError("training ended before the test could interrupt it")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(poll)


def kill_9(procs):
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


# stops the training process before its step done + 1 (stopping_at(BEFORE_STEP.format(done=...)))
BEFORE_STEP = """
import imcap.train
step, steps_done = imcap.train.train_step, [0]

def train_step(*args, **kwargs):
    if steps_done[0] == {done}:
        stop()
    steps_done[0] += 1
    return step(*args, **kwargs)

imcap.train.train_step = train_step
"""
