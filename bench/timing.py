"""Optimizer steps of several kinds timed side by side in one run: they alternate in blocks, so the same
machine conditions fall on every kind and the ratios between them are fair on a noisy machine."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode


class TimedSteps:
    """Optimizer steps of one kind, on the batches of `batches`: `loss(batch)` gives the step's loss and the
    caption samples it trains. The time spent waiting for a batch is counted apart."""

    def __init__(self, name, loss, batches, optimizer, device):
        self.name, self.loss, self.batches, self.optimizer, self.device = name, loss, batches, optimizer, device
        self.seconds, self.waited, self.steps, self.done = 0.0, 0.0, 0, 0
        self.flops = 0  # of one step, forward and backward

    def run(self, timed: bool) -> None:
        start = time.perf_counter()
        batch = next(self.batches)
        got = time.perf_counter()
        loss, samples = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if timed:
            self.seconds += time.perf_counter() - start
            self.waited += got - start
            self.steps += 1
            self.done += samples

    def count_flops(self) -> None:
        with FlopCounterMode(display=False) as counter:
            self.run(timed=False)
        self.flops = counter.get_total_flops()

    @property
    def rate(self) -> float:
        """Caption samples per second."""
        return self.done / self.seconds

    @property
    def tflops(self) -> float:
        return self.flops * self.steps / self.seconds / 1e12


def alternating(steps: list[TimedSteps], seconds: float, block: int = 3) -> None:
    """Times `steps` for about `seconds` each, `block` steps of a kind in a row (so each data thread's work
    falls mostly within its own steps) and at least `block` of each, after two warm-up (and compile)
    steps of each and one that counts its FLOPs."""
    for step in steps:
        for _ in range(2):
            step.run(timed=False)
        step.count_flops()
    deadline = time.perf_counter() + seconds * len(steps)
    while time.perf_counter() < deadline or min(s.steps for s in steps) < block:
        for step in steps:
            for _ in range(block):
                step.run(timed=True)
