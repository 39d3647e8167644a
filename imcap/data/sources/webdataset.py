"""WebDataset / img2dataset shards, re-sharded: their samples as records, in shard order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from imcap.data.samples import IMAGE_EXTENSIONS, SampleError, image_id, sample_captions
from imcap.data.shards import list_shards, read_shard
from imcap.data.sources.records import Problem, Record, Source, sample_key


def read_webdataset(split_shards: list[tuple[str, str]]) -> Source:
    """(split, shards) pairs, shards a directory (its {split}-*.tar) or a brace/glob pattern such as
    'laion/{00000..00099}.tar' (img2dataset). Samples as the trainer reads them; shard order kept."""
    return Source(
        "webdataset " + " ".join(spec for _, spec in split_shards),
        {split: _shard_records(webdataset_shards(spec, split)) for split, spec in split_shards},
    )


def webdataset_shards(spec: str, split: str) -> list[str]:
    """A directory's {split}-*.tar, or every shard a pattern names: its split is the one it is given for."""
    return list_shards(spec, split if Path(spec).is_dir() else None)


def _shard_records(shards: list[str]) -> Iterator[Record | Problem]:
    for shard in shards:
        errors: list[str] = []
        for sample in read_shard(shard, errors):
            origin = f"{shard}:{sample['__key__']}"
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                yield Problem("no image", origin, f"expected one of {', '.join(IMAGE_EXTENSIONS)}")
                continue
            try:
                sample_id = image_id(sample)  # reads the JSON, if there is one
            except ValueError as e:  # not JSON, or not UTF-8
                yield Problem("unreadable caption JSON", origin, str(e))
                continue
            try:
                captions = tuple(sample_captions(sample))
            except SampleError:
                captions = ()
            except UnicodeDecodeError:  # of the txt: the builder drops it and says why
                captions = (sample["txt"].decode("utf-8", "surrogateescape"),)
            key = sample["__key__"]
            yield Record(sample_key(key), sample_id, captions, origin, name=f"{key}.{ext}", data=sample[ext])
        if errors:
            yield Problem("unreadable shard", shard, errors[0])
