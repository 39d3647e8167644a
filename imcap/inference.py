"""A trained model for inference: found in a run, checkpoint or export directory, loaded, exported."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from imcap.checkpoint import STATE, CheckpointError, latest_checkpoint, read_best
from imcap.config import load_config
from imcap.errors import path_error
from imcap.model import Captioner
from imcap.text import Vocabulary

MODEL_FILES = ("model.safetensors", "vocab.json", "config.yaml")  # what inference reads from a model directory


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
    model_dir = _complete_model_dir(path)
    cfg = load_config(model_dir / "config.yaml", ["model.encoder.weights=none"])  # every weight is in the checkpoint
    vocab = Vocabulary.load(model_dir / "vocab.json")
    model = Captioner(cfg.model, len(vocab), vocab.pad)
    weights = model_dir / "model.safetensors"
    try:
        model.load_state_dict(load_file(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{weights} cannot be read as safetensors ({e}): the file is damaged or cut short"
        ) from None
    except RuntimeError as e:  # load_state_dict: missing, unexpected or differently shaped weights
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointError(
            f"{weights} does not fit the model {model_dir / 'config.yaml'} describes: {first}"
        ) from None
    return model.eval(), vocab, cfg


def export(path: str | Path, out_dir: str | Path) -> Path:
    """Weights (safetensors), vocabulary and config for inference; no optimizer or RNG state."""
    model_dir = _complete_model_dir(path)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FILES:
            shutil.copyfile(model_dir / name, out_dir / name)
    except OSError as e:
        raise path_error(e.filename or out_dir, e, "cannot export to") from None
    return out_dir


def _complete_model_dir(path: str | Path) -> Path:
    """find_model_dir's directory, checked to hold every file a model for inference needs."""
    model_dir = find_model_dir(path)
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{model_dir}: {', '.join(missing)} missing (a model directory holds {', '.join(MODEL_FILES)})"
        )
    return model_dir
