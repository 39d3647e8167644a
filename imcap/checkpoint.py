"""Checkpoints: atomic saves, `latest` and `best`, resume resolution, safe loading.

    runs/<name>/checkpoints/
        step-000120/   model.safetensors  optimizer.pt  rng-rank0.pt ...  vocab.json  config.yaml  state.json
        latest         the name of the newest complete checkpoint
        best           the name of the best one, and its score

A checkpoint is written into `.tmp-step-N/` by all ranks and renamed to `step-N/` by the main process
once every rank has finished; `state.json` is written last. `latest` is replaced atomically after the
rename, so it never names a partial checkpoint, and a crash during a save leaves the previous one intact.
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
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from imcap.config import CheckpointConfig, Config, save_config
from imcap.data.shards import atomic_write
from imcap.text import Vocabulary

if TYPE_CHECKING:
    from imcap.evaluation import Evaluation

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

    def advance(self, batches: int, epoch_batches: int) -> None:
        """One optimizer step on `batches` micro-batches; past an epoch's last batch, the next epoch."""
        self.step += 1
        self.batches_in_epoch += batches
        if self.batches_in_epoch >= epoch_batches:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    @property
    def at_epoch_start(self) -> bool:
        return self.batches_in_epoch == 0


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


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


def find_resume(cfg: Config, accelerator) -> Path | None:
    """The checkpoint this run resumes from (cfg.resume), on every rank as the main process resolved it,
    once the partial checkpoints of a run killed during a save are removed."""
    from imcap.distributed import broadcast_object

    recover_interrupted_save(cfg.run_dir, accelerator)
    return broadcast_object(accelerator, resolve_resume(cfg.resume, cfg.run_dir))


def recover_interrupted_save(run_dir: str | Path, accelerator) -> None:
    """Remove the partial checkpoints a run killed during a save left."""
    checkpoints = Path(run_dir) / "checkpoints"
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


class Checkpointer:
    """Saves one run's checkpoints when they are due: every `checkpoint.every_steps` steps, at the end of
    every epoch, and when the run is stopped. All ranks call it; the main process publishes."""

    def __init__(self, cfg: Config, accelerator, model, optimizer, scheduler, vocab: Vocabulary):
        self.cfg, self.settings = cfg, cfg.checkpoint
        self.dir = cfg.run_dir / "checkpoints"
        self.acc, self.model, self.optimizer, self.scheduler, self.vocab = accelerator, model, optimizer, scheduler, vocab

    def maybe_save(self, state: TrainState, evaluation: Evaluation | None, stopping: bool = False) -> Path | None:
        """Save if due. `best` is judged only by an evaluation of the weights being saved."""
        every = self.settings.every_steps
        if not (stopping or state.at_epoch_start or (every and state.step % every == 0)):
            return None
        return self.save(state, best_score(self.settings, evaluation, state.step))

    def save(self, state: TrainState, score: tuple[str, float, bool] | None = None) -> Path:
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
            save_file(contiguous_state(acc.unwrap_model(self.model)), tmp / "model.safetensors")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       tmp / "optimizer.pt")
            self.vocab.save(tmp / "vocab.json")
            save_config(self.cfg, tmp / "config.yaml")
            atomic_write(tmp / STATE, json.dumps({**asdict(state), "world_size": acc.num_processes}))
        acc.wait_for_everyone()  # every rank's RNG file is in place
        if acc.is_main_process:
            os.replace(tmp, final)  # a step is saved once: the loop saves at most once per step
            atomic_write(self.dir / LATEST, name)
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
            atomic_write(self.dir / BEST, json.dumps({"name": name, "metric": metric, "value": value}))

    def _prune(self) -> None:
        keep = {p.name for p in complete_checkpoints(self.dir)[-self.settings.keep_last :]}
        best = read_best(self.dir)
        if best:
            keep.add(best["name"])
        for path in complete_checkpoints(self.dir):
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


def best_score(settings: CheckpointConfig, evaluation: Evaluation | None, step: int) -> tuple[str, float, bool] | None:
    """(metric, value, higher is better) of an evaluation of this step, if it has the metric `best` is kept by."""
    metric = settings.best_metric
    value = evaluation.scores.get(metric) if evaluation is not None and evaluation.step == step else None
    return None if value is None else (metric, value, metric != "val_loss")


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
