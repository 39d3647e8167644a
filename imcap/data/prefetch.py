"""The last stage of the data path: batches moved to the device (and their JPEGs decoded there), on a
GPU a few batches ahead of the step, in a thread and on a CUDA stream of their own.

Done in the training thread, this work falls between steps while the GPU waits: receiving the batch
from the loader, copying it, decoding its JPEGs with nvJPEG. In a thread of its own it overlaps the
step, which on a GPU is mostly the training thread launching kernels and waiting for them. On a CPU
the step already uses every core the data workers leave, so there the batch is prepared in the
training thread, when it is asked for.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable

import torch

from imcap.data.pipeline import model_inputs

_END = object()


class DeviceBatches:
    """Iterates `batches` with batch["inputs"] (the encoder's input, model_inputs) and batch["captions"]
    on `device`. `ahead` batches are prepared early in a thread (default: 2 on a GPU, none on a CPU);
    an error in the loader or in decoding is raised here, in the training thread. Use it as a context
    manager, so that the thread stops with the loop."""

    def __init__(self, batches: Iterable[dict], device, ahead: int | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # the thread sets it: it needs an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.ahead = self.default_ahead(self.device) if ahead is None else ahead
        if self.ahead < 0:
            raise ValueError(f"ahead must be >= 0, not {self.ahead}")
        self.batches = iter(batches)  # made here, in the training thread: DataLoader watches its workers from there
        self.finished = False
        if self.ahead:
            self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            self.ready: queue.Queue = queue.Queue(maxsize=self.ahead)
            self.stopped = threading.Event()
            self.thread = threading.Thread(target=self._fill, daemon=True, name="imcap-device-batches")
            self.thread.start()

    @staticmethod
    def default_ahead(device) -> int:
        return 2 if torch.device(device).type == "cuda" else 0

    def _prepare(self, batch: dict) -> dict:
        batch["inputs"] = model_inputs(batch, self.device)  # first: decoding may drop samples
        batch["captions"] = batch["captions"].to(self.device, non_blocking=True)
        return batch

    def _fill(self) -> None:
        try:
            if self.stream is not None:
                torch.cuda.set_device(self.device)
            with torch.cuda.stream(self.stream):  # no stream (a CPU): does nothing
                for batch in self.batches:
                    batch = self._prepare(batch)
                    ready = self.stream.record_event() if self.stream is not None else None
                    if not self._put((batch, ready)):
                        return
            self._put(_END)
        except BaseException as e:  # handed to the training thread, raised there
            self._put(e)

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.finished:
            raise StopIteration
        if not self.ahead:
            return self._prepare(next(self.batches))
        item = self.ready.get()
        if item is _END or isinstance(item, BaseException):
            self.finished = True
            if item is _END:
                raise StopIteration
            raise item
        batch, ready = item
        if ready is not None:
            step_stream = torch.cuda.current_stream(self.device)
            step_stream.wait_event(ready)
            for tensor in (*batch["inputs"].values(), batch["captions"]):
                tensor.record_stream(step_stream)  # made on the side stream, used on the step's: keep until done
        return batch

    def close(self) -> None:
        if self.ahead:
            self.stopped.set()
            self.thread.join(timeout=60)  # a loader stuck for longer is left to the daemon thread
        self.batches = iter(())  # the loader's last reference here: its workers stop now, not at collection

    def __enter__(self) -> DeviceBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
