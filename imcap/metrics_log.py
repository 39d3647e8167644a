"""runs/<name>/metrics.jsonl (one JSON object per line) and TensorBoard, written by the main process."""

from __future__ import annotations

import json
import time

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from imcap.checkpoint import TrainState
from imcap.config import Config, to_dict
from imcap.data.batch import Batch


class MetricsLog:
    """Training values are averaged over the steps since the last log line and over all processes; they
    are logged every `train.log_every` steps. A progress bar counts the steps, from `done` of `total`."""

    def __init__(self, cfg: Config, acc: Accelerator, total: int, done: int):
        self.acc, self.path, self.every = acc, cfg.run_dir / "metrics.jsonl", cfg.train.log_every
        acc.init_trackers("tensorboard", config=_flat(to_dict(cfg)))
        self.progress = tqdm(total=total, initial=done, disable=not acc.is_main_process, dynamic_ncols=True)
        self._reset()

    def _reset(self):
        self.sums: dict[str, torch.Tensor] = {}  # summed where they are: reading them every step waits for the GPU
        self.counts = torch.zeros(2, dtype=torch.float64)  # images, skipped samples
        self.steps, self.start = 0, time.time()

    def after_step(self, state: TrainState, step_metrics: dict, micro_batches: list[Batch], lr: float) -> None:
        """Count a step; every log_every steps log the averages (an all-reduce: call it on every rank).
        step_metrics: scalar tensors by name, the same names on every rank."""
        for name, value in step_metrics.items():
            value = value.detach().to(self.acc.device, torch.float64)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts += torch.tensor(
            [sum(len(b) for b in micro_batches), sum(b.skipped for b in micro_batches)], dtype=torch.float64
        )
        self.steps += 1
        self.progress.update()
        if state.step % self.every == 0:
            self.progress.set_postfix(self._log_train(state, lr))

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.progress.close()

    def _log_train(self, state: TrainState, lr: float) -> dict:
        names = sorted(self.sums)
        summed = torch.stack([*(self.sums[k] for k in names), *self.counts.to(self.acc.device)])
        totals = self.acc.reduce(summed, reduction="sum").cpu().tolist()
        seconds = time.time() - self.start
        values = {k: total / (self.steps * self.acc.num_processes) for k, total in zip(names, totals)}
        values |= {"lr": lr, "images_per_s": totals[-2] / seconds, "skipped_samples": int(totals[-1])}
        self.log(values, state)
        self._reset()
        shown = {"loss": f"{values['train_loss']:.3f}", "lr": f"{lr:.2e}", "img/s": f"{values['images_per_s']:.0f}"}
        return shown | ({"reward": f"{values['reward']:.3f}"} if "reward" in values else {})

    def log(self, values: dict, state: TrainState) -> None:
        if not self.acc.is_main_process:
            return
        record = {"step": state.step, "epoch": state.epoch, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.acc.log(
            {k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}, step=state.step
        )


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
