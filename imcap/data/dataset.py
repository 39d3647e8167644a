"""A captioning dataset as the trainer sees it: shards of a train and a val split, their sample count,
the vocabulary, and loaders. Knows nothing of models, except that it can swap in a feature cache."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from imcap.config import Config
from imcap.data import demo
from imcap.data.pipeline import Collate, count_samples, list_shards, split_captions, train_loader
from imcap.text import VOCAB_FILE, Vocabulary

log = logging.getLogger(__name__)


@dataclass
class CaptionData:
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

    def train_loader(self, *, epoch: int, skip: int, num_batches: int, rank: int, world_size: int, epochs: int = 1):
        d = self.cfg.data
        workers = self.train_workers(world_size)
        if workers < d.num_workers:
            log.warning("data.num_workers=%d, but %d train shards feed only %d workers in each of %d processes: "
                        "using %d (write smaller shards for more)", d.num_workers, len(self.train_shards),
                        workers, world_size, workers)
        return train_loader(self.train_shards, self.collate, rank=rank, world_size=world_size, epoch=epoch,
                            seed=self.cfg.train.seed, num_batches=num_batches, skip=skip, batch_size=d.batch_size,
                            image_size=d.image_size, random_crop=d.train_crop == "random",
                            shuffle_buffer=d.shuffle_buffer, num_workers=workers,
                            jpeg_on_device=d.jpeg_decode == "device", epochs=epochs)

    def with_shards(self, source: str) -> CaptionData:
        """The same dataset read from other shards of the same splits (a feature cache)."""
        d = self.cfg.data
        return CaptionData(self.cfg, self.vocab, list_shards(source, d.train_split), list_shards(source, d.val_split),
                           self.num_train_samples)


def load_vocabulary(shards: str, train_shards: list[str], min_word_count: int) -> Vocabulary:
    """The vocabulary saved beside the shards if it was built with this min_word_count; else built
    from the train split's captions (text members only, no image decoded)."""
    saved = Path(shards) / VOCAB_FILE
    if saved.exists():
        vocab = Vocabulary.load(saved)
        if vocab.min_word_count == min_word_count:
            return vocab
        log.info("%s was built with min_word_count %d, not %d: building the vocabulary from the train split",
                 saved, vocab.min_word_count, min_word_count)
    return Vocabulary.build(split_captions(train_shards), min_word_count)


def prepare_data(cfg: Config, accelerator) -> CaptionData:
    d = cfg.data
    if d.demo:
        with accelerator.main_process_first():  # one process writes, the others wait and then read
            if not demo.demo_exists(d.shards):
                log.info("building the demo dataset in %s", d.shards)
                demo.build_demo(d.shards, image_size=d.image_size, min_word_count=cfg.text.min_word_count)
    train_shards, val_shards = list_shards(d.shards, d.train_split), list_shards(d.shards, d.val_split)
    vocab = load_vocabulary(d.shards, train_shards, cfg.text.min_word_count)
    return CaptionData(cfg, vocab, train_shards, val_shards, count_samples(train_shards))
