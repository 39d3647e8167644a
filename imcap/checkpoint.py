"""Checkpoints: atomic saves, `latest` and `best`, resume resolution, safe loading, export.

    runs/<name>/checkpoints/
        step-000120/   model.safetensors  optimizer.pt  rng-rank0.pt ...  vocab.json  config.yaml  state.json
        latest         the name of the newest complete checkpoint
        best           the name of the best one, and its score

A checkpoint is written into `.tmp-step-N/` by all ranks and renamed to `step-N/` by the main process
once every rank has finished; `state.json` is written last. `latest` is replaced atomically after the
rename, so it never names a partial checkpoint, and a crash during a save leaves the previous one intact
(a step saved twice, at an epoch's end, is moved aside as `.old-step-N/` until its new copy is in place).
Everything is loaded without unpickling objects: weights from safetensors, the rest with
`torch.load(weights_only=True)` or JSON/YAML.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from imcap.config import Config, load_config, save_config
from imcap.text import Vocabulary

LATEST, BEST, STATE = "latest", "best", "state.json"
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next batch belongs to
    batches_in_epoch: int = 0  # batches of that epoch already trained on (the data position)
    data_workers: int | None = None  # per process; with the world size, it decides an epoch's order


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],  # ints only: loadable with weights_only
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    *internal, version = state["python"]
    random.setstate((version, tuple(internal), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def contiguous_state(model) -> dict:
    """The state dict as safetensors takes it (channels_last weights are not contiguous)."""
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def safe_torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} was not loaded: it holds something other than tensors and plain "
                              f"values, which imcap never unpickles ({type(e).__name__}: {e})") from None


class Checkpointer:
    """Saves and finds the checkpoints of one run. All ranks call `save`; the main process publishes."""

    def __init__(self, run_dir: str | Path, accelerator, keep_last: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.acc = accelerator
        self.keep_last = keep_last
        if self.acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):  # left by a run killed during a save
                shutil.rmtree(stale, ignore_errors=True)
            for old in self.dir.glob(".old-step-*"):  # killed between the renames of a second save of a step
                final = self.dir / old.name.removeprefix(".old-")
                if not (final / STATE).exists():
                    shutil.rmtree(final, ignore_errors=True)
                    os.replace(old, final)
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def save(self, state: TrainState, model, optimizer, scheduler, vocab: Vocabulary, cfg: Config,
             score: tuple[str, float, bool] | None = None) -> Path:
        """score: (metric name, value, higher is better) to keep the best checkpoint by."""
        name = step_dir_name(state.step)
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        acc = self.acc
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-rank{acc.process_index}.pt")
        if acc.is_main_process:
            save_file(contiguous_state(acc.unwrap_model(model)), tmp / "model.safetensors")
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       tmp / "optimizer.pt")
            vocab.save(tmp / "vocab.json")
            save_config(cfg, tmp / "config.yaml")
            _atomic_write(tmp / STATE, json.dumps({**asdict(state), "world_size": acc.num_processes}))
        acc.wait_for_everyone()  # every rank's RNG file is in place
        if acc.is_main_process:
            old = self.dir / f".old-{name}"
            if final.exists():  # this step saved before: kept until the new copy is in place
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            _atomic_write(self.dir / LATEST, name)
            if score is not None:
                self._update_best(name, *score)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _update_best(self, name: str, metric: str, value: float, higher_is_better: bool) -> None:
        best = read_best(self.dir)
        better = (best is None or best["metric"] != metric
                  or (value > best["value"] if higher_is_better else value < best["value"]))
        if better:
            _atomic_write(self.dir / BEST, json.dumps({"name": name, "metric": metric, "value": value}))

    def _prune(self) -> None:
        keep = {p.name for p in complete_checkpoints(self.dir)[-self.keep_last:]}
        best = read_best(self.dir)
        if best:
            keep.add(best["name"])
        for path in complete_checkpoints(self.dir):
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """The complete step-N directories, oldest first."""
    return sorted(p for p in checkpoints.glob("step-*") if (p / STATE).exists())


def read_best(checkpoints: Path) -> dict | None:
    path = checkpoints / BEST
    return json.loads(path.read_text()) if path.exists() else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, if it is complete; else the newest complete one; else None."""
    checkpoints = Path(run_dir) / "checkpoints"
    pointer = checkpoints / LATEST
    if pointer.exists():
        named = checkpoints / pointer.read_text().strip()
        if (named / STATE).exists():
            return named
    complete = complete_checkpoints(checkpoints)
    return complete[-1] if complete else None


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
    step = json.loads((found / STATE).read_text())["step"] if found else 0
    later = [p for p in complete_checkpoints(Path(run_dir) / "checkpoints") if p != found and int(p.name[5:]) > step]
    if later:
        raise CheckpointError(
            f"resume={resume}: {Path(run_dir) / 'checkpoints'} already holds checkpoints of later steps "
            f"({', '.join(p.name for p in later[-3:])}), which this run's would mix with: set another run_name "
            "(or resume=auto to continue that run)")
    return found


def _checkpoint_at(resume: str) -> Path:
    path = Path(resume)
    if (path / "checkpoints").is_dir():  # a run directory
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"resume={resume}: {path / 'checkpoints'} holds no complete checkpoint")
        return found
    if not (path / STATE).exists():
        raise CheckpointError(f"resume={resume}: not a complete checkpoint directory (no {STATE}); "
                              "expected auto, latest, none, a run directory or a checkpoints/step-N directory")
    return path


def check_compatible(checkpoint: Path, model, vocab: Vocabulary) -> None:
    """Refuse to resume into a model of another shape or with another vocabulary, saying what differs."""
    saved_vocab = Vocabulary.load(checkpoint / "vocab.json")
    if saved_vocab != vocab:
        added = sorted(set(vocab.words) - set(saved_vocab.words))[:5]
        removed = sorted(set(saved_vocab.words) - set(vocab.words))[:5]
        raise CheckpointError(
            f"{checkpoint}: its vocabulary ({len(saved_vocab)} words) differs from this run's ({len(vocab)}): "
            f"new words {added}, missing words {removed}. Resume with the same shards and text.min_word_count, "
            f"or start a new run (another run_name).")
    saved = load_file(checkpoint / "model.safetensors")
    current = model.state_dict()
    different = [f"{k}: checkpoint {tuple(saved[k].shape)}, config {tuple(v.shape)}"
                 for k, v in current.items() if k in saved and saved[k].shape != v.shape]
    missing = sorted(set(current) ^ set(saved))
    if different or missing:
        raise CheckpointError(f"{checkpoint}: the model in it does not match the configured model: "
                              f"{'; '.join(different[:4]) or ''} {('keys differ: ' + str(missing[:4])) if missing else ''}. "
                              f"The saved config is {checkpoint / 'config.yaml'}.")


def load_checkpoint(checkpoint: Path, model, optimizer, scheduler, accelerator,
                    data_workers: int | None = None) -> TrainState:
    """Restore model, optimizer, scheduler, this rank's RNG state and the data position, for a run
    with `data_workers` data workers per process.

    Every file is read (safely) before anything is restored, so a bad checkpoint changes nothing."""
    saved = safe_torch_load(checkpoint / "optimizer.pt")
    weights = load_file(checkpoint / "model.safetensors")
    meta = json.loads((checkpoint / STATE).read_text())
    rng_file = checkpoint / f"rng-rank{accelerator.process_index}.pt"
    same_world = meta["world_size"] == accelerator.num_processes and rng_file.exists()
    rng = safe_torch_load(rng_file) if same_world else None
    model.load_state_dict(weights)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if rng is not None:  # with another world size the data order changes anyway; keep the fresh seeds
        _set_rng_state(rng)
    if meta["batches_in_epoch"] and _order_differs(meta, accelerator.num_processes, data_workers):
        log.warning("%s was saved %d batches into epoch %d by %d process(es) with %s data workers each; this run "
                    "has %d with %s: the rest of that epoch comes in another order, so some of its samples are "
                    "trained on twice and others not at all. Resume with the same numbers to continue exactly.",
                    checkpoint, meta["batches_in_epoch"], meta["epoch"], meta["world_size"], meta.get("data_workers"),
                    accelerator.num_processes, data_workers)
    return TrainState(meta["step"], meta["epoch"], meta["batches_in_epoch"], data_workers)


def _order_differs(meta: dict, world_size: int, data_workers: int | None) -> bool:
    """Whether this run reads an epoch in another order than the run that saved `meta`: another world
    size, or another number of data streams per process (its workers; without workers, the process)."""
    if meta["world_size"] != world_size:
        return True
    saved = meta.get("data_workers")  # absent from checkpoints of earlier versions: unknown
    return saved is not None and max(1, saved) != max(1, data_workers or 0)


# ------------------------------------------------------------------------------------ inference / export

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
    raise CheckpointError(f"{path}: no model found (expected a run directory with checkpoints, a checkpoint "
                          "directory or an export directory holding model.safetensors, vocab.json, config.yaml)")


def load_for_inference(path: str | Path):
    """-> (model in eval mode, vocabulary, config) from a run, checkpoint or export directory."""
    from imcap.model import Captioner

    model_dir = find_model_dir(path)
    cfg = load_config(model_dir / "config.yaml", ["model.encoder.weights=none"])  # every weight is in the checkpoint
    vocab = Vocabulary.load(model_dir / "vocab.json")
    model = Captioner(cfg.model, len(vocab))
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
