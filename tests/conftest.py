"""Shared fixtures: a tiny demo dataset as real shards, the shared data folder, a small config."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """96 train and 32 val demo images at 64 px in shards of 12 samples (8 train, 3 val shards)."""
    from imcap.data.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train_images=96, val_images=32, image_size=64,
                      shard_samples=12)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: the shared real-data folder is needed for this test")
    return SHARED_DATA


def tiny_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """configs/demo.yaml shrunk to seconds: 64 px (a 2 x 2 grid), small decoder, few images, one epoch, fp32
    (bitwise checks, and one process holds one Accelerate precision), no METEOR (its Java process takes 10 s
    of a test's time; test_metrics and test_evaluation check it)."""
    return [f"data.shards={shards}", "data.demo=false", f"runs_dir={run_dir}", "run_name=tiny", "data.image_size=64",
            "train.mixed_precision=no",
            "data.batch_size=8", "data.captions_per_image=2", "data.num_workers=0", "data.feature_cache=false",
            "data.shuffle_buffer=16",
            "model.decoder.embed_dim=16", "model.decoder.hidden_dim=32", "model.decoder.attention_dim=16",
            "train.epochs=1", "train.warmup_steps=2", "train.log_every=2", "eval.batch_size=16",
            "eval.max_length=12", "eval.print_samples=1", "eval.meteor=never", *extra]


def run_env() -> dict:
    """The environment for subprocesses: this interpreter's scripts first, OpenMP pools of one thread
    (training sets its own torch threads: train.cpu_threads)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def make_train_loader(shards: list[str], collate, *, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                      epoch: int = 0, epochs: int = 1, seed: int = 0, skip: int = 0, num_batches: int = 1, **data):
    """The train loader of a TrainStream; `data` holds DataConfig fields (batch_size, image_size, ...)."""
    from imcap.config import DataConfig
    from imcap.data.streams import Part, TrainStream, train_loader

    stream = TrainStream(shards, collate, DataConfig(**data), seed, Part(rank, world_size), range(epoch, epoch + epochs),
                         skip, num_batches)
    return train_loader(stream, num_workers)


def make_eval_loader(shards: list[str], collate, *, batch_size: int, image_size: int, rank: int = 0,
                     world_size: int = 1, max_images: int = 0, num_workers: int = 0):
    from imcap.data.streams import EvalStream, Part, eval_loader

    return eval_loader(EvalStream(shards, collate, Part(rank, world_size), batch_size, image_size, max_images),
                       num_workers)
