"""The WebDataset reading pipeline, for training and for evaluation.

Training, per epoch (everything a pure function of seed, epoch, rank and worker):

    shard list -> shuffle(seed, epoch) -> split by node -> split by worker -> tar -> samples
    -> shuffle buffer(seed, epoch, rank, worker) -> decode + crop -> batch (B images, k captions each)

Every rank yields the same number of batches per epoch, computed from sizes.json, and each worker
yields its share of them (a worker whose shards run out reads them again), so no rank waits for
another at the end of an epoch. Resuming inside an epoch replays the same order and drops the
batches already trained on. One loader runs through all of a run's epochs: its data workers start once.

Evaluation reads every shard of the split in order; each rank (and worker) keeps every
(world*workers)-th sample, so the split is covered exactly once whatever its size.

Samples are img2dataset-style: `key.jpg|jpeg|png|webp` + `key.json` ({"captions": [...]} or
{"caption": "..."}) and/or `key.txt`. Feature-cache shards hold `key.safetensors` instead of an image.
A sample that cannot be decoded is skipped and counted (`batch["skipped"]`), never fatal.
"""
from __future__ import annotations

import glob
import io
import json
import itertools
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load as load_safetensors
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from imcap.data.shards import iter_tar_members, read_sizes
from imcap.text import Vocabulary, pad_captions

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
Image.MAX_IMAGE_PIXELS = 16384 * 16384  # larger is treated as a decompression bomb: skipped, counted


class DataError(ValueError):
    pass


class SampleError(ValueError):
    """A sample that cannot be used (no image, undecodable image, no caption): skipped and counted."""


# ---------------------------------------------------------------------------------------------- shards

def list_shards(spec: str, split: str | None = None) -> list[str]:
    """A directory (its `{split}-*.tar`; every .tar without a split, img2dataset's 00000.tar too) or a
    brace/glob pattern (its `{split}-*.tar`, with a split: one pattern may name both splits) -> sorted shard paths."""
    if Path(spec).is_dir():
        shards = sorted(glob.glob(str(Path(spec) / (f"{split}-*.tar" if split else "*.tar"))))
    else:
        shards = sorted(p for pattern in wds.shardlists.expand_urls(spec) for p in glob.glob(pattern)
                        if not split or Path(p).name.startswith(f"{split}-"))
    if not shards:
        what, files = (f"shards for split {split!r}", f"{split}-NNNNNN.tar") if split else (".tar shards", ".tar")
        raise DataError(f"no {what} at {spec}: expected {files} files there (build them with "
                        "`imcap shards build`) or a pattern like dir/train-{000000..000009}.tar")
    return shards


def count_samples(shards: list[str]) -> int:
    """Samples in these shards, from the sizes.json beside them."""
    total = 0
    for shard in shards:
        sizes = read_sizes(Path(shard).parent)
        name = Path(shard).name
        if name not in sizes:
            raise DataError(f"{Path(shard).parent / 'sizes.json'} has no sample count for {name}; "
                            "rebuild the shards or run `imcap shards check --fix-sizes` on them")
        total += sizes[name]
    return total


# ------------------------------------------------------------------------------------------- samples

def open_image(data: bytes) -> Image.Image:
    """Image.open, with an image over Image.MAX_IMAGE_PIXELS an error (PIL only warns up to twice that)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def decode_image(data: bytes, image_size: int) -> Image.Image:
    """Image bytes -> RGB PIL image, drafted down (JPEG) towards image_size where the format allows."""
    image = open_image(data)
    image.draft("RGB", (image_size, image_size))  # JPEG decodes at 1/2, 1/4, 1/8 scale when that suffices
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale, don't clip
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / (256.0 if array.max() > 255 else 1.0), 0, 255).astype(np.uint8))
    if image.mode in ("P", "LA", "RGBA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")  # composite on white, not on whatever the transparent pixels hold
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def crop_box(width: int, height: int, size: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    """Where an image of width x height goes: shorter side resized to `size`, then a size x size crop
    (random when rng is given, else centred). -> (resized width, resized height, left, top)."""
    scale = size / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = ((rng.randint(0, w - size), rng.randint(0, h - size)) if rng
                 else ((w - size) // 2, (h - size) // 2))
    return w, h, left, top


def resize_crop(image: Image.Image, size: int, rng: random.Random | None) -> torch.Tensor:
    """-> (3, size, size) uint8, placed by crop_box; normalisation happens on the device, inside the encoder."""
    return place(image, crop_box(*image.size, size, rng), size)


def place(image: Image.Image, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    w, h, left, top = box
    if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, S, S)


def jpeg_for_device(data: bytes, size: int, rng: random.Random | None) -> dict | None:
    """A JPEG left for the training process to decode (nvJPEG on a GPU), with its crop from the
    header alone; None for what the device decoder does not take (not a JPEG, CMYK, 16-bit...) and
    for a JPEG without its end marker: nvJPEG decodes a truncated file without an error, PIL refuses it."""
    image = open_image(data)  # reads the header; a bad one raises, and the sample is skipped
    if image.format not in ("JPEG", "MPO") or image.mode not in ("RGB", "L") or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    return {"bytes": torch.frombuffer(bytearray(data), dtype=torch.uint8),
            "box": torch.tensor([*crop_box(*image.size, size, rng), size])}  # (w, h, left, top, size)


def sample_captions(sample: dict) -> list[str]:
    captions: list[str] = []
    if "json" in sample:
        meta = json.loads(sample["json"])
        found = meta.get("captions", meta.get("caption", [])) if isinstance(meta, dict) else []
        captions = [found] if isinstance(found, str) else found if isinstance(found, list) else []  # null: img2dataset
    if not captions and "txt" in sample:
        captions = [sample["txt"].decode("utf-8")]
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise SampleError("no caption")
    return captions


def image_id(sample: dict) -> str | int:
    """The JSON's image_id (an integer stays one: COCO's tools match results to images by integer id), else the key."""
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict) and "image_id" in meta:
            found = meta["image_id"]
            return found if isinstance(found, int) and not isinstance(found, bool) else str(found)
    return sample["__key__"]


def decode_sample(sample: dict, image_size: int, rng: random.Random | None, jpeg_on_device: bool = False) -> dict:
    """Raw tar sample -> {"images" | "frozen" | "jpeg": ..., "captions": [str], "image_id": str | int}."""
    try:
        decoded = {"captions": sample_captions(sample), "image_id": image_id(sample)}
        if "safetensors" in sample:
            decoded["frozen"] = load_safetensors(sample["safetensors"])["features"]
            return decoded
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise SampleError(f"no image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        if jpeg_on_device and (jpeg := jpeg_for_device(sample[ext], image_size, rng)):
            decoded["jpeg"] = jpeg
        else:
            decoded["images"] = resize_crop(decode_image(sample[ext], image_size), image_size, rng)
        return decoded
    except SampleError:
        raise
    except Exception as e:  # PIL errors, bad UTF-8, bad JSON, decompression bombs
        raise SampleError(f"{type(e).__name__}: {e}") from None


@dataclass
class Collate:
    """Decoded samples -> a batch: images (B, 3, S, S) or frozen features, captions (B, k, T) token ids,
    references (all captions of each image), image_ids."""

    vocab: Vocabulary
    max_length: int
    captions_per_image: int

    def __call__(self, samples: list[dict], rng: random.Random | None) -> dict:
        k = self.captions_per_image
        chosen = []
        for s in samples:
            caps = s["captions"]
            if rng is None:  # evaluation: the first k, repeated when there are fewer
                chosen.append([caps[i % len(caps)] for i in range(k)])
            elif len(caps) >= k:
                chosen.append(rng.sample(caps, k))
            else:
                chosen.append([rng.choice(caps) for _ in range(k)])
        encoded = [self.vocab.encode(c, self.max_length) for caps in chosen for c in caps]
        batch = {
            "captions": pad_captions(encoded, self.vocab.pad).view(len(samples), k, -1),  # (B, k, T)
            "references": [s["captions"] for s in samples],
            "image_ids": [s["image_id"] for s in samples],
        }
        if any("jpeg" in s for s in samples):
            batch["jpegs"] = pack_jpegs(samples)
            return batch
        key = "frozen" if "frozen" in samples[0] else "images"
        batch[key] = torch.stack([s[key] for s in samples])  # (B, 3, S, S) uint8 or (B, C, h, w)
        return batch


def pack_jpegs(samples: list[dict]) -> dict:
    """A batch's images as a few tensors (one shared-memory handle each on the way from a worker):
    every JPEG's bytes end to end, where each ends (an empty slice: decoded by the worker), crop
    boxes, and the worker-decoded images in order."""
    data = [s["jpeg"]["bytes"] if "jpeg" in s else torch.empty(0, dtype=torch.uint8) for s in samples]
    size = next(s["jpeg"]["box"][4] for s in samples if "jpeg" in s)
    return {"bytes": torch.cat(data), "ends": torch.tensor([len(d) for d in data]).cumsum(0),
            "boxes": torch.stack([s["jpeg"]["box"] if "jpeg" in s else torch.zeros(5, dtype=torch.long) for s in samples]),
            "decoded": torch.stack([s["images"] for s in samples if "images" in s] or
                                   [torch.zeros(3, int(size), int(size), dtype=torch.uint8)])}


def decode_jpegs(batch: dict, device) -> torch.Tensor:
    """The images of a batch from pack_jpegs, decoded on the device: (B', 3, S, S) uint8. A JPEG the
    device refuses is decoded here by PIL; one that PIL refuses too is dropped with its captions (from
    every field of `batch`) and counted in batch["skipped"], as a worker would have skipped it."""
    packed = batch.pop("jpegs")
    if torch.device(device).type == "cuda":  # nvJPEG's output may be memory that work queued on this stream
        torch.cuda.current_stream(device).synchronize()  # still reads: it does not wait (pytorch/vision#9606)
    ends = packed["ends"].tolist()
    starts = [0] + ends[:-1]
    on_device = [i for i in range(len(ends)) if ends[i] > starts[i]]
    jpegs = [packed["bytes"][starts[i]:ends[i]] for i in on_device]
    try:
        images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad JPEG fails the whole call: decode them one by one
        images = [_decode_one(jpeg, device) for jpeg in jpegs]
    decoded = dict(zip(on_device, images))
    worker_decoded = iter(packed["decoded"])
    out, keep = [], []
    for i, (w, h, left, top, size) in enumerate(packed["boxes"].tolist()):
        if i not in decoded:
            image = next(worker_decoded).to(device, non_blocking=True)
        elif decoded[i] is not None:
            image = F.resize(decoded[i], [h, w], antialias=True) if decoded[i].shape[1:] != (h, w) else decoded[i]
            image = image[:, top:top + size, left:left + size]
        else:
            try:
                jpeg = Image.open(io.BytesIO(packed["bytes"][starts[i]:ends[i]].numpy().tobytes())).convert("RGB")
                image = place(jpeg, (w, h, left, top), size).to(device)
            except Exception as e:  # what a worker's decode would have skipped
                log.warning("skipping sample %s: its JPEG decodes neither on %s nor with PIL: %s",
                            batch["image_ids"][i], device, e)
                continue
        out.append(image)
        keep.append(i)
    if not keep:
        raise DataError(f"no image of a training batch could be decoded: {batch['image_ids']}")
    if len(keep) < len(ends):
        batch["skipped"] += len(ends) - len(keep)
        batch["captions"] = batch["captions"][keep]
        for key in ("references", "image_ids"):
            batch[key] = [batch[key][i] for i in keep]
    return torch.stack(out)


def _decode_one(jpeg: torch.Tensor, device) -> torch.Tensor | None:
    try:
        return decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def model_inputs(batch: dict, device) -> dict:
    """The encoder input of a batch, on the device: {"images": ...} or {"frozen": ...}. Call it before
    reading the batch's captions: decoding on the device may drop samples (decode_jpegs)."""
    if "jpegs" in batch:
        return {"images": decode_jpegs(batch, device)}
    key = "frozen" if "frozen" in batch else "images"
    return {key: batch[key].to(device, non_blocking=True)}


# ---------------------------------------------------------------------------------------- the streams

def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _seeded(*parts) -> random.Random:
    return random.Random("-".join(map(str, parts)))


class _SkipCounter:
    """Counts samples dropped by a handler or by decoding, so each batch can report them, and the
    samples decoded, so TrainStream can tell a pass over its shards that yields none."""

    def __init__(self):
        self.skipped = 0
        self.decoded = 0

    def handler(self, exn: Exception) -> bool:
        self.skipped += 1
        log.warning("skipping unreadable data: %s", exn)
        return True

    def take(self) -> int:
        n, self.skipped = self.skipped, 0
        return n


def _batches(samples, decode, collate, batch_size: int, counter: _SkipCounter, rng):
    batch = []
    for sample in samples:
        try:
            batch.append(decode(sample))
        except SampleError as e:
            counter.skipped += 1
            log.warning("skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), e)
            continue
        counter.decoded += 1
        if len(batch) == batch_size:
            out = collate(batch, rng)
            out["skipped"] = counter.take()
            yield out
            batch = []
    if batch:
        out = collate(batch, rng)
        out["skipped"] = counter.take()
        yield out


@dataclass
class TrainStream(IterableDataset):
    """Exactly `num_batches` batches for this rank in each of `epochs` epochs from `epoch` on, minus the
    `skip` of the first epoch already trained on. One loader serves every epoch, so its data workers
    start once per run, not once per epoch."""

    shards: list[str]
    collate: Collate
    rank: int
    world_size: int
    epoch: int
    seed: int
    num_batches: int
    skip: int
    batch_size: int
    image_size: int
    random_crop: bool
    shuffle_buffer: int
    jpeg_on_device: bool = False
    epochs: int = 1

    def __iter__(self):
        slot, workers = _worker()
        handed_out = 0
        for epoch in range(self.epoch, self.epoch + self.epochs):
            skip = min(self.skip, self.num_batches) if epoch == self.epoch else 0  # resumed with fewer batches per epoch
            # DataLoader takes its batch g from worker slot g % workers. Worker w of an epoch makes the
            # epoch's batches w, w + workers, ...; the epoch's batch `skip` is the loader's batch
            # `handed_out`, so slot s plays worker (s - handed_out + skip) % workers.
            yield from self._epoch(epoch, skip, (slot - handed_out + skip) % workers, workers)
            handed_out += self.num_batches - skip

    def _epoch(self, epoch: int, skip: int, worker: int, workers: int):
        mine = len(range(worker, self.num_batches, workers))
        done = len(range(worker, skip, workers))
        rng = _seeded(self.seed, epoch, self.rank, worker)
        counter = _SkipCounter()
        decode_rng = rng if self.random_crop else None
        batches = _batches(self._samples(epoch, worker, workers, rng, counter),
                           lambda s: decode_sample(s, self.image_size, decode_rng, self.jpeg_on_device), self.collate,
                           self.batch_size, counter, rng)
        for i, batch in enumerate(itertools.islice(batches, mine)):
            if i >= done:
                yield batch

    def _samples(self, epoch: int, worker: int, workers: int, rng: random.Random, counter: _SkipCounter):
        """This worker's shards (split by node, then by worker), shuffled; read again in a new order
        while it still owes batches. Each pass is shuffled on its own, so a sample repeats within an
        epoch only when the worker's shards hold fewer samples than its share of the epoch."""
        order = list(self.shards)
        _seeded(self.seed, epoch).shuffle(order)
        mine = order[self.rank :: self.world_size][worker::workers]
        for repeat in itertools.count():
            if repeat:
                _seeded(self.seed, epoch, self.rank, worker, repeat).shuffle(mine)
            decoded, skipped = counter.decoded, counter.skipped
            yield from wds.DataPipeline(lambda: ({"url": u} for u in mine),
                                        wds.tarfile_to_samples(handler=counter.handler),
                                        wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
            if counter.decoded == decoded:  # every sample yielded has been decoded (or skipped) by now
                raise DataError(f"no usable sample in {', '.join(mine)}: {counter.skipped - skipped} skipped "
                                "(the warnings above say why); remove or rebuild these shards")


@dataclass
class EvalStream(IterableDataset):
    """Every sample of the split once across all ranks and workers, in shard order, center-cropped."""

    shards: list[str]
    collate: Collate
    rank: int
    world_size: int
    batch_size: int
    image_size: int
    max_images: int

    def __iter__(self):
        worker, workers = _worker()
        part, parts = self.rank * workers + worker, self.world_size * workers
        counter = _SkipCounter()
        samples = wds.DataPipeline(lambda: ({"url": u} for u in self.shards),
                                   wds.tarfile_to_samples(handler=counter.handler))
        samples = itertools.islice(samples, self.max_images or None)
        mine = (s for i, s in enumerate(samples) if i % parts == part)
        yield from _batches(mine, lambda s: decode_sample(s, self.image_size, None), self.collate,
                            self.batch_size, counter, None)


def _quiet_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from this generator, not from torch's global one, so
    making a loader (at an epoch start, or on resume mid-epoch) leaves the training RNG untouched.
    imcap's own streams seed themselves from (seed, epoch, rank, worker)."""
    return torch.Generator().manual_seed(0)


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int, grad_accum_steps: int) -> int:
    """Batches each rank trains on per epoch: whole optimizer steps over the samples, no sample counted twice."""
    steps = num_samples // (batch_size * world_size * grad_accum_steps)
    if steps == 0:
        raise DataError(f"{num_samples} training samples are fewer than one optimizer step needs "
                        f"(batch {batch_size} x {world_size} processes x {grad_accum_steps} accumulation)")
    return steps * grad_accum_steps


def train_loader(shards: list[str], collate: Collate, *, rank: int, world_size: int, epoch: int, seed: int,
                 num_batches: int, skip: int, batch_size: int, image_size: int, random_crop: bool,
                 shuffle_buffer: int, num_workers: int, jpeg_on_device: bool = False, epochs: int = 1) -> DataLoader:
    if len(shards) < world_size * max(1, num_workers):
        raise DataError(
            f"{len(shards)} training shards cannot feed {world_size} processes x {max(1, num_workers)} data "
            f"workers (each needs at least one shard): write more, smaller shards (`imcap shards build "
            f"--shard-size`), or lower data.num_workers to {max(0, len(shards) // world_size)}")
    stream = TrainStream(shards, collate, rank, world_size, epoch, seed, num_batches, skip, batch_size,
                         image_size, random_crop, shuffle_buffer, jpeg_on_device, epochs)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if num_workers else None, generator=_quiet_generator())


def eval_loader(shards: list[str], collate: Collate, *, rank: int, world_size: int, batch_size: int,
                image_size: int, max_images: int, num_workers: int) -> DataLoader:
    stream = EvalStream(shards, collate, rank, world_size, batch_size, image_size, max_images)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      generator=_quiet_generator())


def split_captions(shards: list[str]) -> list[str]:
    """Every caption of these shards, reading only their text members (no image is decoded)."""
    captions = []
    for shard in shards:
        texts: dict[str, dict] = {}
        for name, data in iter_tar_members(shard):
            key, _, ext = name.partition(".")
            if ext in ("json", "txt"):
                texts.setdefault(key, {})[ext] = data
        for key, sample in texts.items():
            try:
                captions.extend(sample_captions(sample))
            except (SampleError, ValueError):
                pass  # counted when the pipeline reaches it
    return captions
