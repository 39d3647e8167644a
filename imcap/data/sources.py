"""Readers of caption datasets in the layouts they are distributed in. Each turns a source into records,
split by split, for the shard builder (imcap/data/build.py).

A record is one image (a file path, or bytes) with its captions as the source writes them, its image id
and its sample key. Readers only read captions and lists; images are opened by the builder's workers,
which also judge the captions. Records of a split come sorted by key, except where the source has an
order of its own (Hugging Face rows, shards), which is kept.

Bad input a reader can name without opening an image (a line it cannot parse, a caption of an image the
source does not list) becomes a `Problem`: reported, never fatal. A source file whose structure is wrong
(not JSON, a missing column or key) raises `SourceError`, naming the file, line or key and what was
expected. Text is read as UTF-8 with undecodable bytes kept as surrogates, so that a caption with bad
bytes is dropped on its own rather than failing its file.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Iterable, Iterator

from imcap.data.samples import IMAGE_EXTENSIONS, SampleError, image_id, sample_captions
from imcap.data.shards import list_shards, read_shard


class SourceError(ValueError):
    """A source file that cannot be read as the layout it should have."""


@dataclass(frozen=True)
class Record:
    key: str  # the sample's key in the shards: unique within a split, no dots (webdataset splits keys at dots)
    image_id: str | int
    captions: tuple  # as written in the source; empty, blank or undecodable ones are dropped by the builder
    origin: str  # where the image comes from, for the report: a file path, or shard:key
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


_UNSAFE_KEY_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(name: str) -> str:
    return _UNSAFE_KEY_CHARACTERS.sub("_", name)


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror}") from None


def _read_lines(path: Path) -> list[str]:
    """Lines without their line ends; only \\n and \\r\\n end a line (captions may hold other separators)."""
    with _open_text(path) as f:
        return [line.removesuffix("\r") for line in f.read().split("\n")]


def _read_json(path: Path, expected: str):
    with _open_text(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); "
                          f"expected {expected}") from None


def _field(item: dict, key: str, where: str, expected: str):
    if not isinstance(item, dict) or key not in item:
        raise SourceError(f"{where} has no {key!r}; expected {expected}")
    return item[key]


def _image_record(name: str, captions, image_dir: Path, image_id: str | int | None = None) -> Record:
    """An image file, its name relative to image_dir; its key, and its id unless given, are the name
    without the extension."""
    stem = str(PurePath(name).with_suffix(""))
    path = Path(image_dir) / name
    return Record(sample_key(stem), stem if image_id is None else image_id, tuple(captions), str(path), path)


def _by_key(records: Iterable[Record]) -> list[Record]:
    return sorted(records, key=lambda r: r.key)


# ------------------------------------------------------------------------------------ Flickr8k / Flickr30k

FLICKR_LAYOUTS = ("the token file (image.jpg#n<TAB>caption), the CSV with header 'image,caption', or "
                  "Flickr30k's results.csv (image_name| comment_number| comment)")


def read_flickr(captions_file: Path, image_dir: Path, split_lists: list[tuple[str, Path]]) -> Source:
    """Flickr8k/30k captions in any of FLICKR_LAYOUTS, and one image list per split (Flickr_8k.trainImages.txt):
    a split holds the images its list names, in key order."""
    captions, problems = _flickr_captions(Path(captions_file))
    splits = {}
    for split, names in _split_lists(split_lists).items():
        splits[split] = _by_key(_image_record(name, captions.get(name, []), image_dir) for name in names)
    return Source(f"flickr {captions_file}", splits, problems)


def _flickr_captions(path: Path) -> tuple[dict[str, list], list[Problem]]:
    lines = _read_lines(path)
    header = lines[0] if lines else ""
    if [column.strip() for column in header.split("|")] == ["image_name", "comment_number", "comment"]:
        return _line_captions(path, lines, 2, _results_csv_line, "image_name| comment_number| comment")
    if "\t" in header:
        return _line_captions(path, lines, 1, _token_line, "image.jpg#n<TAB>caption")
    if {"image", "caption"} <= set(next(csv.reader([header]))):
        images, problems = _group_rows(path, _table_rows(path, "csv", ("image", "caption")), "image", "caption")
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
    for number, line in enumerate(lines[first_line - 1:], start=first_line):
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
        for number, line in enumerate(_read_lines(Path(list_file)), start=1):
            name = line.strip()
            if not name:
                continue
            if name in owner and owner[name][0] != split:
                raise SourceError(f"{list_file}:{number}: {name} is also in split {owner[name][0]!r} "
                                  f"({owner[name][1]}); an image must be in one split only")
            if name not in owner:
                owner[name] = (split, Path(list_file))
                names.append(name)
    return splits


# -------------------------------------------------------------------------------------------------- COCO

COCO_LAYOUT = ("COCO captions JSON: {'images': [{'id', 'file_name'}, ...], "
               "'annotations': [{'image_id', 'caption'}, ...]}")


def read_coco(splits: list[tuple[str, Path, Path]]) -> Source:
    """(split, captions_*.json, image directory) triples; captions in the annotations' order."""
    records, problems = {}, []
    for split, annotations_file, image_dir in splits:
        data = _read_json(Path(annotations_file), COCO_LAYOUT)
        images: dict = {}
        for i, image in enumerate(_field(data, "images", str(annotations_file), COCO_LAYOUT)):
            where = f"{annotations_file}: images[{i}]"
            images[_field(image, "id", where, COCO_LAYOUT)] = (_field(image, "file_name", where, COCO_LAYOUT), [])
        for i, note in enumerate(_field(data, "annotations", str(annotations_file), COCO_LAYOUT)):
            where = f"{annotations_file}: annotations[{i}]"
            owner, caption = _field(note, "image_id", where, COCO_LAYOUT), _field(note, "caption", where, COCO_LAYOUT)
            if owner not in images:
                problems.append(Problem("caption of an unlisted image", where, f"image_id {owner}"))
                continue
            images[owner][1].append(caption)
        split_records = [_image_record(name, captions, image_dir, image) for image, (name, captions) in images.items()]
        records[split] = _by_key([*records.get(split, []), *split_records])
    return Source("coco " + " ".join(str(a) for _, a, _ in splits), records, problems)


# -------------------------------------------------------------------------------------- Karpathy splits

KARPATHY_LAYOUT = ("Karpathy split JSON: {'images': [{'filepath' (optional), 'filename', 'split', "
                   "'sentences': [{'raw', 'tokens'}, ...]}, ...]}")


def read_karpathy(split_file: Path, image_root: Path, restval_split: str = "train") -> Source:
    """dataset_coco.json / dataset_flickr8k.json / dataset_flickr30k.json; images at image_root/filepath/filename.
    Karpathy's `restval` images (COCO) go to restval_split: train by default, as in the papers."""
    data = _read_json(Path(split_file), KARPATHY_LAYOUT)
    splits: dict[str, list[Record]] = {}
    for i, image in enumerate(_field(data, "images", str(split_file), KARPATHY_LAYOUT)):
        where = f"{split_file}: images[{i}]"
        name = _field(image, "filename", where, KARPATHY_LAYOUT)
        split = _field(image, "split", where, KARPATHY_LAYOUT)
        captions = tuple(_field(s, "raw", f"{where}.sentences[{j}]", KARPATHY_LAYOUT)
                         for j, s in enumerate(_field(image, "sentences", where, KARPATHY_LAYOUT)))
        record = _image_record(name, captions, Path(image_root) / image.get("filepath", ""), image.get("cocoid"))
        splits.setdefault(restval_split if split == "restval" else split, []).append(record)
    return Source(f"karpathy {split_file}", {split: _by_key(records) for split, records in splits.items()})


# ------------------------------------------------------------------------------------ CSV / TSV / JSONL

def table_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    return {".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(suffix, "csv")


def read_table(tables: list[tuple[str | None, Path]], image_dir: Path | None, image_column: str,
               caption_column: str, split_column: str | None = None, fmt: str | None = None) -> Source:
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
        rows = _table_rows(table, fmt or table_format(table), columns)
        images, row_problems = _group_rows(table, rows, image_column, caption_column, split_column, split)
        problems += row_problems
        directory = Path(image_dir) if image_dir else table.parent
        for name, (image_split, captions) in images.items():
            record = _image_record(name, captions, directory)
            known_split, known_table = owner.setdefault(record.path, (image_split, table))
            if known_split != image_split:
                raise SourceError(f"{table}: {name} is in split {image_split!r} here and in {known_split!r} in "
                                  f"{known_table}; an image must be in one split only")
            records.setdefault(image_split, []).append(record)
    splits = {split: _by_key(split_records) for split, split_records in records.items()}
    return Source("table " + " ".join(str(t) for _, t in tables), splits, problems)


def _table_rows(path: Path, fmt: str, columns: tuple[str, ...]) -> Iterator[tuple[int, dict | Problem]]:
    """(line number, row) of a CSV/TSV/JSONL table; a line that cannot be read comes as a Problem."""
    with _open_text(path) as f:
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
                yield number, (Problem("malformed line", f"{path}:{number}", f"no {', '.join(map(repr, missing))}")
                               if missing else row)
            return
        reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise SourceError(f"{path}:1: no column {', '.join(map(repr, missing))} in the header "
                              f"(columns: {', '.join(reader.fieldnames or [])}); name the columns with "
                              "--image-column and --caption-column")
        for row in reader:
            if any(row[c] is None for c in columns):
                yield reader.line_num, Problem("malformed line", f"{path}:{reader.line_num}",
                                               f"fewer fields than the {len(reader.fieldnames)} columns")
            else:
                yield reader.line_num, row


def _cell_captions(value) -> list:
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


def _group_rows(path: Path, rows, image_column: str, caption_column: str, split_column: str | None = None,
                split: str | None = None) -> tuple[dict[str, tuple[str | None, list]], list[Problem]]:
    """Rows -> {image: (split, captions)} in first-seen order, plus the problems of unreadable lines."""
    images: dict[str, tuple[str | None, list]] = {}
    problems = []
    for number, row in rows:
        if isinstance(row, Problem):
            problems.append(row)
            continue
        image, captions = str(row[image_column]), _cell_captions(row[caption_column])
        row_split = str(row[split_column]) if split_column else split
        known_split, known = images.setdefault(image, (row_split, []))
        if known_split != row_split:
            raise SourceError(f"{path}:{number}: {image} is in split {row_split!r} here and in {known_split!r} "
                              "on an earlier line; an image must be in one split only")
        known.extend(captions)
    return images, problems


# ---------------------------------------------------------------------------------- Hugging Face datasets

def read_hf(dataset: str, image_column: str, caption_column: str, splits: list[tuple[str, str]] | None = None,
            id_column: str | None = None) -> Source:
    """A local `imagefolder` (images + metadata.jsonl/metadata.csv), a save_to_disk directory, or a hub name.

    splits: (imcap split, dataset split) pairs; default every split of the dataset, `validation` named val.
    The image column holds images (their original bytes or files are used) or paths. An image's id is
    id_column's value, else its file name without the extension (in an imagefolder, as its metadata names
    it: cats/1), else its row number. Row order is kept."""
    import datasets  # slow to import, and only this source needs it

    path = Path(dataset)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        else:
            loaded = datasets.load_dataset(dataset)
    except Exception as e:  # datasets raises many kinds: missing files, bad metadata, no network
        raise SourceError(f"cannot load the dataset {dataset}: {type(e).__name__}: {e}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    pairs = splits or [("val" if name == "validation" else name, name) for name in loaded]
    records = {}
    for split, dataset_split in pairs:
        if dataset_split not in loaded:
            raise SourceError(f"{dataset} has no split {dataset_split!r} (splits: {', '.join(loaded)})")
        table = loaded[dataset_split]
        columns = [image_column, caption_column, *([id_column] if id_column else [])]
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise SourceError(f"{dataset} split {dataset_split!r} has no column {', '.join(map(repr, missing))} "
                              f"(columns: {', '.join(table.column_names)}); name them with --image-column, "
                              "--caption-column, --id-column")
        table = table.select_columns(columns)
        if isinstance(table.features[image_column], datasets.Image):
            table = table.cast_column(image_column, datasets.Image(decode=False))  # the original bytes, undecoded
        records[split] = _HFRecords(table, f"{dataset}[{dataset_split}]", path if path.is_dir() else None,
                                     image_column, caption_column, id_column)
    return Source(f"hf {dataset}", records)


IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


class _HFRecords:
    """The records of one dataset split, read row by row (a sized iterable, for the progress bar)."""

    def __init__(self, table, name: str, root: Path | None, image_column: str, caption_column: str,
                 id_column: str | None):
        self.table, self.name, self.root = table, name, root
        self.image_column, self.caption_column, self.id_column = image_column, caption_column, id_column

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[Record]:
        for number, row in enumerate(self.table):
            image = row[self.image_column]
            data = image.get("bytes") if isinstance(image, dict) else None
            file = image.get("path") if isinstance(image, dict) else image
            path = None if data is not None or not file else (self.root / file if self.root else Path(file))
            image_id = (row[self.id_column] if self.id_column
                        else self._name(file) if file else f"{number:08d}")
            yield Record(sample_key(str(image_id)), image_id, tuple(_cell_captions(row[self.caption_column])),
                         str(path) if path else f"{self.name} row {number}", path, data)

    def _name(self, file: str) -> str:
        """A local imagefolder's image: its path relative to the folder of the metadata file naming it (its
        split's, or the dataset's), without the extension, as that file names it (cats/1.jpg -> cats/1);
        other images: the file name without the extension."""
        if self.root and Path(file).is_absolute():
            root = self.root.resolve()
            for folder in Path(file).parents:
                if folder == root or any((folder / name).exists() for name in IMAGEFOLDER_METADATA):
                    return str(Path(file).relative_to(folder).with_suffix(""))
        return PurePath(file).stem


# ------------------------------------------------------------------------------ WebDataset / img2dataset

def read_webdataset(split_shards: list[tuple[str, str]]) -> Source:
    """(split, shards) pairs, shards a directory (its {split}-*.tar) or a brace/glob pattern such as
    'laion/{00000..00099}.tar' (img2dataset). Samples as the trainer reads them; shard order kept."""
    return Source("webdataset " + " ".join(spec for _, spec in split_shards),
                  {split: _shard_records(webdataset_shards(spec, split)) for split, spec in split_shards})


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
            yield Record(sample_key(sample["__key__"]), sample_id, captions, origin, data=sample[ext])
        if errors:
            yield Problem("unreadable shard", shard, errors[0])
