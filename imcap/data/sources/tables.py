"""Tables: CSV, TSV or JSONL with an image path and caption(s) per row."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from imcap.data.sources.records import Problem, Record, Source, SourceError, by_key, image_record, open_text


def table_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    return {".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(suffix, "csv")


def read_table(
    tables: list[tuple[str | None, Path]],
    image_dir: Path | None,
    image_column: str,
    caption_column: str,
    split_column: str | None = None,
    fmt: str | None = None,
) -> Source:
    """(split, table) pairs; with split_column the split of each row is read from it (the pair's split is None).

    Several captions of an image come as repeated rows or as a list (a JSON list in a JSONL field, or a
    CSV/TSV cell holding a JSON list of strings). Image paths are relative to image_dir (default: the
    table's directory); an image's id is its path without the extension."""
    records: dict[str, list[Record]] = {}
    owner: dict[Path, tuple[str, Path]] = {}  # image file -> (split, table): an image in two splits would leak
    problems = []
    columns = (image_column, caption_column, *([split_column] if split_column else []))
    for split, table in tables:
        table = Path(table)
        rows = table_rows(table, fmt or table_format(table), columns)
        images, row_problems = group_rows(table, rows, image_column, caption_column, split_column, split)
        problems += row_problems
        directory = Path(image_dir) if image_dir else table.parent
        for name, (image_split, captions) in images.items():
            record = image_record(name, captions, directory)
            known_split, known_table = owner.setdefault(record.path, (image_split, table))
            if known_split != image_split:
                raise SourceError(
                    f"{table}: {name} is in split {image_split!r} here and in {known_split!r} in "
                    f"{known_table}; an image must be in one split only"
                )
            records.setdefault(image_split, []).append(record)
    splits = {split: by_key(split_records) for split, split_records in records.items()}
    return Source("table " + " ".join(str(t) for _, t in tables), splits, problems)


def table_rows(path: Path, fmt: str, columns: tuple[str, ...]) -> Iterator[tuple[int, dict | Problem]]:
    """(line number, row) of a CSV/TSV/JSONL table; a line that cannot be read comes as a Problem."""
    with open_text(path) as f:
        if fmt == "jsonl":
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield number, Problem("malformed line", f"{path}:{number}", f"not JSON: {e.msg}")
                    continue
                missing = [c for c in columns if not isinstance(row, dict) or c not in row]
                yield (
                    number,
                    (
                        Problem("malformed line", f"{path}:{number}", f"no {', '.join(map(repr, missing))}")
                        if missing
                        else row
                    ),
                )
            return
        reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise SourceError(
                f"{path}:1: no column {', '.join(map(repr, missing))} in the header "
                f"(columns: {', '.join(reader.fieldnames or [])}); name the columns with "
                "--image-column and --caption-column"
            )
        for row in reader:
            if any(row[c] is None for c in columns):
                yield (
                    reader.line_num,
                    Problem(
                        "malformed line",
                        f"{path}:{reader.line_num}",
                        f"fewer fields than the {len(reader.fieldnames)} columns",
                    ),
                )
            else:
                yield reader.line_num, row


def cell_captions(value) -> list:
    """A caption cell: a list, a string holding a JSON list of strings, or one caption."""
    if isinstance(value, list):
        return value
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return [value]
        if isinstance(parsed, list) and all(isinstance(c, str) for c in parsed):
            return parsed
    return [value]


def group_rows(
    path: Path,
    rows,
    image_column: str,
    caption_column: str,
    split_column: str | None = None,
    split: str | None = None,
    keep_repeats: bool = False,
) -> tuple[dict[str, tuple[str | None, list]], list[Problem]]:
    """Rows -> {image: (split, captions)} in first-seen order, plus the problems: unreadable lines, and
    (unless keep_repeats) a caption an image already has (a row listed twice), which is kept once."""
    images: dict[str, tuple[str | None, list]] = {}
    problems = []
    first_seen: dict[tuple[str, str], int] = {}  # (image, caption) -> its first line
    for number, row in rows:
        if isinstance(row, Problem):
            problems.append(row)
            continue
        image, captions = str(row[image_column]), cell_captions(row[caption_column])
        row_split = str(row[split_column]) if split_column else split
        known_split, known = images.setdefault(image, (row_split, []))
        if known_split != row_split:
            raise SourceError(
                f"{path}:{number}: {image} is in split {row_split!r} here and in {known_split!r} "
                "on an earlier line; an image must be in one split only"
            )
        for caption in captions:
            text = caption.strip() if isinstance(caption, str) else ""  # not text, or blank: the builder says so
            if text and not keep_repeats and (image, text) in first_seen:
                detail = f"{image}: {text!r}, as on line {first_seen[image, text]}"
                problems.append(Problem("duplicate caption", f"{path}:{number}", detail))
                continue
            first_seen.setdefault((image, text), number)
            known.append(caption)
    return images, problems
