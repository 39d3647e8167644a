"""Plain helpers shared by the test modules (fixtures are in conftest.py); no test module imports another."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
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


def tiny_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """configs/demo.yaml shrunk to seconds: 64 px (a 2 x 2 grid), small decoder, few images, one epoch, fp32
    (bitwise checks, and one process holds one Accelerate precision), no METEOR (its Java process takes 10 s
    of a test's time; test_metrics and test_evaluation check it)."""
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
    **data,
):
    """The train loader of a TrainStream; `data` holds DataConfig fields (batch_size, image_size, ...)."""
    epochs = range(epoch, epoch + epochs)
    stream = TrainStream(shards, collate, DataConfig(**data), seed, Part(rank, world_size), epochs, skip, num_batches)
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
):
    stream = EvalStream(shards, collate, Part(rank, world_size), batch_size, image_size, max_images)
    return eval_loader(stream, num_workers)
