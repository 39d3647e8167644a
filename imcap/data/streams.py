"""The train and eval streams: lists of named stages from shards to batches.

Training, per epoch (every stage a pure function of seed, epoch, rank and worker):

    shard order(seed, epoch) -> this node's shards -> this worker's shards -> passes over them
    (tar -> samples, counted against sizes.json -> shuffle buffer) -> decode + crop -> collate -> this
    worker's batches of the epoch

Every rank yields the same number of batches per epoch, computed from sizes.json, and each worker
yields its share of them (a worker whose shards run out reads them again), so no rank waits for
another at the end of an epoch. Resuming inside an epoch replays the same order and drops the
batches already trained on. One loader runs through all of a run's epochs: its data workers start once.

Evaluation reads every shard of the split in order; each rank (and worker) keeps every
(world * workers)-th sample, so the split is covered exactly once whatever its size.
"""

from __future__ import annotations

import itertools
import logging
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imcap.config import DataConfig
from imcap.data.batch import Batch, Collate
from imcap.data.samples import Sample, SampleError, decode_sample
from imcap.data.shards import SIZES_FILE, DataError, read_samples, recorded_sizes, split_location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """Which share of the data a process reads."""

    rank: int = 0
    world_size: int = 1


class SkipCounter:
    """Samples dropped by the tar reader or by decoding, reported with the next batch; and samples
    decoded, so that a pass over shards that yields none is told apart."""

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


# ------------------------------------------------------------------------------------------- stages


def tar_samples(shards: list[str], counter: SkipCounter) -> Iterator[dict]:
    """Raw samples of these shards, in order; an unreadable member or tar is skipped and counted."""
    return read_samples(shards, handler=counter.handler)


def as_recorded(samples: Iterator[dict], shards: list[str], recorded: dict[str, int]) -> Iterator[dict]:
    """The samples of one pass over these shards, unchanged. Each shard, once read to its end, must have
    held the samples sizes.json records for it: epochs are as long as sizes.json says, so a count too small
    would leave samples untrained every epoch and one too large would repeat others."""
    read = dict.fromkeys(shards, 0)
    current = None
    for sample in samples:
        if sample["__url__"] != current:
            if current is not None:  # the reader has moved on to the next shard: this one is done
                _check_size(current, read[current], recorded[current])
            current = sample["__url__"]
        read[current] += 1
        yield sample
    for shard in shards:  # the last one, and any that yielded nothing
        _check_size(shard, read[shard], recorded[shard])


def _check_size(shard: str, read: int, recorded: int) -> None:
    if read != recorded:
        directory = split_location(shard)[0]
        raise DataError(
            f"{shard}: {directory}/{SIZES_FILE} records {recorded} samples, but reading it gave {read}, so every "
            f"epoch would {'repeat samples' if read < recorded else 'leave samples untrained'}; count them again "
            f"with `imcap shards check --fix-sizes {directory}` (it also names any it cannot read)"
        )


def decoded(samples: Iterator[dict], decode: Callable[[dict], Sample], counter: SkipCounter) -> Iterator[Sample]:
    """Decoded samples; one that cannot be used is skipped, counted and logged with its shard and key."""
    for sample in samples:
        try:
            decoded_sample = decode(sample)
        except SampleError as e:
            counter.skipped += 1
            log.warning("skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), e)
            continue
        counter.decoded += 1
        yield decoded_sample


def batched(
    samples: Iterator[Sample], collate: Collate, batch_size: int, counter: SkipCounter, rng: random.Random | None
) -> Iterator[Batch]:
    """Batches of batch_size samples (the last one may be short), each with the skips since the previous."""
    for chunk in iter(lambda: list(itertools.islice(samples, batch_size)), []):
        yield replace(collate(chunk, rng), skipped=counter.take())


# ------------------------------------------------------------------------------------------- streams


@dataclass
class TrainStream(IterableDataset):
    """Exactly `num_batches` batches for this rank in each epoch of `epochs`, minus the `skip` of the
    first epoch already trained on. One loader serves every epoch, so its data workers start once per
    run, not once per epoch."""

    shards: list[str]
    collate: Collate
    cfg: DataConfig
    seed: int
    part: Part
    epochs: range
    skip: int
    num_batches: int

    def __iter__(self) -> Iterator[Batch]:
        slot, workers = _worker()
        handed_out = 0
        for epoch in self.epochs:
            # resumed with fewer batches per epoch: nothing of this epoch is left
            skip = min(self.skip, self.num_batches) if epoch == self.epochs.start else 0
            # DataLoader takes its batch g from worker slot g % workers. Worker w of an epoch makes the
            # epoch's batches w, w + workers, ...; the epoch's batch `skip` is the loader's batch
            # `handed_out`, so slot s plays worker (s - handed_out + skip) % workers.
            yield from self._epoch(epoch, skip, (slot - handed_out + skip) % workers, workers)
            handed_out += self.num_batches - skip

    def _epoch(self, epoch: int, skip: int, worker: int, workers: int) -> Iterator[Batch]:
        rng = _seeded(self.seed, epoch, self.part.rank, worker)
        counter = SkipCounter()
        crop_rng = rng if self.cfg.train_crop == "random" else None
        jpeg_on_device = self.cfg.jpeg_decode == "device"
        shards = list(self.shards)
        _seeded(self.seed, epoch).shuffle(shards)  # the same order on every rank
        mine = shards[self.part.rank :: self.part.world_size][worker::workers]
        samples = self._passes(mine, epoch, worker, rng, counter)
        samples = decoded(samples, lambda s: decode_sample(s, self.cfg.image_size, crop_rng, jpeg_on_device), counter)
        batches = batched(samples, self.collate, self.cfg.batch_size, counter, rng)
        owed = len(range(worker, self.num_batches, workers))
        done = len(range(worker, skip, workers))
        return itertools.islice(batches, done, owed)

    def _passes(
        self, shards: list[str], epoch: int, worker: int, rng: random.Random, counter: SkipCounter
    ) -> Iterator[dict]:
        """Passes over this worker's shards, each in a new order and through its own shuffle buffer,
        for as long as the worker owes batches: a sample repeats within an epoch only when the worker's
        shards hold fewer samples than its share of the epoch. Each shard read to its end is checked
        against sizes.json."""
        for repeat in itertools.count():
            if repeat:
                _seeded(self.seed, epoch, self.part.rank, worker, repeat).shuffle(shards)
            decoded_before, skipped_before = counter.decoded, counter.skipped
            buffer = self.cfg.shuffle_buffer
            samples = as_recorded(tar_samples(shards, counter), shards, recorded_sizes(shards))
            yield from wds.shuffle(buffer, initial=buffer, rng=rng)(samples)
            if counter.decoded == decoded_before:  # every sample yielded has been decoded (or skipped) by now
                raise DataError(
                    f"no usable sample in {', '.join(shards)}: {counter.skipped - skipped_before} "
                    "skipped (the warnings above say why); remove or rebuild these shards"
                )


@dataclass
class EvalStream(IterableDataset):
    """Every sample of the split once across all ranks and workers, in shard order, center-cropped."""

    shards: list[str]
    collate: Collate
    part: Part
    batch_size: int
    image_size: int
    max_images: int = 0  # 0: every sample

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        share, shares = self.part.rank * workers + worker, self.part.world_size * workers
        counter = SkipCounter()
        samples = itertools.islice(tar_samples(self.shards, counter), self.max_images or None)
        samples = (s for i, s in enumerate(samples) if i % shares == share)
        samples = decoded(samples, lambda s: decode_sample(s, self.image_size, None), counter)
        return batched(samples, self.collate, self.batch_size, counter, None)


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int, grad_accum_steps: int) -> int:
    """Batches each rank trains on per epoch: whole optimizer steps over the samples, no sample counted twice."""
    steps = num_samples // (batch_size * world_size * grad_accum_steps)
    if steps == 0:
        raise DataError(
            f"{num_samples} training samples are fewer than one optimizer step needs "
            f"(batch {batch_size} x {world_size} processes x {grad_accum_steps} accumulation)"
        )
    return steps * grad_accum_steps


def train_loader(stream: TrainStream, num_workers: int) -> DataLoader:
    shards, world_size = len(stream.shards), stream.part.world_size
    if shards < world_size * max(1, num_workers):
        raise DataError(
            f"{shards} training shards cannot feed {world_size} processes x {max(1, num_workers)} data "
            f"workers (each needs at least one shard): write more, smaller shards (`imcap shards build "
            f"--shard-size`), or lower data.num_workers to {max(0, shards // world_size)}"
        )
    return _loader(stream, num_workers)


def eval_loader(stream: EvalStream, num_workers: int = 0) -> DataLoader:
    return _loader(stream, num_workers)


def _loader(stream: IterableDataset, num_workers: int) -> DataLoader:
    """A DataLoader of a stream's batches. It draws its workers' base seed from a generator of its own, not
    torch's global one, so making a loader (on resume mid-epoch too) leaves the training RNG untouched;
    the streams seed themselves from (seed, epoch, rank, worker)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers else None,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=_leave_ctrl_c_to_the_main_process,
    )


def _leave_ctrl_c_to_the_main_process(_worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: the main process stops the run (saving first),
    and its workers end with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _seeded(*parts) -> random.Random:
    return random.Random("-".join(map(str, parts)))
