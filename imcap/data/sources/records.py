"""What every reader makes: records (an image and its captions), problems, and the source they form;
and the helpers the readers share for reading text and JSON strictly.

Text is read as UTF-8 with undecodable bytes kept as surrogates, so that a caption with bad bytes is
dropped on its own rather than failing its file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from imcap.errors import ImcapError


class SourceError(ImcapError, ValueError):
    """A source file that cannot be read as the layout it should have."""


@dataclass(frozen=True)
class Record:
    key: str  # the sample's key in the shards, sample_key of its name: unique within a split, no dots
    image_id: str | int
    captions: tuple  # as written in the source; empty, blank or undecodable ones are dropped by the builder
    origin: str  # where the image comes from, for the report: a file path, or shard:key
    name: str | None = None  # the image's name as the source gives it (kept as "file" in the sample's JSON)
    path: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class Problem:
    reason: str  # e.g. "missing file", "empty caption": counted by reason in the build report
    origin: str  # the file (image path, or source file:line) it concerns
    detail: str = ""


@dataclass
class Source:
    description: str
    splits: dict[str, Iterable[Record | Problem]]
    problems: list[Problem] = field(default_factory=list)  # found while reading captions, before any split


_KEY_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def sample_key(name: str) -> str:
    """A sample key for any name: each byte of its UTF-8 outside [A-Za-z0-9_-] as %XX, so that two names never
    share a key, a key never holds a dot (webdataset splits keys at dots), and urllib.parse.unquote(key,
    errors="surrogateescape") gives the name back. "photo 1" -> "photo%201"; "cats/1" -> "cats%2F1"."""
    data = name.encode("utf-8", "surrogateescape")  # a name read from undecodable bytes keeps them
    return "".join(chr(byte) if byte in _KEY_BYTES else f"%{byte:02X}" for byte in data)


def open_text(path: Path):
    try:
        return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror}") from None


def read_lines(path: Path) -> list[str]:
    """Lines without their line ends; only \\n and \\r\\n end a line (captions may hold other separators)."""
    with open_text(path) as f:
        return [line.removesuffix("\r") for line in f.read().split("\n")]


def read_json(path: Path, expected: str):
    with open_text(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); expected {expected}"
        ) from None


def required(item: dict, key: str, where: str, expected: str):
    if not isinstance(item, dict) or key not in item:
        raise SourceError(f"{where} has no {key!r}; expected {expected}")
    return item[key]


def image_record(name: str, captions, image_dir: Path, image_id: str | int | None = None) -> Record:
    """An image file, its name relative to image_dir; its key, and its id unless given, are the name
    without the extension."""
    stem = str(PurePath(name).with_suffix(""))
    path = Path(image_dir) / name
    image_id = stem if image_id is None else image_id
    return Record(sample_key(stem), image_id, tuple(captions), str(path), name=name, path=path)


def by_key(records: Iterable[Record]) -> list[Record]:
    return sorted(records, key=lambda r: r.key)
