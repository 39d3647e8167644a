"""Flickr8k and Flickr30k: a captions file in one of three layouts, and one image list per split."""

from __future__ import annotations

import csv
from pathlib import Path

from imcap.data.sources.records import Problem, Source, SourceError, by_key, image_record, read_lines
from imcap.data.sources.tables import group_rows, table_rows

FLICKR_LAYOUTS = (
    "the token file (image.jpg#n<TAB>caption), the CSV with header 'image,caption', or "
    "Flickr30k's results.csv (image_name| comment_number| comment)"
)


def read_flickr(captions_file: Path, image_dir: Path, split_lists: list[tuple[str, Path]]) -> Source:
    """Flickr8k/30k captions in any of FLICKR_LAYOUTS, and one image list per split (Flickr_8k.trainImages.txt):
    a split holds the images its list names, in key order."""
    captions, problems = _flickr_captions(Path(captions_file))
    splits = {}
    for split, names in _split_lists(split_lists).items():
        splits[split] = by_key(image_record(name, captions.get(name, []), image_dir) for name in names)
    return Source(f"flickr {captions_file}", splits, problems)


def _flickr_captions(path: Path) -> tuple[dict[str, list], list[Problem]]:
    lines = read_lines(path)
    header = lines[0] if lines else ""
    if [column.strip() for column in header.split("|")] == ["image_name", "comment_number", "comment"]:
        return _line_captions(path, lines, 2, _results_csv_line, "image_name| comment_number| comment")
    if "\t" in header:
        return _line_captions(path, lines, 1, _token_line, "image.jpg#n<TAB>caption")
    if {"image", "caption"} <= set(next(csv.reader([header]))):
        # Flickr's annotators now and then wrote the same sentence for an image: each is an annotation
        # (its token file numbers them), not a row listed twice
        rows = table_rows(path, "csv", ("image", "caption"))
        images, problems = group_rows(path, rows, "image", "caption", keep_repeats=True)
        return {image: captions for image, (_, captions) in images.items()}, problems
    raise SourceError(f"{path}:1: unknown captions layout (first line {header[:80]!r}); expected {FLICKR_LAYOUTS}")


def _token_line(line: str) -> tuple[str, str] | None:
    image, tab, caption = line.partition("\t")
    return (image.partition("#")[0], caption) if tab else None


def _results_csv_line(line: str) -> tuple[str, str] | None:
    parts = line.split("|", 2)
    return (parts[0].strip(), parts[2].removeprefix(" ")) if len(parts) == 3 else None


def _line_captions(path: Path, lines: list[str], first_line: int, parse, layout: str):
    """One image and caption per line, from line number first_line on; a line parse cannot read is a Problem."""
    captions: dict[str, list] = {}
    problems = []
    for number, line in enumerate(lines[first_line - 1 :], start=first_line):
        if not line.strip():
            continue
        parsed = parse(line)
        if parsed is None:
            problems.append(Problem("malformed line", f"{path}:{number}", f"expected {layout}"))
        else:
            captions.setdefault(parsed[0], []).append(parsed[1])
    return captions, problems


def _split_lists(split_lists: list[tuple[str, Path]]) -> dict[str, list[str]]:
    """split -> image file names; an image named in two splits' lists is an error (it would leak)."""
    splits: dict[str, list[str]] = {}
    owner: dict[str, tuple[str, Path]] = {}
    for split, list_file in split_lists:
        names = splits.setdefault(split, [])
        for number, line in enumerate(read_lines(Path(list_file)), start=1):
            name = line.strip()
            if not name:
                continue
            if name in owner and owner[name][0] != split:
                raise SourceError(
                    f"{list_file}:{number}: {name} is also in split {owner[name][0]!r} "
                    f"({owner[name][1]}); an image must be in one split only"
                )
            if name not in owner:
                owner[name] = (split, Path(list_file))
                names.append(name)
    return splits
