"""A run's data as the trainer sees it: the shards of its train and val splits, the number of train
samples, the vocabulary, and the train loader. Knows nothing of models."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader
from webdataset.handlers import reraise_exception

from imcap.config import Config
from imcap.data import demo
from imcap.data.batch import Collate
from imcap.data.samples import SampleError, sample_captions
from imcap.data.shards import count_samples, is_url, list_shards, member_key, read_samples, read_url
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

    def train_loader(self, part: Part, first_epoch: int, skip: int, num_batches: int) -> DataLoader:
        """num_batches per epoch for this process, from first_epoch (less the `skip` already trained on of it)
        to the last of train.epochs."""
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
        epochs = range(first_epoch, self.cfg.train.epochs)
        stream = TrainStream(
            self.train_shards, self.collate, self.cfg.data, self.cfg.train.seed, part, epochs, skip, num_batches
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


def load_vocabulary(shards: str, train_shards: list[str], min_word_count: int) -> Vocabulary:
    """The vocabulary saved beside the shards if it was built with this min_word_count; else built
    from the train split's captions (text members only, no image decoded)."""
    vocab = _saved_vocabulary(shards)
    if vocab is not None:
        saved = f"{shards.rstrip('/')}/{VOCAB_FILE}"
        if vocab.min_word_count == min_word_count:
            return vocab
        log.info(
            "%s was built with min_word_count %d, not %d: building the vocabulary from the train split",
            saved,
            vocab.min_word_count,
            min_word_count,
        )
    return Vocabulary.build(split_captions(train_shards), min_word_count)


def _saved_vocabulary(shards: str) -> Vocabulary | None:
    """The vocab.json beside the shards (a local directory, or a URL of one), if there is one."""
    if is_url(shards):
        try:
            text = read_url(f"{shards.rstrip('/')}/{VOCAB_FILE}").decode()
        except (OSError, ValueError):
            return None
        return Vocabulary.from_json(text, source=f"{shards.rstrip('/')}/{VOCAB_FILE}")
    saved = Path(shards) / VOCAB_FILE
    return Vocabulary.load(saved) if saved.exists() else None


def prepare_data(cfg: Config, accelerator) -> TrainingData:
    """The run's splits and vocabulary; the demo set is built first where the config asks for it."""
    d = cfg.data
    if d.demo:
        with accelerator.main_process_first():  # one process writes, the others wait and then read
            if not demo.demo_exists(d.shards):
                log.info("building the demo dataset in %s", d.shards)
                demo.build_demo(d.shards, image_size=d.image_size, min_word_count=cfg.text.min_word_count)
    train_shards, val_shards = list_shards(d.shards, d.train_split), list_shards(d.shards, d.val_split)
    vocab = load_vocabulary(d.shards, train_shards, cfg.text.min_word_count)
    return TrainingData(cfg, vocab, train_shards, val_shards, count_samples(train_shards))
