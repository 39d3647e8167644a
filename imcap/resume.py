"""Resuming: the checkpoint a run starts from (resume: auto | latest | none | a path), checks that it
fits the configured model and vocabulary, and restoring everything it saved. Everything is loaded
without unpickling objects: weights from safetensors, the rest with `torch.load(weights_only=True)` or JSON.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from imcap.checkpoint import (
    STATE,
    CheckpointError,
    TrainState,
    checkpoint_problem,
    complete_checkpoints,
    latest_checkpoint,
)
from imcap.config import Config
from imcap.distributed import broadcast_object
from imcap.text import Vocabulary

log = logging.getLogger(__name__)


def find_resume(cfg: Config, accelerator) -> Path | None:
    """The checkpoint this run resumes from (cfg.resume), on every rank as the main process resolved it,
    once the partial checkpoints of a run killed during a save are removed."""
    recover_interrupted_save(cfg.run_dir, accelerator)
    return broadcast_object(accelerator, resolve_resume(cfg.resume, cfg.run_dir))


def recover_interrupted_save(run_dir: str | Path, accelerator) -> None:
    """Remove the partial checkpoints a run killed during a save left, and move aside (to broken-step-N)
    every checkpoint that looks complete but is not, so that the run resumes from the newest intact one
    and its own save of that step finds the name free."""
    checkpoints = Path(run_dir) / "checkpoints"
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for checkpoint in sorted(checkpoints.glob("step-*")):
            problem = checkpoint_problem(checkpoint)
            if problem is not None:
                aside = _free_name(checkpoints / f"broken-{checkpoint.name}")
                checkpoint.rename(aside)
                log.warning(
                    "%s cannot be resumed from: %s. Moved to %s; resuming without it", checkpoint, problem, aside
                )
    accelerator.wait_for_everyone()


def _free_name(path: Path) -> Path:
    n = 1
    while path.exists():
        path, n = path.with_name(f"{path.name.rsplit('.', 1)[0]}.{n}"), n + 1
    return path


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """auto: the run's latest checkpoint if any, else a fresh start; latest: it must exist; none; a path.

    Starting afresh (none) or from elsewhere (a path) is refused where run_dir holds checkpoints of
    later steps: the run's own checkpoints would mix with them, and pruning would delete its own."""
    if resume in ("auto", "latest"):
        found = latest_checkpoint(run_dir)
        if found is None and resume == "latest":
            raise CheckpointError(f"resume=latest, but {run_dir / 'checkpoints'} holds no complete checkpoint")
        return found
    found = None if resume == "none" else _checkpoint_at(resume)
    step = _read(found / STATE, lambda p: json.loads(p.read_text())["step"]) if found else 0
    later = [p for p in complete_checkpoints(Path(run_dir) / "checkpoints") if p != found and int(p.name[5:]) > step]
    if later:
        raise CheckpointError(
            f"resume={resume}: {Path(run_dir) / 'checkpoints'} already holds checkpoints of later steps "
            f"({', '.join(p.name for p in later[-3:])}), which this run's would mix with: set another run_name "
            "(or resume=auto to continue that run)"
        )
    problem = checkpoint_problem(found) if found else None
    if problem:
        raise CheckpointError(f"resume={resume}: {problem}; resume from another checkpoint")
    return found


def _checkpoint_at(resume: str) -> Path:
    path = Path(resume)
    if (path / "checkpoints").is_dir():  # a run directory
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"resume={resume}: {path / 'checkpoints'} holds no complete checkpoint")
        return found
    if not (path / STATE).exists():
        raise CheckpointError(
            f"resume={resume}: not a complete checkpoint directory (no {STATE}); "
            "expected auto, latest, none, a run directory or a checkpoints/step-N directory"
        )
    return path


def check_compatible(checkpoint: Path, model, vocab: Vocabulary) -> None:
    """Refuse to resume into a model of another shape or with another vocabulary, saying what differs."""
    saved_vocab = _read(checkpoint / "vocab.json", Vocabulary.load)
    if saved_vocab != vocab:
        added = sorted(set(vocab.words) - set(saved_vocab.words))[:5]
        removed = sorted(set(saved_vocab.words) - set(vocab.words))[:5]
        raise CheckpointError(
            f"{checkpoint}: its vocabulary ({len(saved_vocab)} words) differs from this run's ({len(vocab)}): "
            f"new words {added}, missing words {removed}. Resume with the same shards and text.min_word_count, "
            f"or start a new run (another run_name)."
        )
    saved = _read(checkpoint / "model.safetensors", load_file)
    current = model.state_dict()
    different = [
        f"{k}: checkpoint {tuple(saved[k].shape)}, config {tuple(v.shape)}"
        for k, v in current.items()
        if k in saved and saved[k].shape != v.shape
    ]
    missing = sorted(set(current) ^ set(saved))
    if different or missing:
        raise CheckpointError(
            f"{checkpoint}: the model in it does not match the configured model: "
            f"{'; '.join(different[:4]) or ''} {('keys differ: ' + str(missing[:4])) if missing else ''}. "
            f"The saved config is {checkpoint / 'config.yaml'}."
        )


def load_checkpoint(
    checkpoint: Path, model, optimizer, scheduler, accelerator, data_workers: int | None = None
) -> TrainState:
    """Restore model, optimizer, scheduler, this rank's RNG state and the data position, for a run
    with `data_workers` data workers per process.

    Every file is read (safely) before anything is restored, so a bad checkpoint changes nothing."""
    saved = safe_torch_load(checkpoint / "optimizer.pt")
    weights = _read(checkpoint / "model.safetensors", load_file)
    meta = _read(checkpoint / STATE, lambda p: json.loads(p.read_text()))
    rng_file = checkpoint / f"rng-rank{accelerator.process_index}.pt"
    same_world = meta["world_size"] == accelerator.num_processes and rng_file.exists()
    rng = safe_torch_load(rng_file) if same_world else None
    model.load_state_dict(weights)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if rng is not None:  # with another world size the data order changes anyway; keep the fresh seeds
        _set_rng_state(rng)
    if meta["batches_in_epoch"] and _order_differs(meta, accelerator.num_processes, data_workers):
        log.warning(
            "%s was saved %d batches into epoch %d by %d process(es) with %s data workers each; this run "
            "has %d with %s: the rest of that epoch comes in another order, so some of its samples are "
            "trained on twice and others not at all. Resume with the same numbers to continue exactly.",
            checkpoint,
            meta["batches_in_epoch"],
            meta["epoch"],
            meta["world_size"],
            meta.get("data_workers"),
            accelerator.num_processes,
            data_workers,
        )
    return TrainState(meta["step"], meta["epoch"], meta["batches_in_epoch"], data_workers)


def _order_differs(meta: dict, world_size: int, data_workers: int | None) -> bool:
    """Whether this run reads an epoch in another order than the run that saved `meta`: another world
    size, or another number of data streams per process (its workers; without workers, the process)."""
    if meta["world_size"] != world_size:
        return True
    saved = meta.get("data_workers")  # absent from checkpoints of earlier versions: unknown
    return saved is not None and max(1, saved) != max(1, data_workers or 0)


def safe_torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was not loaded: it holds something other than tensors and plain "
            f"values, which imcap never unpickles ({type(e).__name__}: {e})"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read, cut short or damaged ({type(e).__name__}: {e})") from None


def _read(path: Path, read):
    """read(path), any failure a CheckpointError naming the file."""
    try:
        return read(path)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read, cut short or damaged ({type(e).__name__}: {e})") from None


def _set_rng_state(state: dict) -> None:
    *internal, version = state["python"]
    random.setstate((version, tuple(internal), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
