"""A run's data as the trainer sees it: the shards of its train and val splits, the number of train
samples, the vocabulary, and the train loader. Knows nothing of models."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader
from webdataset.handlers import reraise_exception

from imcap.checkpoint import TrainState
from imcap.config import Config
from imcap.data import demo
from imcap.data.batch import Collate
from imcap.data.samples import SampleError, sample_captions
from imcap.data.shards import beside, count_samples, is_url, list_shards, member_key, read_location, read_samples
from imcap.data.streams import Part, TrainStream, train_loader
from imcap.text import VOCAB_FILE, Vocabulary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingData:
    cfg: Config
    vocab: Vocabulary
    train_shards: list[str]
    val_shards: list[str]
    num_train_samples: int

    @property
    def collate(self) -> Collate:
        return Collate(self.vocab, self.cfg.text.max_length, self.cfg.data.captions_per_image)

    def train_workers(self, world_size: int) -> int:
        """Data workers per process: each needs shards of its own. The data order depends on it."""
        return min(self.cfg.data.num_workers, len(self.train_shards) // world_size)

    def train_loader(self, part: Part, state: TrainState, num_batches: int) -> DataLoader:
        """num_batches per epoch for this process, from the state's epoch (less the batches of it already
        trained on, each data worker resuming where the state says) to the last of train.epochs."""
        configured, shards = self.cfg.data.num_workers, len(self.train_shards)
        workers = self.train_workers(part.world_size)
        if workers < configured:
            log.warning(
                "data.num_workers=%d, but %d train shards feed only %d workers in each of %d processes: "
                "using %d (write smaller shards for more)",
                configured,
                shards,
                workers,
                part.world_size,
                workers,
            )
        stream = TrainStream(
            self.train_shards,
            self.collate,
            self.cfg.data,
            self.cfg.train.seed,
            part,
            range(state.epoch, self.cfg.train.epochs),
            state.batches_in_epoch,
            num_batches,
            dict(state.samples_read),
        )
        return train_loader(stream, workers)

    def with_shards(self, source: str) -> TrainingData:
        """The same data read from other shards of the same splits (a feature cache)."""
        d = self.cfg.data
        return TrainingData(
            self.cfg,
            self.vocab,
            list_shards(source, d.train_split),
            list_shards(source, d.val_split),
            self.num_train_samples,
        )


def split_references(shards: list[str]) -> list[list[str]]:
    """Every sample's captions, reading only the shards' text members (no image is decoded)."""
    references = []
    for sample in read_samples(shards, handler=reraise_exception, select_files=_is_text):
        try:
            references.append(sample_captions(sample))
        except (SampleError, ValueError):
            pass  # counted when the streams reach it
    return references


def split_captions(shards: list[str]) -> list[str]:
    return [caption for captions in split_references(shards) for caption in captions]


def _is_text(member: str) -> bool:
    return (member_key(member)[1] or "").lower() in ("json", "txt")


def load_vocabulary(train_shards: list[str], min_word_count: int) -> Vocabulary:
    """The vocabulary saved beside the shards if it was built with this min_word_count; else built
    from the train split's captions (text members only, no image decoded)."""
    saved = beside(train_shards[0], VOCAB_FILE)
    vocab = _saved_vocabulary(saved)
    if vocab is not None:
        if vocab.min_word_count == min_word_count:
            return vocab
        log.info(
            "%s was built with min_word_count %d, not %d: building the vocabulary from the train split",
            saved,
            vocab.min_word_count,
            min_word_count,
        )
    return Vocabulary.build(split_captions(train_shards), min_word_count)


def _saved_vocabulary(saved: str) -> Vocabulary | None:
    """The vocab.json at `saved`, if there is one: on a local disk, if the file exists; at a URL, if it
    can be fetched (a server cannot tell "none" apart from other failures, so the log says which it was)."""
    if not is_url(saved):
        return Vocabulary.load(Path(saved)) if Path(saved).exists() else None
    try:
        return Vocabulary.from_json(read_location(saved).decode(), source=saved)
    except OSError as e:
        log.info("no vocabulary read from %s (%s): building it from the train split", saved, e)
        return None


def prepare_data(cfg: Config, accelerator) -> TrainingData:
    """The run's splits and vocabulary; the demo set is built first where the config asks for it (on a
    disk: shards at a URL are read as they are)."""
    d = cfg.data
    if d.demo and not is_url(d.shards):
        with accelerator.main_process_first():  # one process writes, the others wait and then read
            if not demo.demo_exists(d.shards):
                log.info("building the demo dataset in %s", d.shards)
                demo.build_demo(d.shards, image_size=d.image_size, min_word_count=cfg.text.min_word_count)
    train_shards, val_shards = list_shards(d.shards, d.train_split), list_shards(d.shards, d.val_split)
    vocab = load_vocabulary(train_shards, cfg.text.min_word_count)
    return TrainingData(cfg, vocab, train_shards, val_shards, count_samples(train_shards))
