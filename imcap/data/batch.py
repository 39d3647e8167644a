"""The batch: what collation makes of decoded samples, and what the model takes.

A `Batch` is never changed in place: moving it to the device, decoding its JPEGs or dropping a
sample makes a new one. Its inputs are one of three kinds: images, cached encoder features, or
JPEG bytes left for the device to decode (prefetch.py turns those into images).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, fields, replace

import torch

from imcap.data.samples import Sample
from imcap.text import Vocabulary, pad_captions

log = logging.getLogger(__name__)


class _Tensors:
    """Moving and pinning for a frozen dataclass whose fields are all tensors: each makes a new one."""

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, device):
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    def pin_memory(self):
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


@dataclass(frozen=True)
class Images(_Tensors):
    pixels: torch.Tensor  # (B, 3, S, S) uint8; normalised inside the encoder


@dataclass(frozen=True)
class CachedFeatures(_Tensors):
    features: torch.Tensor  # (B, C, h, w): the frozen encoder part's output, bf16, fp16 or fp32


@dataclass(frozen=True)
class Jpegs(_Tensors):
    """A batch's images as a few tensors (one shared-memory handle each on the way from a worker), decoded
    on the device by prefetch.decode_jpegs."""

    data: torch.Tensor  # (total bytes,) uint8: every JPEG end to end
    ends: torch.Tensor  # (B,) where each JPEG ends; an empty slice: the worker decoded that image
    boxes: torch.Tensor  # (B, 5) crop of each: resized width, height, left, top, size
    decoded: torch.Tensor  # (B', 3, S, S) uint8, the worker-decoded images in order (one blank if none)


Inputs = Images | CachedFeatures | Jpegs


@dataclass(frozen=True)
class StreamPosition:
    """How far a training batch's data worker has read its stream of the epoch: where it resumes."""

    worker: int
    samples_read: int  # of the worker's stream of the epoch, through the batch's last sample


@dataclass(frozen=True)
class Batch:
    captions: torch.Tensor  # (B, k, T) token ids, k captions per image
    inputs: Inputs
    references: list[list[str]]  # every caption of each image
    image_ids: list[str | int]
    skipped: int = 0  # samples dropped since the previous batch of this stream (unreadable, undecodable)
    position: StreamPosition | None = None  # of a training batch

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device) -> Batch:
        """On the device: captions and inputs (Jpegs are decoded there by prefetch.decode_jpegs first)."""
        return replace(self, captions=self.captions.to(device, non_blocking=True), inputs=self.inputs.to(device))

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        return replace(self, captions=self.captions.pin_memory(), inputs=self.inputs.pin_memory())

    def select(self, keep: list[int], inputs: Inputs, skipped: int) -> Batch:
        """The samples at `keep`, with their new inputs, and `skipped` more samples counted as dropped."""
        return Batch(
            self.captions[keep],
            inputs,
            [self.references[i] for i in keep],
            [self.image_ids[i] for i in keep],
            self.skipped + skipped,
            self.position,
        )


@dataclass
class Collate:
    """Decoded samples -> a Batch, with `captions_per_image` captions of each (chosen by each sample's RNG
    in training; the first ones, repeated when there are fewer, in evaluation, where the RNGs are None).
    Training on an image with fewer captions repeats some of them; the first time, a warning says so."""

    vocab: Vocabulary
    max_length: int
    captions_per_image: int
    warned: bool = field(default=False, init=False, repr=False, compare=False)

    def __call__(self, samples: list[Sample], rngs: list[random.Random | None]) -> Batch:
        k = self.captions_per_image
        short = [s for s in samples if len(s.captions) < k]
        if short and rngs[0] is not None and not self.warned:
            self.warned = True  # once in each process that collates: the main one or a data worker
            log.warning(
                "data.captions_per_image=%d, but %d of a batch's %d images have fewer captions (%s has %d): "
                "such an image trains on some of its captions more than once",
                k,
                len(short),
                len(samples),
                short[0].image_id,
                len(short[0].captions),
            )
        chosen = []
        for s, rng in zip(samples, rngs):
            caps = s.captions
            if rng is None:
                chosen.append([caps[i % len(caps)] for i in range(k)])
            elif len(caps) >= k:
                chosen.append(rng.sample(caps, k))
            else:
                chosen.append([rng.choice(caps) for _ in range(k)])
        encoded = [self.vocab.encode(c, self.max_length) for caps in chosen for c in caps]
        captions = pad_captions(encoded, self.vocab.pad).view(len(samples), k, -1)  # (B, k, T)
        return Batch(captions, collate_inputs(samples), [s.captions for s in samples], [s.image_id for s in samples])


def collate_inputs(samples: list[Sample]) -> Inputs:
    if any(s.jpeg for s in samples):
        return pack_jpegs(samples)
    if samples[0].features is not None:
        return CachedFeatures(torch.stack([s.features for s in samples]))  # (B, C, h, w)
    return Images(torch.stack([s.pixels for s in samples]))  # (B, 3, S, S)


def pack_jpegs(samples: list[Sample]) -> Jpegs:
    """JPEGs for the device, and the images a worker decoded (those the device decoder does not take)."""
    empty = torch.empty(0, dtype=torch.uint8)
    data = [s.jpeg.data if s.jpeg else empty for s in samples]
    size = next(s.jpeg.size for s in samples if s.jpeg)
    boxes = [[*s.jpeg.box, s.jpeg.size] if s.jpeg else [0] * 5 for s in samples]
    decoded = [s.pixels for s in samples if s.jpeg is None] or [torch.zeros(3, size, size, dtype=torch.uint8)]
    ends = torch.tensor([len(d) for d in data]).cumsum(0)
    return Jpegs(torch.cat(data), ends, torch.tensor(boxes), torch.stack(decoded))
