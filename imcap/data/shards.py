"""Writing WebDataset shards: `{split}-NNNNNN.tar`, written under a temporary name and renamed when
complete, plus `sizes.json` (samples per shard), which the pipeline uses to size an epoch."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

SIZES_FILE = "sizes.json"
FEATURES_DIR = "features"  # <shards>/features/<digest>/: feature caches made from the shards (imcap/features.py)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class TarShard:
    """One tar written under a temporary name and renamed into place when closed without error.

    Tar headers carry no time, user or mode of this machine, so the same samples give the same bytes.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, sample: dict) -> None:
        """sample: `__key__` and extension -> bytes."""
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("__")):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(sample[ext]), 0o444, 0
            self.tar.addfile(info, io.BytesIO(sample[ext]))
        self.count += 1

    def close(self) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)  # a final name always means a complete tar

    def abort(self) -> None:
        self.tar.close()
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.abort() if exc_type else self.close()


class ShardWriter:
    """Writes the samples of one split into `{split}-NNNNNN.tar` shards of at most max_samples samples
    (and about max_bytes bytes, if given), then records their sizes in sizes.json."""

    def __init__(self, out_dir: str | Path, split: str, max_samples: int = 1000, max_bytes: int = 0):
        self.out_dir, self.split = Path(out_dir), split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.sizes: dict[str, int] = {}
        self._shard: TarShard | None = None

    def write(self, sample: dict) -> None:
        if self._shard is None:
            self._shard = TarShard(self.out_dir / shard_name(self.split, len(self.sizes)))
        self._shard.write(sample)
        if self._shard.count >= self.max_samples or (self.max_bytes and self._shard.file.tell() >= self.max_bytes):
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._shard.close()
        self.sizes[self._shard.path.name] = self._shard.count
        self._shard = None

    def close(self) -> dict[str, int]:
        if self._shard is not None:
            self._finish_shard()
        update_sizes(self.out_dir, self.sizes)
        return self.sizes

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._shard is not None:
            self._shard.abort()


def write_split(samples: Iterable[dict], out_dir: str | Path, split: str, max_samples: int) -> dict[str, int]:
    with ShardWriter(out_dir, split, max_samples=max_samples) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.sizes


def read_sizes(shard_dir: str | Path) -> dict[str, int]:
    path = Path(shard_dir) / SIZES_FILE
    if not path.exists():
        return {}
    try:
        sizes = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected {{\"<shard>.tar\": <samples>, ...}}") from None
    if not isinstance(sizes, dict) or not all(isinstance(v, int) for v in sizes.values()):
        raise ValueError(f"{path} must map shard file names to sample counts, e.g. {{\"train-000000.tar\": 1000}}")
    return sizes


def update_sizes(shard_dir: str | Path, sizes: dict[str, int]) -> None:
    merged = {**read_sizes(shard_dir), **sizes}
    path = Path(shard_dir) / SIZES_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=1))
    os.replace(tmp, path)


def iter_tar_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r|*") as tar:
        for info in tar:
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
