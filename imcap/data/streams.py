"""The train and eval streams: lists of named stages from shards to batches.

Training, per epoch (every stage a pure function of seed, epoch, rank and worker):

    shard order(seed, epoch) -> this node's shards -> this worker's shards -> passes over them
    (shuffle order, drawn on positions -> the shards still due, fetched with retries and checked
    against sizes.json -> in that order) -> decode + crop (an RNG per sample) -> collate -> this
    worker's batches of the epoch

Every rank yields the same number of batches per epoch, computed from sizes.json, and each worker
yields its share of them (a worker whose shards run out reads them again), so no rank waits for
another at the end of an epoch. A batch says how far its worker's stream is read; resumed there, a
worker draws the same order without reading anything, fetches only the shards that still hold
samples due, and drops the trained samples they hold as they are read, undecoded. One loader runs through all of a run's
epochs: its data workers start once.

Evaluation reads every shard of the split in order; each rank (and worker) keeps every
(world * workers)-th sample, so the split is covered exactly once whatever its size.
"""

from __future__ import annotations

import itertools
import logging
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imcap.config import DataConfig
from imcap.data.batch import Batch, Collate, StreamPosition
from imcap.data.samples import Sample, SampleError, decode_sample
from imcap.data.shards import (
    SIZES_FILE,
    DataError,
    beside,
    collecting,
    failure_reason,
    is_url,
    known_sizes,
    read_samples,
    recorded_sizes,
)

log = logging.getLogger(__name__)

# The version of an epoch's order, saved in checkpoints: a run resumed from a checkpoint of another version
# cannot continue its epoch exactly. 2: shuffles drawn on positions, a random generator per sample.
DATA_ORDER = 2

Fetched = tuple[str, int, dict | None]  # (shard, index in it, raw sample or None where it could not be read)
Raw = tuple[int, dict | None]  # (index in a stream, raw sample or None)
Decoded = tuple[int, Sample, random.Random | None]  # (index in a stream, sample, the RNG of its crop and captions)


@dataclass(frozen=True)
class Part:
    """Which share of the data a process reads."""

    rank: int = 0
    world_size: int = 1


class SkipCounter:
    """Samples dropped (lost with their shard, or undecodable), reported with the next batch; and samples
    decoded, so that a pass over shards that yields none is told apart."""

    def __init__(self):
        self.skipped = 0
        self.decoded = 0

    def take(self) -> int:
        n, self.skipped = self.skipped, 0
        return n


# ------------------------------------------------------------------------------------------- stages


def fetched(shards: list[str], recorded: dict[str, int | None], attempts: int) -> Iterator[Fetched]:
    """(shard, index in it, raw sample or None) for every sample of these shards, in order. A shard at a
    URL that cannot be read to its end (a dropped transfer, a server's 503) is read again from its start,
    `attempts` times in all, and what an earlier read delivered is dropped; then each sample it has left
    is a None and a warning names the shard. The last sample before a failure is read again: the cut
    may have split it. Read to its end, a shard must hold the samples sizes.json records (if it records them): epochs
    are as long as sizes.json says, so a count too small would leave samples untrained every epoch, one
    too large would repeat others."""
    for shard in shards:
        yield from _fetched_shard(shard, recorded[shard], attempts if is_url(shard) else 1)


def _fetched_shard(shard: str, recorded: int | None, attempts: int) -> Iterator[Fetched]:
    delivered = 0  # samples of the shard yielded so far, by this read or earlier ones
    for attempt in range(1, attempts + 1):
        failures = []
        pending = None  # the last sample read: a transfer may have been cut inside it
        samples = enumerate(read_samples([shard], handler=collecting(failures)))
        for index, sample in samples:
            if recorded is not None and index >= recorded:
                _size_error(shard, recorded, index + 1 + sum(1 for _ in samples))
            if pending is not None:
                yield pending
                delivered += 1
            pending = (shard, index, sample) if index >= delivered else None
        if not failures:
            if pending is not None:
                yield pending
                delivered += 1
            if recorded is None or delivered == recorded:
                return
            if attempt == attempts:  # read as often as asked, it holds fewer: sizes.json or a cut at a header
                _size_error(shard, recorded, delivered)
            failures.append(DataError(f"the tar ended after {delivered} of {recorded} samples"))
        why = failure_reason(failures[-1])
        if attempt < attempts:
            log.warning("reading %s failed after %d samples (%s): reading it again", shard, delivered, why)
            time.sleep(0.5 * 2 ** (attempt - 1))
    lost = "the rest" if recorded is None else f"{recorded - delivered} samples"
    log.warning("skipping %s of %s: %d read(s) failed, the last with %s", lost, shard, attempts, why)
    for index in range(delivered, recorded or delivered):
        yield shard, index, None


def _size_error(shard: str, recorded: int, read: int) -> None:
    sizes = beside(shard, SIZES_FILE)
    raise DataError(
        f"{shard}: {sizes} records {recorded} samples, but reading it gave {read}"
        f"{' (or the shard is cut short)' if read < recorded else ''}, so every epoch would "
        f"{'repeat samples' if read < recorded else 'leave samples untrained'} and an evaluation would count "
        "wrong; count them again with `imcap shards check --fix-sizes` on a local copy (it also names any it "
        "cannot read)"
    )


@dataclass(frozen=True)
class PassOrder:
    """The order in which webdataset's shuffle buffer yields the samples of one pass over a worker's
    shards, by their positions in the pass (its shards end to end), drawn with nothing read: the same draws
    as shuffling the samples themselves."""

    order: np.ndarray  # (n,) int64: turn -> position
    turn: np.ndarray  # (n,) int64: position -> turn

    @classmethod
    def shuffled(cls, length: int, buffer: int, rng: random.Random) -> PassOrder:
        order = np.fromiter(wds.shuffle(buffer, initial=buffer, rng=rng)(iter(range(length))), np.int64, length)
        turn = np.empty_like(order)
        turn[order] = np.arange(length)
        return cls(order, turn)

    def any_due(self, positions: range, start: int) -> bool:
        """Whether any of these positions has its turn at or after `start`."""
        return len(positions) > 0 and int(self.turn[positions.start : positions.stop].max()) >= start


def in_order(samples: Iterator[tuple[int, dict | None]], order: PassOrder, start: int) -> Iterator[Raw]:
    """(turn, raw sample) for the samples (position, raw) whose turns are start, start + 1, ...: each is
    held from when it is read until its turn, so no more are held than the shuffle buffer would hold; one
    whose turn is before `start` (trained on before a resume) is dropped as it is read, not decoded."""
    held = {}
    for t in range(start, len(order.order)):
        wanted = int(order.order[t])  # not .tolist(): a Python int each for a whole pass is what numpy saves
        while wanted not in held:  # every sample of a shard read arrives, a lost one as None
            position, sample = next(samples, (None, None))
            if position is None:
                raise DataError(f"sample {wanted} of a pass over shards never arrived: a bug, please report it")
            if order.turn[position] >= start:
                held[position] = sample
        yield t, held.pop(wanted)


def decoded(
    samples: Iterator[Raw],
    decode: Callable[[dict, random.Random | None], Sample],
    rng_of: Callable[[int], random.Random | None],
    counter: SkipCounter,
) -> Iterator[Decoded]:
    """(index, decoded sample, its RNG) for each (index, raw sample): the RNG, rng_of(index), places the
    sample's crop and picks its captions, so that its draws do not depend on the samples before it. A
    sample that cannot be used is skipped, counted and logged with its shard and key; a lost one (None)
    is counted (fetched() logged it)."""
    for index, sample in samples:
        if sample is None:
            counter.skipped += 1
            continue
        rng = rng_of(index)
        try:
            decoded_sample = decode(sample, rng)
        except SampleError as e:
            counter.skipped += 1
            log.warning("skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), e)
            continue
        counter.decoded += 1
        yield index, decoded_sample, rng


def batched(
    samples: Iterator[Decoded], collate: Collate, batch_size: int, counter: SkipCounter, worker: int | None = None
) -> Iterator[Batch]:
    """Batches of batch_size samples (the last one may be short), each with the skips since the previous
    and, for a training worker's stream, how far the stream is read through its last sample."""
    for chunk in iter(lambda: list(itertools.islice(samples, batch_size)), []):
        indices, chunk_samples, rngs = zip(*chunk)
        position = None if worker is None else StreamPosition(worker, indices[-1] + 1)
        yield replace(collate(list(chunk_samples), list(rngs)), skipped=counter.take(), position=position)


# ------------------------------------------------------------------------------------------- streams


@dataclass
class TrainStream(IterableDataset):
    """Exactly `num_batches` batches for this rank in each epoch of `epochs`, minus the `skip` of the
    first epoch already trained on. One loader serves every epoch, so its data workers start once per
    run, not once per epoch. Where each data worker resumes its stream of the first epoch is
    `samples_read[worker]` (StreamPosition.samples_read of its last trained batch) when known, else
    after `skip` batches' worth of samples."""

    shards: list[str]
    collate: Collate
    cfg: DataConfig
    seed: int
    part: Part
    epochs: range
    skip: int
    num_batches: int
    samples_read: dict[int, int] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Batch]:
        slot, workers = _worker()
        recorded = recorded_sizes(self.shards)  # once per worker and run, not per epoch
        handed_out = 0
        for epoch in self.epochs:
            first = epoch == self.epochs.start
            # resumed with fewer batches per epoch: nothing of this epoch is left
            skip = min(self.skip, self.num_batches) if first else 0
            # DataLoader takes its batch g from worker slot g % workers. Worker w of an epoch makes the
            # epoch's batches w, w + workers, ...; the epoch's batch `skip` is the loader's batch
            # `handed_out`, so slot s plays worker (s - handed_out + skip) % workers.
            worker = (slot - handed_out + skip) % workers
            done = len(range(worker, skip, workers))
            start = self.samples_read.get(worker, done * self.cfg.batch_size) if first and done else 0
            yield from self._epoch(recorded, epoch, worker, workers, done, start)
            handed_out += self.num_batches - skip

    def _epoch(
        self, recorded: dict[str, int], epoch: int, worker: int, workers: int, done: int, start: int
    ) -> Iterator[Batch]:
        """Worker `worker`'s batches of the epoch after the `done` it trained, its stream read from `start`."""
        rank, counter = self.part.rank, SkipCounter()
        shards = list(self.shards)
        _seeded(self.seed, epoch).shuffle(shards)  # the same order on every rank
        mine = shards[rank :: self.part.world_size][worker::workers]
        crop, jpeg_on_device = self.cfg.train_crop == "random", self.cfg.jpeg_decode == "device"

        def decode(sample: dict, rng: random.Random) -> Sample:
            return decode_sample(sample, self.cfg.image_size, rng if crop else None, jpeg_on_device)

        def rng_of(index: int) -> random.Random:
            return _seeded(self.seed, epoch, rank, worker, "sample", index)

        samples = decoded(self._passes(mine, recorded, epoch, worker, start, counter), decode, rng_of, counter)
        batches = batched(samples, self.collate, self.cfg.batch_size, counter, worker)
        return itertools.islice(batches, len(range(worker, self.num_batches, workers)) - done)

    def _passes(
        self, shards: list[str], recorded: dict[str, int], epoch: int, worker: int, start: int, counter: SkipCounter
    ) -> Iterator[Raw]:
        """(index in this worker's stream of the epoch, raw sample or None) from `start` on: passes over the
        worker's shards, each in a new order and through its own shuffle buffer, for as long as the worker
        owes batches. A sample repeats within an epoch only when the worker's shards hold fewer samples
        than its share of the epoch. Resumed, a pass wholly trained on is not read, and of the pass resumed
        in only the shards that hold samples still to train on."""
        length = sum(recorded[s] for s in shards)
        if length == 0:
            raise DataError(f"no samples in {', '.join(shards)}: {SIZES_FILE} records none; remove these shards")
        for repeat in itertools.count():
            if repeat:
                _seeded(self.seed, epoch, self.part.rank, worker, repeat).shuffle(shards)
            first = repeat * length  # the stream index of this pass's first sample
            if first + length <= start:
                continue
            begin = max(0, start - first)
            rng = _seeded(self.seed, epoch, self.part.rank, worker, "shuffle", repeat)
            order = PassOrder.shuffled(length, self.cfg.shuffle_buffer, rng)
            starts = itertools.accumulate((recorded[s] for s in shards), initial=0)
            spans = [range(at, at + recorded[s]) for s, at in zip(shards, starts)]  # by index: a shard may repeat
            needed = [i for i, span in enumerate(spans) if order.any_due(span, begin)]
            positions = (
                (spans[i].start + index, sample)
                for i in needed
                for _, index, sample in fetched([shards[i]], recorded, self.cfg.read_attempts)
            )
            decoded_before, skipped_before = counter.decoded, counter.skipped
            for turn, sample in in_order(positions, order, begin):
                yield first + turn, sample
            if begin == 0 and counter.decoded == decoded_before:  # all it yielded is decoded (or skipped) by now
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
    read_attempts: int = 1  # of a shard at a URL (data.read_attempts)

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        share, shares = self.part.rank * workers + worker, self.part.world_size * workers
        counter = SkipCounter()
        samples = fetched(self.shards, known_sizes(self.shards), self.read_attempts)
        samples = itertools.islice(enumerate(sample for _, _, sample in samples), self.max_images or None)
        samples = ((i, s) for i, s in samples if i % shares == share)
        samples = decoded(samples, lambda s, _: decode_sample(s, self.image_size, None), lambda _: None, counter)
        return batched(samples, self.collate, self.batch_size, counter)


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
