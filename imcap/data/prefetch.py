"""The last stage of the data path: batches moved to the device (and their JPEGs decoded there), on a
GPU a few batches ahead of the step, in a thread and on a CUDA stream of their own.

Done in the training thread, this work falls between steps while the GPU waits: receiving the batch
from the loader, copying it, decoding its JPEGs with nvJPEG. In a thread of its own it overlaps the
step, which on a GPU is mostly the training thread launching kernels and waiting for them. On a CPU
the step already uses every core the data workers leave, so there the batch is prepared in the
training thread, when it is asked for.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from collections.abc import Iterable

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from imcap.data.batch import Batch, Images, Jpegs
from imcap.data.samples import place
from imcap.data.shards import DataError

log = logging.getLogger(__name__)
_END = object()


class DeviceBatches:
    """Iterates `batches` as batches on `device` (to_device). `ahead` batches are prepared early in a
    thread (default: 2 on a GPU, none on a CPU); an error in the loader or in decoding is raised here,
    in the training thread. Use it as a context manager, so that the thread stops with the loop."""

    def __init__(self, batches: Iterable[Batch], device, ahead: int | None = None):
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

    def _prepare(self, batch: Batch) -> Batch:
        return to_device(batch, self.device)

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

    def __next__(self) -> Batch:
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
            for tensor in (*batch.inputs.tensors(), batch.captions):
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


def to_device(batch: Batch, device) -> Batch:
    """The batch on the device, its JPEGs decoded there (which may drop samples the workers would have)."""
    if isinstance(batch.inputs, Jpegs):
        batch = decode_jpegs(batch, device)
    return batch.to(device)


def decode_jpegs(batch: Batch, device) -> Batch:
    """The batch with its Jpegs decoded on the device as Images (B', 3, S, S) uint8. A JPEG the device
    refuses is decoded here by PIL; one that PIL refuses too is dropped with its captions and counted
    in `skipped`, as a worker would have skipped it."""
    packed: Jpegs = batch.inputs
    if torch.device(device).type == "cuda":  # nvJPEG's output may be memory that work queued on this stream
        torch.cuda.current_stream(device).synchronize()  # still reads: it does not wait (pytorch/vision#9606)
    ends = packed.ends.tolist()
    starts = [0] + ends[:-1]
    on_device = [i for i in range(len(ends)) if ends[i] > starts[i]]
    jpegs = [packed.data[starts[i] : ends[i]] for i in on_device]
    try:
        images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad JPEG fails the whole call: decode them one by one
        images = [_decode_one(jpeg, device) for jpeg in jpegs]
    decoded = dict(zip(on_device, images))
    worker_decoded = iter(packed.decoded)
    out, keep = [], []
    for i, (w, h, left, top, size) in enumerate(packed.boxes.tolist()):
        if i not in decoded:
            image = next(worker_decoded).to(device, non_blocking=True)
        elif decoded[i] is not None:
            image = F.resize(decoded[i], [h, w], antialias=True) if decoded[i].shape[1:] != (h, w) else decoded[i]
            image = image[:, top : top + size, left : left + size]
        else:
            try:
                jpeg = Image.open(io.BytesIO(packed.data[starts[i] : ends[i]].numpy().tobytes())).convert("RGB")
                image = place(jpeg, (w, h, left, top), size).to(device)
            except Exception as e:  # what a worker's decode would have skipped
                log.warning(
                    "skipping sample %s: its JPEG decodes neither on %s nor with PIL: %s", batch.image_ids[i], device, e
                )
                continue
        out.append(image)
        keep.append(i)
    if not keep:
        raise DataError(f"no image of a training batch could be decoded: {batch.image_ids}")
    return batch.select(keep, Images(torch.stack(out)), skipped=len(ends) - len(keep))


def _decode_one(jpeg: torch.Tensor, device) -> torch.Tensor | None:
    try:
        return decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None
