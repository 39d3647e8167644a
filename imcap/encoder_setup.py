"""What the encoder needs before training, done the same way by the trainer and `imcap features build`:
its BatchNorm statistics, the standardisation of its features, and the cache of its frozen part."""

from __future__ import annotations

import time
from pathlib import Path

from accelerate import Accelerator

from imcap.config import Config, ConfigError
from imcap.data import feature_cache
from imcap.data.prefetch import to_device
from imcap.data.shards import is_url
from imcap.data.streams import EvalStream, Part, eval_loader
from imcap.data.training_data import TrainingData
from imcap.distributed import Preempted, StopFlag, gather_objects, part_of
from imcap.model import Captioner
from imcap.model.encoder import estimate_batchnorm_stats, estimate_feature_stats
from imcap.run_dir import check_writable
from imcap.text import Vocabulary


def prepare_encoder(
    model: Captioner, data: TrainingData, cfg: Config, acc: Accelerator, fresh: bool, stop: StopFlag | None = None
) -> TrainingData:
    """The statistics (for a fresh model; a resumed one has its own), and the data read from the feature
    cache where the config asks for one. A signal caught by `stop` ends the cache build between shards."""
    if fresh:
        estimate_batchnorm(model, data, cfg, acc)
    data = use_feature_cache(model, data, cfg, acc, stop)
    if fresh:
        standardize_features(model, data, cfg, acc)
    return data


def first_train_batches(data: TrainingData, images: int, batch_size: int):
    """The first `images` train images (or their cached features), centre-cropped: the same on every rank."""
    return eval_loader(
        EvalStream(data.train_shards, data.collate, Part(), batch_size, data.cfg.data.image_size, images)
    )


def estimate_batchnorm(model: Captioner, data: TrainingData, cfg: Config, acc: Accelerator) -> None:
    """The encoder's BatchNorm statistics from the first train images, where the config asks for them."""
    n = cfg.model.encoder.batchnorm_stats_images
    if not n:
        if cfg.model.encoder.train_layer4 and cfg.model.encoder.weights == "none":
            raise ConfigError(
                "model.encoder.train_layer4 with weights none needs model.encoder.batchnorm_stats_images "
                "> 0: with the initial BatchNorm statistics layer4 trains on features about 12 times "
                "smaller than it is evaluated on, and learns nothing evaluation can use"
            )
        return
    if feature_cache.read_cache_meta(cfg.data.shards):
        raise ConfigError(
            f"model.encoder.batchnorm_stats_images needs images, but data.shards ({cfg.data.shards}) "
            "is a feature cache: point it at the image shards, or set it to 0"
        )
    model.to(acc.device)
    # in training batches: the statistics a training layer4 sees, and the same whatever eval.batch_size says
    batches = first_train_batches(data, n, cfg.data.batch_size)
    with acc.autocast():
        seen = estimate_batchnorm_stats(model.encoder, (to_device(b, acc.device).inputs.pixels for b in batches))
    acc.print(f"estimated the encoder's BatchNorm statistics on {seen} train images")


def standardize_features(model: Captioner, data: TrainingData, cfg: Config, acc: Accelerator) -> None:
    n = cfg.model.encoder.feature_stats_images
    if not n:
        return
    model.to(acc.device)
    batches = first_train_batches(data, n, cfg.eval.batch_size)
    seen = estimate_feature_stats(model.encoder, (to_device(b, acc.device).inputs for b in batches))
    acc.print(f"standardising the encoder's features with statistics of {seen} train images")


def use_feature_cache(
    model: Captioner, data: TrainingData, cfg: Config, acc: Accelerator, stop: StopFlag | None = None
) -> TrainingData:
    """With data.feature_cache, build (or reuse) the cache of the frozen encoder part and read from it."""
    encoder, d = model.encoder, cfg.data
    if feature_cache.read_cache_meta(d.shards):  # pointed at a cache directly
        feature_cache.check_cache(d.shards, encoder, d.image_size, cfg.model.encoder.weights)
        return data
    if not d.feature_cache:
        return data
    if is_url(d.shards):
        raise ConfigError(
            f"data.feature_cache writes the cache beside the shards, and {d.shards} is a URL: build it on a local "
            "disk with `imcap features build --out DIR` and train with data.shards=DIR, or set data.feature_cache=false"
        )
    cache = feature_cache.cache_dir_for(d.shards, encoder, d.image_size)
    if not feature_cache.cache_is_complete(cache, d.shards):
        check_writable(
            acc, cache, "the feature cache is written there", "make it writable or set data.feature_cache=false"
        )
        build_feature_cache(model, cfg, acc, cache, cfg.eval.batch_size, data.vocab, stop=stop)
    return data.with_shards(str(cache))


def build_feature_cache(
    model: Captioner,
    cfg: Config,
    acc: Accelerator,
    out: Path,
    batch_size: int,
    vocab: Vocabulary,
    dtype: str = "bf16",
    stop: StopFlag | None = None,
) -> int:
    """Every rank caches its share of the train and val shards; the main process marks the cache complete.
    -> the number of images cached. A signal caught by `stop` raises Preempted once every rank has finished
    the shard it is writing: the complete shards are kept, and the next build starts after them."""
    encoder, d = model.encoder, cfg.data
    acc.print(f"caching the frozen encoder's features in {out}")
    start, sizes = time.time(), {}
    with acc.autocast():  # bf16 on a CPU with bf16 instructions: twice as fast, and the cache holds bf16
        shards = feature_cache.cache_shards(
            encoder.to(acc.device),
            d.shards,
            [d.train_split, d.val_split],
            out,
            d.image_size,
            batch_size,
            dtype,
            part_of(acc),
            d.read_attempts,
        )
        for cached in shards:  # every rank passes here as often: they agree on a stop
            sizes.update([cached] if cached else [])
            stopped_by = stop.agreed(acc) if stop else None
            if stopped_by:
                raise Preempted(stopped_by, None, "the feature cache's complete shards are kept for the next run")
    all_sizes = {k: v for part in gather_objects(acc, sizes) for k, v in part.items()}
    if acc.is_main_process:
        feature_cache.finish_cache(
            out, d.shards, all_sizes, encoder, d.image_size, cfg.model.encoder.weights, dtype, vocab
        )
    acc.wait_for_everyone()
    acc.print(f"cached {sum(all_sizes.values())} images in {time.time() - start:.0f} s")
    return sum(all_sizes.values())
