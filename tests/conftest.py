"""Shared fixtures: a tiny demo dataset as real shards, the shared data folder (plain helpers: helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SHARED_DATA


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """96 train and 32 val demo images at 64 px in shards of 12 samples (8 train, 3 val shards)."""
    from imcap.data.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train_images=96, val_images=32, image_size=64, shard_samples=12)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: the shared real-data folder is needed for this test")
    return SHARED_DATA
