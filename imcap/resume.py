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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from imcap.checkpoint import (
    STATE,
    CheckpointError,
    TrainState,
    checkpoint_problem,
    complete_checkpoints,
    latest_checkpoint,
    read_best,
)
from imcap.config import Config
from imcap.data.streams import DATA_ORDER
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


def find_init(cfg: Config, accelerator, resume_from: Path | None) -> Path | None:
    """The checkpoint whose weights train.init_from names, for a run that does not resume its own, as the
    main process found it; checked intact now, before any long work."""
    if not cfg.train.init_from or resume_from is not None:
        return None
    return broadcast_object(accelerator, _init_checkpoint(cfg.train.init_from))


def _init_checkpoint(init_from: str) -> Path:
    """A run directory: its best checkpoint if that is intact, else its latest; or a checkpoint directory."""
    path = Path(init_from)
    checkpoints = path / "checkpoints"
    try:
        best = read_best(checkpoints) if checkpoints.is_dir() else None
    except (OSError, ValueError, KeyError) as e:
        log.warning(
            "train.init_from=%s: %s is unreadable (%s): using the latest checkpoint", init_from, checkpoints / "best", e
        )
        best = None
    if best is not None and checkpoint_problem(checkpoints / str(best.get("name"))) is None:
        return checkpoints / best["name"]
    found = _checkpoint_at(init_from, "train.init_from")
    problem = checkpoint_problem(found)
    if problem:
        raise CheckpointError(f"train.init_from={init_from}: {problem}")
    return found


def _checkpoint_at(resume: str, key: str = "resume") -> Path:
    path = Path(resume)
    if (path / "checkpoints").is_dir():  # a run directory
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{key}={resume}: {path / 'checkpoints'} holds no complete checkpoint")
        return found
    if not (path / STATE).exists():
        raise CheckpointError(
            f"{key}={resume}: not a complete checkpoint directory (no {STATE}); expected "
            f"{'auto, latest, none, ' if key == 'resume' else ''}a run directory or a checkpoints/step-N directory"
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


@dataclass(frozen=True)
class EpochReader:
    """What decides the order and the length of a run's epochs, for resuming into the middle of one."""

    world_size: int
    data_workers: int | None  # per process
    batch_size: int
    epoch_batches: int  # per process
    grad_accum_steps: int


def load_weights(checkpoint: Path, model) -> None:
    model.load_state_dict(_read(checkpoint / "model.safetensors", load_file))


def load_checkpoint(
    checkpoint: Path, model, optimizer, scheduler, accelerator, reader: EpochReader | None = None, objective=None
) -> TrainState:
    """Restore model, optimizer, scheduler, this rank's RNG states (the objective's sampler among them) and
    the data position, for a run that reads its epochs as `reader` says (None: as the checkpoint's run did).

    Every file is read (safely) before anything is restored, so a bad checkpoint changes nothing."""
    saved = safe_torch_load(checkpoint / "optimizer.pt")
    weights = _read(checkpoint / "model.safetensors", load_file)
    meta = _read(checkpoint / STATE, lambda p: json.loads(p.read_text()))
    if "batch_size" not in meta:  # saved before state.json recorded it: its config says
        meta["batch_size"] = _read(checkpoint / "config.yaml", _batch_size_in_config)
    rng_file = checkpoint / f"rng-rank{accelerator.process_index}.pt"
    same_world = meta["world_size"] == accelerator.num_processes and rng_file.exists()
    rng = safe_torch_load(rng_file) if same_world else None
    model.load_state_dict(weights)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if rng is not None:  # with another world size the data order changes anyway; keep the fresh seeds
        _set_rng_state(rng)
        if objective is not None:
            objective.load_state_dict(rng.get("objective", {}))
    epoch, batches = resume_position(meta, reader, checkpoint) if reader else (meta["epoch"], meta["batches_in_epoch"])
    # where each data worker resumes: known when the epoch is read as it was saved
    same_order = rng is not None and not (reader and _order_differs(meta, reader)) and epoch == meta["epoch"]
    samples_read = rng.get("samples_read", {}) if same_order else {}
    workers = reader.data_workers if reader else meta.get("data_workers")
    return TrainState(meta["step"], epoch, batches, workers, samples_read)


def resume_position(meta: dict, reader: EpochReader, checkpoint: Path) -> tuple[int, int]:
    """(epoch, batches of it already trained on per process) for a run reading as `reader` says, resuming
    the checkpoint of `meta`. Read as it was saved, the epoch continues exactly. Read otherwise, it comes
    in another order: as many of its samples are skipped as were trained, to whole batches on every
    process (rounded down: a few trained twice rather than any left out), and a warning says exactly how
    many samples the epoch is trained on."""
    epoch, done = meta["epoch"], meta["batches_in_epoch"]
    if not done:
        return epoch, done
    if not _order_differs(meta, reader):
        if done < reader.epoch_batches:
            return epoch, done
        # the epoch is cut to whole steps: resumed with a larger grad_accum_steps, it may end before `done`
        log.warning(
            "%s was saved %d batches into epoch %d, and this run's epoch has %d batches per process (whole steps "
            "of grad_accum_steps=%d): it counts epoch %d as done and begins epoch %d.",
            checkpoint,
            done,
            epoch,
            reader.epoch_batches,
            reader.grad_accum_steps,
            epoch,
            epoch + 1,
        )
        return epoch + 1, 0
    trained = done * meta["world_size"] * meta["batch_size"]
    per_batch = reader.world_size * reader.batch_size  # samples of one batch on every process
    skip = trained // per_batch
    full = reader.epoch_batches * per_batch  # the epoch's samples for this run
    saved_by = (
        f"{checkpoint} was saved {done} batches into epoch {epoch} by {meta['world_size']} process(es) with "
        f"{meta.get('data_workers')} data workers each, in batches of {meta['batch_size']}: {trained} of the epoch's "
        f"samples were trained. This run has {reader.world_size} with {reader.data_workers}, in batches of "
        f"{reader.batch_size}, and reads the epoch in another order"
        + ("" if meta.get("data_order", 1) == DATA_ORDER else " (this version of imcap orders an epoch otherwise)")
    )
    if skip >= reader.epoch_batches:
        log.warning(
            "%s, in which an epoch has %d samples: it counts epoch %d as done and begins epoch %d.",
            saved_by,
            full,
            epoch,
            epoch + 1,
        )
        return epoch + 1, 0
    rest = (reader.epoch_batches - skip) * per_batch
    log.warning(
        "%s: it skips the first %d batches of each process (%d samples) and trains the other %d (%d samples), "
        "so the epoch is trained on %d samples where an uninterrupted one has %d; which of them are trained "
        "twice and which not at all depends on the two orders. Resume with the same numbers to continue exactly.",
        saved_by,
        skip,
        skip * per_batch,
        reader.epoch_batches - skip,
        rest,
        trained + rest,
        full,
    )
    return epoch, skip


def _batch_size_in_config(path: Path) -> int:
    return yaml.safe_load(path.read_text())["data"]["batch_size"]


def _order_differs(meta: dict, reader: EpochReader) -> bool:
    """Whether this run reads an epoch in another order than the run that saved `meta`: another world
    size or batch size, another number of data streams per process (its workers; without workers, the
    process), or another version of the order (DATA_ORDER; 1 before checkpoints recorded it)."""
    if meta["world_size"] != reader.world_size or meta["batch_size"] != reader.batch_size:
        return True
    if meta.get("data_order", 1) != DATA_ORDER:
        return True
    saved = meta.get("data_workers")  # absent from checkpoints of earlier versions: unknown
    return saved is not None and max(1, saved) != max(1, reader.data_workers or 0)


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
