"""A trained model for inference: found in a run, checkpoint or export directory, loaded, exported."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file

from imcap.checkpoint import STATE, CheckpointError, latest_checkpoint, read_best
from imcap.config import load_config
from imcap.model import Captioner
from imcap.text import Vocabulary


def find_model_dir(path: str | Path) -> Path:
    """A run directory (its best, else latest checkpoint), a checkpoint directory or an export directory."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    if (path / "checkpoints").is_dir():
        best = read_best(path / "checkpoints")
        if best and (path / "checkpoints" / best["name"] / STATE).exists():
            return path / "checkpoints" / best["name"]
        latest = latest_checkpoint(path)
        if latest:
            return latest
    raise CheckpointError(
        f"{path}: no model found (expected a run directory with checkpoints, a checkpoint "
        "directory or an export directory holding model.safetensors, vocab.json, config.yaml)"
    )


def load_for_inference(path: str | Path):
    """-> (model in eval mode, vocabulary, config) from a run, checkpoint or export directory."""
    model_dir = find_model_dir(path)
    cfg = load_config(model_dir / "config.yaml", ["model.encoder.weights=none"])  # every weight is in the checkpoint
    vocab = Vocabulary.load(model_dir / "vocab.json")
    model = Captioner(cfg.model, len(vocab), vocab.pad)
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    return model.eval(), vocab, cfg


def export(path: str | Path, out_dir: str | Path) -> Path:
    """Weights (safetensors), vocabulary and config for inference; no optimizer or RNG state."""
    model_dir = find_model_dir(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "vocab.json", "config.yaml"):
        shutil.copyfile(model_dir / name, out_dir / name)
    return out_dir
