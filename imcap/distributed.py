"""Process-group helpers: agreeing on values across ranks, and the preemption flag."""

from __future__ import annotations

import signal

import torch

from imcap.data.streams import Part

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; requeue and resume


class Preempted(Exception):
    """Training stopped by a signal after every rank saved the same step (or, stopped before training, kept
    what it had made); entry points exit with EXIT_PREEMPTED."""

    def __init__(self, signal_name: str, step: int | None, kept: str = "checkpoint saved"):
        when = "before training" if step is None else f"at step {step}"
        super().__init__(f"stopped by {signal_name} {when}; {kept}, exiting with {EXIT_PREEMPTED}")


def part_of(accelerator) -> Part:
    """The share of the data this process reads."""
    return Part(accelerator.process_index, accelerator.num_processes)


def broadcast_object(accelerator, obj):
    """The main process's value of obj, on every rank."""
    if accelerator.num_processes == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(accelerator, obj) -> list:
    """Every rank's obj, in rank order, on every rank."""
    if accelerator.num_processes == 1:
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


class StopFlag:
    """Set by SIGTERM, SIGINT (Ctrl-C) or the preemption signal; ranks agree on it at step boundaries.

    The handler only sets a flag, so a signal that arrives during a save (a second SIGTERM included)
    cannot interrupt the write. A second Ctrl-C can: after the first, SIGINT raises KeyboardInterrupt
    again, for someone who would rather stop now than wait for the save.
    """

    def __init__(self, preemption_signal: str = "SIGUSR1"):
        self.received: str | None = None
        for sig in {signal.SIGTERM, signal.SIGINT, getattr(signal, preemption_signal)}:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = self.received or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self, accelerator) -> str | None:
        """On every rank, the name of a signal any rank received, else None (an all-reduce: call it on all ranks)."""
        number = signal.Signals[self.received].value if self.received else 0
        if accelerator.num_processes > 1:
            flag = torch.tensor([number], dtype=torch.int64, device=accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            number = int(flag.item())
        return signal.Signals(number).name if number else None
