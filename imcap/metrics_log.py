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
        # xent and grad norm summed where they are: reading them at every step would wait for the GPU
        self.losses = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        self.counts = torch.zeros(2, dtype=torch.float64)  # images, skipped samples
        self.steps, self.start = 0, time.time()

    def after_step(self, state: TrainState, step_metrics: dict, micro_batches: list[Batch], lr: float) -> None:
        """Count a step; every log_every steps log the averages (an all-reduce: call it on every rank)."""
        self.losses += torch.stack([step_metrics["xent"], step_metrics["grad_norm"]]).to(self.losses)
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
        totals = self.acc.reduce(torch.cat([self.losses, self.counts.to(self.acc.device)]), reduction="sum").cpu()
        seconds = time.time() - self.start
        values = {
            "train_loss": totals[0].item() / (self.steps * self.acc.num_processes),
            "grad_norm": totals[1].item() / (self.steps * self.acc.num_processes),
            "lr": lr,
            "images_per_s": totals[2].item() / seconds,
            "skipped_samples": int(totals[3]),
        }
        self.log(values, state)
        self._reset()
        return {"loss": f"{values['train_loss']:.3f}", "lr": f"{lr:.2e}", "img/s": f"{values['images_per_s']:.0f}"}

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
