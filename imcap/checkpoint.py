"""Checkpoints: atomic saves when due, `latest` and `best`, and finding the complete ones (resume.py reads them).

    runs/<name>/checkpoints/
        step-000120/   model.safetensors  optimizer.pt  rng-rank0.pt ...  vocab.json  config.yaml  state.json
                       (self-critical training: cider_document_frequencies.npz)
        latest         the name of the newest complete checkpoint
        best           the name of the best one, and its score

A checkpoint is written into `.tmp-step-N/` by all ranks and renamed to `step-N/` by the main process
once every rank has finished; `state.json` is written last, with the size of every other file in it.
`latest` is replaced atomically after the rename, so it never names a partial checkpoint, and a crash
during a save leaves the previous one intact. Files and directories are flushed to the disk (fsync)
before each rename, so a power cut cannot leave a renamed checkpoint with files cut short; one found
cut short anyway (a full disk, a copy) is told apart by `checkpoint_problem`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import save_file

from imcap.config import CheckpointConfig, Config, save_config
from imcap.data.streams import DATA_ORDER
from imcap.errors import ImcapError
from imcap.text import Vocabulary

if TYPE_CHECKING:
    from imcap.data.batch import Batch
    from imcap.evaluation import Evaluation

log = logging.getLogger(__name__)
LATEST, BEST, STATE = "latest", "best", "state.json"
REQUIRED = ("model.safetensors", "optimizer.pt", "vocab.json", "config.yaml")  # besides state.json


class CheckpointError(ImcapError, RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next batch belongs to
    batches_in_epoch: int = 0  # batches of that epoch already trained on (the data position)
    data_workers: int | None = None  # per process; with world and batch size, it decides an epoch's order
    # this process's data worker -> samples of its stream of the epoch read through its last trained batch
    samples_read: dict[int, int] = field(default_factory=dict)

    def advance(self, micro_batches: list[Batch], epoch_batches: int) -> None:
        """One optimizer step on these micro-batches; past an epoch's last batch, the next epoch."""
        self.step += 1
        self.batches_in_epoch += len(micro_batches)
        self.samples_read |= {b.position.worker: b.position.samples_read for b in micro_batches if b.position}
        if self.batches_in_epoch >= epoch_batches:
            self.epoch, self.batches_in_epoch, self.samples_read = self.epoch + 1, 0, {}

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


def contiguous_state(model) -> dict:
    """The state dict as safetensors takes it (channels_last weights are not contiguous)."""
    return {k: v.contiguous() for k, v in model.state_dict().items()}


class Checkpointer:
    """Saves one run's checkpoints when they are due: every `checkpoint.every_steps` steps, at the end of
    every epoch, and when the run is stopped. All ranks call it; the main process publishes."""

    def __init__(self, cfg: Config, accelerator, model, optimizer, scheduler, vocab: Vocabulary, objective):
        self.cfg, self.settings = cfg, cfg.checkpoint
        self.dir = cfg.run_dir / "checkpoints"
        self.acc, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.vocab, self.objective = vocab, objective

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
        rank_state = {**_rng_state(), "objective": self.objective.state_dict(), "samples_read": state.samples_read}
        torch.save(rank_state, tmp / f"rng-rank{acc.process_index}.pt")
        fsync(tmp / f"rng-rank{acc.process_index}.pt")
        if acc.is_main_process:
            save_file(contiguous_state(acc.unwrap_model(self.model)), tmp / "model.safetensors")
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                tmp / "optimizer.pt",
            )
            self.vocab.save(tmp / "vocab.json")
            self.objective.save(tmp)
            save_config(self.cfg, tmp / "config.yaml")
        acc.wait_for_everyone()  # every rank's RNG file is in place
        if acc.is_main_process:
            self._write_state(tmp, state)
            if final.exists():  # saved by a run killed before `latest` named it, which this run resumed before
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync(self.dir)
            durable_write(self.dir / LATEST, name)
            if score is not None:
                self._update_best(name, *score)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _write_state(self, tmp: Path, state: TrainState) -> None:
        """state.json, last: the data position, what decides the data order, and every other file's size."""
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        for name in files:
            fsync(tmp / name)
        shared = {k: v for k, v in asdict(state).items() if k != "samples_read"}  # each rank's is in its own file
        meta = {
            **shared,
            "world_size": self.acc.num_processes,
            "batch_size": self.cfg.data.batch_size,
            "data_order": DATA_ORDER,
        }
        with open(tmp / STATE, "w") as f:
            f.write(json.dumps({**meta, "files": files}))
            f.flush()
            os.fsync(f.fileno())
        fsync(tmp)

    def _update_best(self, name: str, metric: str, value: float, higher_is_better: bool) -> None:
        best = read_best(self.dir)
        better = (
            best is None
            or best["metric"] != metric
            or (value > best["value"] if higher_is_better else value < best["value"])
        )
        if better:
            durable_write(self.dir / BEST, json.dumps({"name": name, "metric": metric, "value": value}))

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


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, naming the file (missing, cut short, state.json unreadable);
    None if it is intact. Checkpoints saved before state.json listed the files' sizes: their files are
    only checked present."""
    try:
        meta = json.loads((checkpoint / STATE).read_text())
    except FileNotFoundError:
        return f"{checkpoint / STATE} is missing"
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        return f"{checkpoint / STATE} is not readable JSON ({e})"
    keys = ("step", "epoch", "batches_in_epoch", "world_size")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in keys):
        return f"{checkpoint / STATE} lacks one of {', '.join(keys)}"
    for name, size in (meta.get("files") or dict.fromkeys(REQUIRED)).items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{path} is {path.stat().st_size} bytes, {size} when it was saved"
    return None


def read_best(checkpoints: Path) -> dict | None:
    path = checkpoints / BEST
    return json.loads(path.read_text()) if path.exists() else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, if it is intact; else the newest intact one (a warning names each
    newer one skipped, and why); else None."""
    checkpoints = Path(run_dir) / "checkpoints"
    pointer = checkpoints / LATEST
    named = [checkpoints / pointer.read_text().strip()] if pointer.exists() else []
    for candidate in dict.fromkeys([*named, *reversed(complete_checkpoints(checkpoints))]):
        if not (candidate / STATE).exists():
            continue
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        log.warning("skipping checkpoint %s: %s", candidate, problem)
    return None


def fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk: a rename is durable only after both."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, text: str) -> None:
    """Replace `path` by a file holding `text`, atomically (readers see the old file or the new one) and
    durably (on the disk when this returns)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)
