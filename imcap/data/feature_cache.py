"""The frozen-feature cache: the frozen part of the encoder run once over a dataset's shards.

A cache mirrors its source: for every `{split}-NNNNNN.tar` a tar of the same name whose samples hold
`key.safetensors` (the frozen part's output, (C, h, w), bf16 by default) and the sample's captions, or
a marker for a sample that could not be decoded (a skip, counted whenever the cache is read, as the
sample is whenever the images are), plus sizes.json and cache.json. cache.json records a digest of the
frozen weights (BatchNorm statistics included) and the image size; the trainer refuses a cache whose
digest differs from its own encoder's, so a cache is never used with an encoder, weights or image size
it was not made with.
It also records the source shards' fingerprint: a cache of shards rebuilt since is built again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from imcap.data.samples import Sample, SampleError, decode_sample, skipped_sample
from imcap.data.shards import (
    FEATURES_DIR,
    SIZES_FILE,
    DataError,
    TarShard,
    atomic_write,
    is_url,
    known_sizes,
    list_shards,
    member_key,
    shard_file_name,
    update_sizes,
)
from imcap.data.streams import Fetched, Part, fetched
from imcap.model.encoder import EncoderCNN
from imcap.text import VOCAB_FILE, Vocabulary

log = logging.getLogger(__name__)
CACHE_FILE = "cache.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def encoder_digest(encoder: EncoderCNN, image_size: int) -> str:
    """What the cached features depend on: the frozen part's weights and buffers, and the image size."""
    h = hashlib.sha256(f"image_size={image_size};train_layer4={encoder.train_layer4}".encode())
    for name, tensor in sorted(encoder.frozen_part.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def shards_fingerprint(source: str) -> dict:
    """What a cache's source shards are, cheap to read: their counts in sizes.json, and each local shard's
    byte size and modification time (a rebuild writes new files; tars are padded, so their sizes alone
    seldom change). Of shards at a URL or from pipe: commands, the counts alone: a stat there would be a
    request for every shard."""
    shards = list_shards(source)
    sizes = {shard_file_name(shard): size for shard, size in known_sizes(shards).items()}
    stats = {} if is_url(source) else {shard_file_name(shard): os.stat(shard) for shard in shards}
    return {"sizes": sizes, "shards": {name: [s.st_size, s.st_mtime_ns] for name, s in stats.items()}}


def _made_from_other_shards(meta: dict | None, source: str) -> bool:
    return meta is not None and meta.get("shards") != shards_fingerprint(source)


def read_cache_meta(cache_dir: str | Path) -> dict | None:
    path = Path(cache_dir) / CACHE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def check_cache(cache_dir: str | Path, encoder: EncoderCNN, image_size: int, weights: str) -> None:
    meta = read_cache_meta(cache_dir)
    if meta is None:
        return
    digest = encoder_digest(encoder, image_size)
    if meta["digest"] != digest:
        raise DataError(
            f"{Path(cache_dir) / CACHE_FILE}: these cached features were made with another encoder "
            f"(weights {meta['weights']}, image size {meta['image_size']}, train_layer4 {meta['train_layer4']}; "
            f"now weights {weights}, image size {image_size}, train_layer4 {encoder.train_layer4}, or "
            f"different weight values). Rebuild the cache (`imcap features build`) or train from images."
        )


def cache_shards(
    encoder: EncoderCNN,
    source: str,
    splits: list[str],
    out_dir: str | Path,
    image_size: int,
    batch_size: int,
    dtype: str = "bf16",
    part: Part = Part(),
    read_attempts: int = 1,
) -> Iterator[tuple[str, int] | None]:
    """Write this process's share of the cache shards (every world_size-th), on the encoder's device, one
    at a time: yields (name, samples) of each, or None in a round of world_size shards that has none for
    this process, so that every process yields as often (a caller may agree on something between shards).
    The source may be local or at a URL; a shard there is read up to `read_attempts` times, as in training.

    Shards already complete in out_dir are kept (and counted), so an interrupted build continues where it
    stopped; none are kept from a finished cache of other shards than those now at source.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder.eval()
    # the same on every rank: finish_cache writes cache.json once every rank has built its share
    stale = _made_from_other_shards(read_cache_meta(out_dir), source)
    shards = [s for split in splits for s in list_shards(source, split)]
    recorded = known_sizes(shards)
    for first in range(0, len(shards), part.world_size):
        mine = first + part.rank
        if mine >= len(shards):
            yield None
            continue
        shard = shards[mine]
        source_samples = fetched([shard], {shard: recorded[shard]}, read_attempts)
        yield cache_shard(encoder, shard, source_samples, out_dir, image_size, batch_size, dtype, stale)


@torch.no_grad()
def cache_shard(
    encoder: EncoderCNN,
    shard: str,
    source_samples: Iterator[Fetched],
    out_dir: Path,
    image_size: int,
    batch_size: int,
    dtype: str,
    stale: bool,
) -> tuple[str, int]:
    """The cache shard of one source shard, from its samples as `fetched` gives them, written unless an
    interrupted build left it (then its samples are not read) -> (name, samples)."""
    target = out_dir / shard_file_name(shard)
    if target.exists() and not stale:  # written by an interrupted build
        return target.name, _cached_samples(target)
    with TarShard(target) as tar:
        skipped, lost = _cache_shard(tar, source_samples, encoder, image_size, batch_size, DTYPES[dtype])
        if lost and is_url(shard):  # a fetch that failed every time: not cached short for good, fetched next build
            raise DataError(
                f"{shard}: {lost} of its samples could not be fetched, so it is not cached; run the build "
                "again to fetch it again (the shards already cached are kept)"
            )
    if skipped:
        log.warning(
            "%s: %d of its samples could not be cached (the first: %s, %s); the cache keeps a marker for "
            "each, which training skips and counts as it would the sample",
            shard,
            len(skipped),
            *skipped[0],
        )
    return target.name, tar.count


def _cache_shard(
    tar: TarShard, source_samples: Iterator[Fetched], encoder: EncoderCNN, image_size, batch_size, dtype
) -> tuple[list[tuple[str, str]], int]:
    """The cache samples of one source shard, in its order: features, or a marker for a sample that cannot
    be decoded. A sample that could not be read (a local tar cut short) is left out, as `fetched` warns.
    -> ((key, reason) of each marked, the number left out)."""
    device = encoder.mean.device
    batch: list[tuple[str, Sample | SampleError]] = []
    skipped, lost = [], 0
    for _, _, sample in source_samples:
        if sample is None:
            lost += 1
            continue
        try:
            decoded: Sample | SampleError = decode_sample(sample, image_size, None)
        except SampleError as e:
            decoded = e
            skipped.append((sample["__key__"], str(e)))
        batch.append((sample["__key__"], decoded))
        if sum(isinstance(item, Sample) for _, item in batch) == batch_size:
            _write_batch(tar, batch, encoder, device, dtype)
            batch = []
    if batch:
        _write_batch(tar, batch, encoder, device, dtype)
    return skipped, lost


def _cached_samples(cache_shard: Path) -> int:
    """The samples of a cache shard, as the reader groups its members, from their names alone."""
    with tarfile.open(cache_shard) as tar:
        keys = [member_key(info.name)[0] for info in tar if info.isreg()]
    return sum(1 for _ in itertools.groupby(key for key in keys if key is not None))


def _write_batch(tar: TarShard, batch: list[tuple[str, Sample | SampleError]], encoder: EncoderCNN, device, dtype):
    images = [item.pixels for _, item in batch if isinstance(item, Sample)]
    features = iter(encoder.frozen_features(torch.stack(images).to(device)).to(dtype).cpu() if images else [])
    for key, item in batch:
        if isinstance(item, SampleError):
            tar.write(skipped_sample(key, str(item)))
            continue
        tar.write(
            {
                "__key__": key,
                "safetensors": save_safetensors({"features": next(features).contiguous()}),
                "json": json.dumps({"image_id": item.image_id, "captions": item.captions}).encode(),
            }
        )


def finish_cache(
    out_dir: str | Path,
    source: str,
    sizes: dict[str, int],
    encoder: EncoderCNN,
    image_size: int,
    weights: str,
    dtype: str,
    vocab: Vocabulary,
) -> None:
    """Record sizes, the source's vocabulary (`vocab`, as training on it reads it) and what the cache was
    made with and from; only then is it complete. Cache shards not in sizes (of source shards removed
    since) are removed."""
    for leftover in Path(out_dir).glob("*.tar"):
        if leftover.name not in sizes:
            leftover.unlink()
    (Path(out_dir) / SIZES_FILE).unlink(missing_ok=True)  # so that it lists exactly these shards
    update_sizes(out_dir, sizes)
    vocab.save(Path(out_dir) / VOCAB_FILE)
    meta = {
        "digest": encoder_digest(encoder, image_size),
        "weights": weights,
        "image_size": image_size,
        "train_layer4": encoder.train_layer4,
        "dtype": dtype,
        "shards": shards_fingerprint(source),
    }
    atomic_write(Path(out_dir) / CACHE_FILE, json.dumps(meta, indent=1))  # last: it marks the cache complete


def cache_dir_for(source: str, encoder: EncoderCNN, image_size: int) -> Path:
    return Path(source) / FEATURES_DIR / encoder_digest(encoder, image_size)[:16]


def cache_is_complete(cache_dir: str | Path, source: str) -> bool:
    """Finished (cache.json is written last), from the shards now at source."""
    meta = read_cache_meta(cache_dir)
    if _made_from_other_shards(meta, source):
        log.warning(
            "%s was made from other shards than those now at %s (rebuilt since): building it again", cache_dir, source
        )
        return False
    return meta is not None and (Path(cache_dir) / SIZES_FILE).exists()
