"""Shard I/O: listing shards, counting their samples (sizes.json), reading their members and samples,
and writing `{split}-NNNNNN.tar` under a temporary name, renamed into place when complete."""

from __future__ import annotations

import glob
import io
import json
import os
import posixpath
import shlex
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import fsspec
import webdataset as wds
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

from imcap.errors import ImcapError

SIZES_FILE = "sizes.json"
FEATURES_DIR = "features"  # <shards>/features/<digest>/: feature caches made from the shards (feature_cache.py)
# What a member name may end in after a sample key that holds dots (img.v2.jpg): the extensions imcap
# reads or writes, and ones other WebDataset writers commonly add beside them.
MEMBER_EXTENSIONS = frozenset(
    ("jpg", "jpeg", "png", "webp", "json", "txt", "safetensors", "cls", "npy", "pth", "pyd", "gif", "tif", "tiff")
)


class DataError(ImcapError, ValueError):
    """Shards that cannot be used as asked: none where they should be, no sample count, no usable sample."""


def is_url(location: str | Path) -> bool:
    """Whether a location is read through webdataset's gopen (http(s)://, s3://, gs://, pipe: ...), not a local path."""
    return "://" in str(location) or str(location).startswith("pipe:")


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_):
    return fsspec.open(url, mode).open()


# The schemes webdataset's gopen has no handler for (s3://, az:// ...) are opened by fsspec, with the package
# fsspec names for each (s3fs for s3://); gopen keeps its own (curl for http(s)://, gsutil for gs://, hf://,
# pipe:, ...).
for _protocol in fsspec.available_protocols():
    gopen_schemes.setdefault(_protocol, _fsspec_gopen)


def read_location(location: str | Path) -> bytes:
    """The whole of a local file, or of one at a URL or a pipe: command's output, through gopen."""
    if not is_url(location):
        return Path(location).read_bytes()
    with wds.gopen(str(location)) as f:
        return f.read()


def shard_file_name(shard: str) -> str:
    """A shard's file name: the last part of its path or URL, or of a pipe: command's word naming the .tar."""
    if shard.startswith("pipe:"):
        words = shlex.split(shard[len("pipe:") :])
        return posixpath.basename(next((w for w in reversed(words) if w.endswith(".tar")), shard))
    return posixpath.basename(shard)


def beside(shard: str, name: str) -> str:
    """Where the file `name` is for a shard: in the shard's directory; for a pipe: command, the same command
    with the shard's file name replaced (pipe:aws s3 cp s3://b/train-000000.tar - -> ...s3://b/sizes.json -)."""
    if shard.startswith("pipe:"):
        head, _, tail = shard.rpartition(shard_file_name(shard))
        return f"{head}{name}{tail}"
    return posixpath.join(posixpath.dirname(shard), name)


def list_shards(spec: str, split: str | None = None) -> list[str]:
    """A directory (its `{split}-*.tar`; every .tar without a split, img2dataset's 00000.tar too), a URL of
    one (the shards its sizes.json lists), or a brace/glob pattern of paths or URLs (its `{split}-*.tar`, with
    a split: one pattern may name both splits) -> sorted shard paths or URLs."""
    wanted = (lambda name: name.startswith(f"{split}-")) if split else (lambda name: name.endswith(".tar"))
    if is_url(spec) and not any(c in spec for c in "{*?[") and not spec.startswith("pipe:"):
        directory = spec.rstrip("/")
        shards = sorted(f"{directory}/{name}" for name in read_sizes(directory) if wanted(name))
    elif Path(spec).is_dir():
        shards = sorted(glob.glob(str(Path(spec) / (f"{split}-*.tar" if split else "*.tar"))))
    else:
        urls = wds.shardlists.expand_urls(spec)
        matches = urls if is_url(spec) else (p for pattern in urls for p in glob.glob(pattern))
        shards = sorted(p for p in matches if not split or shard_file_name(p).startswith(f"{split}-"))
    if not shards:
        what, files = (f"shards for split {split!r}", f"{split}-NNNNNN.tar") if split else (".tar shards", ".tar")
        raise DataError(
            f"no {what} at {spec}: expected {files} files there (build them with "
            "`imcap shards build`) or a pattern like dir/train-{000000..000009}.tar"
        )
    return shards


def count_samples(shards: list[str]) -> int:
    """Samples in these shards, from the sizes.json beside them."""
    return sum(recorded_sizes(shards).values())


def recorded_sizes(shards: list[str]) -> dict[str, int]:
    """shard -> its sample count in the sizes.json beside it."""
    recorded = known_sizes(shards)
    for shard, size in recorded.items():
        if size is None:
            raise DataError(
                f"{beside(shard, SIZES_FILE)} has no sample count for {shard_file_name(shard)}; "
                "rebuild the shards or run `imcap shards check --fix-sizes` on them"
            )
    return recorded


def known_sizes(shards: list[str]) -> dict[str, int | None]:
    """shard -> its sample count in the sizes.json beside it, None where that has none (a local one may not)."""
    by_location: dict[str, dict[str, int]] = {}
    known = {}
    for shard in shards:
        location = beside(shard, SIZES_FILE)
        known[shard] = by_location.setdefault(location, read_sizes_file(location)).get(shard_file_name(shard))
    return known


def member_key(name: str) -> tuple[str | None, str | None]:
    """A tar member's name -> (sample key, extension). It splits at the last dot when what follows is one of
    MEMBER_EXTENSIONS, so that a key may hold dots (img.v2.part1.jpg: key img.v2.part1); other names split
    as webdataset splits them, at the first dot of the file name."""
    key, dot, ext = name.rpartition(".")
    if key and not key.endswith("/") and ext.lower() in MEMBER_EXTENSIONS:
        return key, ext
    return base_plus_ext(name)


def read_samples(
    urls: Iterable[str], handler: Callable[[Exception], bool], select_files: Callable[[str], bool] | None = None
) -> Iterator[dict]:
    """The samples of these tars, in order (extension -> bytes, with __key__ and __url__): webdataset's own
    stages, members grouped by member_key. handler(exception) returns True to skip what cannot be read."""
    opened = url_opener(({"url": url} for url in urls), handler=handler)
    members = tar_file_expander(opened, handler=handler, select_files=select_files)
    return group_by_keys(members, keys=member_key, handler=handler)


def read_shard(shard: str, errors: list[str]) -> Iterator[dict]:
    """The raw samples of one shard (extension -> bytes), grouped as the trainer groups them. If the tar
    cannot be read to its end, why goes into errors (webdataset reports one failure at several levels;
    the outermost says it best)."""
    failures = []
    yield from read_samples([shard], handler=collecting(failures))
    if failures:
        errors.append(failure_reason(failures[-1]))


def collecting(failures: list[Exception]) -> Callable[[Exception], bool]:
    """A webdataset handler that notes each failure and goes on (the reader then stops at a broken tar)."""
    return lambda exn: failures.append(exn) or True


def failure_reason(exn: Exception) -> str:
    return f"{type(exn).__name__}: {exn.args[0] if exn.args else ''}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class TarShard:
    """One tar written under a temporary name and renamed into place when closed without error.

    Tar headers carry no time, user or mode of this machine, so the same samples give the same bytes. A
    name over ustar's 100 characters (a long escaped key) goes into a pax header; shorter ones need none.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
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
    """The sizes.json of a shard directory, local ({} if it has none) or at a URL (which must have one)."""
    return read_sizes_file(beside(f"{str(shard_dir).rstrip('/')}/", SIZES_FILE))


def read_sizes_file(location: str | Path) -> dict[str, int]:
    """shard file name -> samples, from a sizes.json: local ({} if there is none) or at a URL or a pipe:
    command's output (which must give one)."""
    if not is_url(location) and not Path(location).exists():
        return {}
    try:
        text = read_location(location).decode()
    except (OSError, ValueError, ImportError) as e:
        raise DataError(
            f"{location} cannot be fetched ({type(e).__name__}: {e}): shards need their sizes.json beside them"
        ) from None
    try:
        sizes = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f'{location} is not valid JSON ({e}); expected {{"<shard>.tar": <samples>, ...}}') from None
    if not isinstance(sizes, dict) or not all(isinstance(v, int) for v in sizes.values()):
        raise DataError(f'{location} must map shard file names to sample counts, e.g. {{"train-000000.tar": 1000}}')
    return sizes


def update_sizes(shard_dir: str | Path, sizes: dict[str, int]) -> None:
    write_sizes(shard_dir, {**read_sizes(shard_dir), **sizes})


def write_sizes(shard_dir: str | Path, sizes: dict[str, int]) -> None:
    atomic_write(Path(shard_dir) / SIZES_FILE, json.dumps(dict(sorted(sizes.items())), indent=1))


def atomic_write(path: Path, text: str) -> None:
    """Write text to path through a temporary file: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def iter_tar_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r|*") as tar:
        for info in tar:
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
