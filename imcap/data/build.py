"""Building shards from a caption source (imcap/data/sources.py), checking shards, and the `imcap shards` command.

    records of a split -> pool of workers: drop bad captions, read the image, decode it in full (as the
    trainer would), optionally shrink and re-encode it -> samples, in record order -> ShardWriter
    -> {split}-NNNNNN.tar (each renamed into place when complete), sizes.json as each split closes,
    then vocab.json (train captions only) and, last, report.json: a build without it did not finish.

The same records and options give byte-identical shards: records come in a fixed order, the pool hands
results back in that order, and tar headers carry nothing of this machine. Bad input never stops a build:
each image or caption left out is counted by reason and named in report.json.
"""
from __future__ import annotations

import argparse
import functools
import glob
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

from PIL import Image
from tqdm import tqdm

from imcap.data import sources
from imcap.data.samples import SampleError, decode_image, decode_sample, open_image
from imcap.data.shards import DataError, list_shards, read_shard
from imcap.data.shards import FEATURES_DIR, SIZES_FILE, ShardWriter, read_sizes, update_sizes
from imcap.data.sources import Problem, Record, Source, SourceError
from imcap.text import VOCAB_FILE, Vocabulary

REPORT_FILE = "report.json"
TRAIN_SPLIT = "train"  # the vocabulary is built from this split's captions only
CHECK_IMAGE_SIZE = 224  # check decodes as training at 224 px does (JPEGs drafted towards it)
_STORED_AS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # formats the pipeline reads as they are


@dataclass(frozen=True)
class BuildOptions:
    resize: int = 0  # >0: images whose shorter side is longer are shrunk to it and stored as JPEG
    quality: int = 90  # JPEG quality of re-encoded images
    shard_samples: int = 1000  # 0: no limit in samples (shard_bytes sets the size)
    shard_bytes: int = 0  # >0: a shard is closed once it reaches about this many bytes
    min_word_count: int = 5


# ------------------------------------------------------------------------------------------ one record

class Encoded(NamedTuple):
    sample: dict | None  # None: the image was left out
    captions: list[str]
    problems: list[Problem]


class _ImageProblem(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def caption_problem(caption) -> str | None:
    if not isinstance(caption, str):
        return "caption not text"
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:  # undecodable source bytes, kept as surrogates by the readers
        return "caption not valid UTF-8"
    return None if caption.strip() else "empty caption"


def _shown(caption) -> str:
    if isinstance(caption, str):
        return caption.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return repr(caption)


def encode_record(record: Record, resize: int, quality: int) -> Encoded:
    """A record -> a sample (image, `json` with image_id and captions, `txt` with the first caption)."""
    problems, captions = [], []
    for caption in record.captions:
        reason = caption_problem(caption)
        if reason:
            problems.append(Problem(reason, record.origin, _shown(caption)))
        else:
            captions.append(caption)
    if not captions:
        return Encoded(None, [], problems + [Problem("no captions", record.origin)])
    try:
        ext, data = stored_image(_image_bytes(record), resize, quality)
    except _ImageProblem as e:
        return Encoded(None, [], problems + [Problem(e.reason, record.origin, e.detail)])
    meta = {"image_id": record.image_id, "captions": captions}
    sample = {"__key__": record.key, ext: data, "txt": captions[0].encode("utf-8"),
              "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    return Encoded(sample, captions, problems)


def _image_bytes(record: Record) -> bytes:
    if record.data is not None:
        data = record.data
    else:
        try:
            data = record.path.read_bytes()
        except FileNotFoundError:
            raise _ImageProblem("missing file") from None
        except OSError as e:
            raise _ImageProblem("unreadable file", e.strerror or str(e)) from None
    if not data:
        raise _ImageProblem("empty file")
    return data


def stored_image(data: bytes, resize: int, quality: int) -> tuple[str, bytes]:
    """Image bytes -> (extension, bytes to store), after decoding them in full as the trainer would.

    Kept as they are unless resize asks to shrink them (shorter side to `resize`, aspect kept, JPEG at
    `quality`) or their format is one the pipeline does not read (stored as PNG, losslessly)."""
    try:
        with open_image(data) as image:
            fmt, (width, height) = image.format, image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _ImageProblem("decompression bomb", str(e)) from None
    except Exception as e:
        raise _ImageProblem("corrupt image", f"{type(e).__name__}: {e}") from None
    shrink = 0 < resize < min(width, height)
    try:
        image = decode_image(data, resize if shrink else max(width, height))  # the whole image: finds truncation
    except Exception as e:
        raise _ImageProblem("corrupt image", f"{type(e).__name__}: {e}") from None
    if shrink:
        scale = resize / min(image.size)
        size = (max(resize, round(image.width * scale)), max(resize, round(image.height * scale)))
        out = io.BytesIO()
        image.resize(size, Image.LANCZOS).save(out, format="JPEG", quality=quality)
        return "jpg", out.getvalue()
    if fmt in _STORED_AS:
        return _STORED_AS[fmt], data
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "png", out.getvalue()


# ------------------------------------------------------------------------------------------- the build

def build_shards(source: Source, out_dir: str | Path, options: BuildOptions, workers: int = 1) -> dict:
    """Write the source's splits as shards into out_dir, replacing an earlier build there; -> the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_earlier_build(out_dir, source.splits)
    problems = list(source.problems)
    splits, train_captions = {}, []
    encode = functools.partial(encode_record, resize=options.resize, quality=options.quality)
    max_samples = options.shard_samples or sys.maxsize
    with _ordered_map(workers) as ordered_map:
        for split, items in source.splits.items():
            images = captions = 0
            total = len(items) if hasattr(items, "__len__") else None
            reader_problems, image_problems = [], []  # apart: the pool's feeder thread fills the first
            with ShardWriter(out_dir, split, max_samples=max_samples, max_bytes=options.shard_bytes) as writer:
                results = ordered_map(encode, _unique_records(items, reader_problems))
                for sample, sample_captions, sample_problems in tqdm(results, total=total, desc=split,
                                                                     unit="img", disable=None):
                    image_problems += sample_problems
                    if sample is None:
                        continue
                    writer.write(sample)
                    images, captions = images + 1, captions + len(sample_captions)
                    if split == TRAIN_SPLIT:
                        train_captions += sample_captions
            problems += reader_problems + image_problems
            splits[split] = {"images": images, "captions": captions, "shards": len(writer.sizes)}
    vocabulary = None
    if TRAIN_SPLIT in splits:
        vocab = Vocabulary.build(train_captions, options.min_word_count)
        vocab.save(out_dir / VOCAB_FILE)
        vocabulary = {"words": len(vocab), "min_word_count": options.min_word_count}
    report = {"source": source.description, "options": asdict(options), "splits": splits,
              "vocabulary": vocabulary,
              "problems_by_reason": dict(sorted(Counter(p.reason for p in problems).items())),
              "problems": [{"reason": p.reason, "file": p.origin, "detail": p.detail} for p in problems]}
    tmp = out_dir / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    os.replace(tmp, out_dir / REPORT_FILE)
    return report


def _remove_earlier_build(out_dir: Path, splits: Iterable[str]) -> None:
    """Completion markers first, so that a build interrupted from here on never looks finished; and the
    feature caches made from the earlier shards."""
    earlier_shards = [out_dir / name for name in read_sizes(out_dir)]
    for name in (REPORT_FILE, VOCAB_FILE):
        (out_dir / name).unlink(missing_ok=True)
    if (out_dir / FEATURES_DIR).exists():
        shutil.rmtree(out_dir / FEATURES_DIR)
    same_splits = [p for split in splits for p in out_dir.glob(f"{glob.escape(split)}-{'[0-9]' * 6}.tar")]
    for path in {*earlier_shards, *same_splits, *out_dir.glob(".*.tar.tmp")}:  # .tmp: shards never finished
        path.unlink(missing_ok=True)
    (out_dir / SIZES_FILE).unlink(missing_ok=True)


def _unique_records(items: Iterable[Record | Problem], problems: list[Problem]):
    """The records, with the source's problems and any second record of a key moved into `problems`."""
    keys = set()
    for item in items:
        if isinstance(item, Problem):
            problems.append(item)
        elif item.key in keys:
            problems.append(Problem("duplicate key", item.origin, f"key {item.key} (image id {item.image_id})"))
        else:
            keys.add(item.key)
            yield item


@contextmanager
def _ordered_map(workers: int):
    """map over `workers` processes, results in input order; one worker maps in this process.
    One task per item: a chunk would wait for items that a streaming source has not produced yet.
    Spawned, not forked: a fork of a process whose torch/OpenMP threads have run can hang in its children."""
    if workers <= 1:
        yield map
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield pool.imap


def build_summary(report: dict, out_dir: Path, seconds: float) -> str:
    lines = [f"{split}: {s['images']} images, {s['captions']} captions, {s['shards']} shards"
             for split, s in report["splits"].items()]
    images = sum(s["images"] for s in report["splits"].values())
    lines.append(f"{images} images in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s) into {out_dir}")
    if report["vocabulary"]:
        lines.append(f"vocabulary: {report['vocabulary']['words']} words seen at least "
                     f"{report['vocabulary']['min_word_count']} times in {TRAIN_SPLIT} captions ({VOCAB_FILE})")
    else:
        lines.append(f"no {TRAIN_SPLIT!r} split: no {VOCAB_FILE} written")
    if report["problems"]:
        lines.append("left out: " + ", ".join(f"{n} x {reason}" for reason, n in report["problems_by_reason"].items()))
        lines += [f"  {p['reason']}: {p['file']}" + (f" ({p['detail']})" if p["detail"] else "")
                  for p in report["problems"][:10]]
        if len(report["problems"]) > 10:
            lines.append(f"  ... {len(report['problems']) - 10} more")
    lines.append(f"every problem is listed in {out_dir / REPORT_FILE}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the check

class ShardCheck(NamedTuple):
    shard: str
    samples: int
    bad: list[tuple[str, str]]  # (key, reason) of samples the trainer would skip
    unreadable: str  # why the tar could not be read to its end; "" when it could


def check_shard(shard: str) -> ShardCheck:
    errors: list[str] = []
    bad, samples = [], 0
    for sample in read_shard(shard, errors):
        samples += 1
        try:
            decode_sample(sample, CHECK_IMAGE_SIZE, None)
        except SampleError as e:
            bad.append((sample["__key__"], str(e)))
    return ShardCheck(shard, samples, bad, errors[0] if errors else "")


def check_shards(spec: str, workers: int = 1, fix_sizes: bool = False) -> tuple[list[str], str]:
    """Decode every sample of every shard and compare the counts with sizes.json.
    -> (problems, each naming its shard and where possible its key; a summary line)."""
    shards = list_shards(spec)  # every .tar of a directory, any split
    with _ordered_map(min(workers, len(shards))) as ordered_map:
        checks = list(tqdm(ordered_map(check_shard, shards), total=len(shards), desc="check", unit="shard",
                           disable=None))
    problems = []
    for check in checks:
        problems += [f"{check.shard}: key {key}: {reason}" for key, reason in check.bad]
        if check.unreadable:
            problems.append(f"{check.shard}: unreadable after {check.samples} samples: {check.unreadable}")
    counted: dict[Path, dict[str, int]] = {}
    for check in checks:
        counted.setdefault(Path(check.shard).parent, {})[Path(check.shard).name] = check.samples
    wrong_sizes = 0
    for directory, counts in counted.items():
        try:
            sizes = read_sizes(directory)
        except ValueError as e:  # a sizes.json that is not one: --fix-sizes writes a new one
            sizes = {}
            problems.append(str(e))
            if fix_sizes:
                (directory / SIZES_FILE).unlink()
        wrong = [(name, n) for name, n in counts.items() if sizes.get(name) != n]
        wrong_sizes += len(wrong)
        if fix_sizes and wrong:
            update_sizes(directory, counts)
            continue
        problems += [f"{directory / name}: {directory / SIZES_FILE} " +
                     (f"says {sizes[name]} samples, the shard holds {n}" if name in sizes else
                      f"has no entry (the shard holds {n} samples); run `imcap shards check --fix-sizes`")
                     for name, n in wrong]
    bad = sum(len(c.bad) for c in checks)
    summary = (f"checked {len(shards)} shards, {sum(c.samples for c in checks)} samples: {bad} bad samples, "
               f"{sum(bool(c.unreadable) for c in checks)} unreadable shards, {wrong_sizes} sample counts "
               + ("fixed in sizes.json" if fix_sizes else "missing from or wrong in sizes.json"))
    return problems, summary


# -------------------------------------------------------------------------------------------- the CLI

def parse_shard_size(text: str) -> tuple[int, int]:
    """'1000' -> 1000 samples per shard; '256MB' (KB, MB, GB: powers of 1000) -> about that many bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]B)?\s*", text, re.IGNORECASE)
    if not match or int(match[1]) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shard size: give samples (1000) or bytes (256MB)")
    if match[2] is None:
        return int(match[1]), 0
    return 0, int(match[1]) * 1000 ** ("KMG".index(match[2][0].upper()) + 1)


def _workers(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of processes, at least 1")
    return int(text)


def cmd_build(args) -> None:
    started = time.perf_counter()
    samples, size_bytes = args.shard_size
    options = BuildOptions(resize=args.resize, quality=args.quality, shard_samples=samples, shard_bytes=size_bytes,
                           min_word_count=args.min_word_count)
    try:
        source = args.read(args)
        report = build_shards(source, args.out, options, workers=args.workers)
    except (SourceError, DataError) as e:
        sys.exit(f"imcap shards build: {e}")
    print(build_summary(report, Path(args.out), time.perf_counter() - started))


def cmd_check(args) -> None:
    try:
        problems, summary = check_shards(args.path, workers=args.workers, fix_sizes=args.fix_sizes)
    except DataError as e:
        sys.exit(f"imcap shards check: {e}")
    print("\n".join([*problems, summary]))
    if problems:
        sys.exit(1)


def _read_webdataset(args) -> Source:
    out = Path(args.out).resolve()
    for split, spec in args.split:
        if any(Path(shard).resolve().parent == out for shard in sources.webdataset_shards(spec, split)):
            raise SourceError(f"{spec} is in the output directory {args.out}: re-shard into another directory")
    return sources.read_webdataset(args.split)


def add_shards_commands(subparsers) -> None:
    """`imcap shards build SOURCE OUT ...` and `imcap shards check PATH`."""
    shards = subparsers.add_parser("shards", help="write caption datasets as shards; check shards")
    commands = shards.add_subparsers(dest="shards_command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("out", help="output directory: {split}-NNNNNN.tar, sizes.json, vocab.json, report.json "
                                    "(an earlier build there is replaced)")
    common.add_argument("--resize", type=int, default=0, metavar="N",
                        help="store images whose shorter side is longer than N pixels shrunk to N (aspect kept) "
                             "as JPEG; default: keep every image's original bytes")
    common.add_argument("--quality", type=int, default=BuildOptions.quality, help="JPEG quality with --resize")
    common.add_argument("--shard-size", type=parse_shard_size, default=(1000, 0), metavar="SIZE",
                        help="samples per shard (1000) or bytes per shard (256MB); default 1000 samples")
    common.add_argument("--workers", type=_workers, default=len(os.sched_getaffinity(0)),
                        help="processes reading and checking images (default: every core)")
    common.add_argument("--min-word-count", type=int, default=BuildOptions.min_word_count,
                        help="words rarer than this in the train captions are left out of vocab.json")

    build = commands.add_parser("build", help="write a caption dataset as shards, one subcommand per source layout")
    layouts = build.add_subparsers(dest="source", required=True, metavar="SOURCE")

    p = layouts.add_parser("flickr", parents=[common], help="Flickr8k / Flickr30k captions and split lists",
                           description=f"Captions: {sources.FLICKR_LAYOUTS}.")
    p.add_argument("--captions", type=Path, required=True, help="Flickr8k.token.txt, captions.txt or results.csv")
    p.add_argument("--images", type=Path, required=True, help="the directory of the images")
    p.add_argument("--split", nargs=2, action="append", required=True, metavar=("NAME", "LIST"),
                   help="a split and its image list, e.g. --split train Flickr_8k.trainImages.txt (repeatable)")
    p.set_defaults(read=lambda a: sources.read_flickr(a.captions, a.images, a.split))

    p = layouts.add_parser("coco", parents=[common], help="COCO captions JSON (captions_train2017.json)")
    p.add_argument("--split", nargs=3, action="append", required=True, metavar=("NAME", "CAPTIONS_JSON", "IMAGES"),
                   help="e.g. --split train annotations/captions_train2017.json train2017 (repeatable)")
    p.set_defaults(read=lambda a: sources.read_coco(a.split))

    p = layouts.add_parser("karpathy", parents=[common], help="Karpathy split JSON (dataset_coco.json, ...)")
    p.add_argument("--karpathy", type=Path, required=True, help="dataset_coco.json, dataset_flickr8k.json, ...")
    p.add_argument("--images", type=Path, required=True, help="the directory the entries' filepath/filename are in")
    p.add_argument("--restval-split", default="train", help="where Karpathy's restval images go (default: train)")
    p.set_defaults(read=lambda a: sources.read_karpathy(a.karpathy, a.images, a.restval_split))

    p = layouts.add_parser("table", parents=[common], help="CSV, TSV or JSONL: an image path and caption(s) per row",
                           description="Several captions of an image: repeated rows, or a list (JSONL) or a "
                                       "JSON list in a CSV/TSV cell. A line that cannot be read is reported.")
    tables = p.add_mutually_exclusive_group(required=True)
    tables.add_argument("--split", nargs=2, action="append", metavar=("NAME", "TABLE"),
                        help="a split and its table (repeatable)")
    tables.add_argument("--table", type=Path, help="one table for every split, with --split-column")
    p.add_argument("--split-column", help="the column holding each row's split (with --table)")
    p.add_argument("--images", type=Path, help="the directory image paths are relative to (default: the table's)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--format", choices=("csv", "tsv", "jsonl"), help="default: from the file's extension")
    p.set_defaults(read=_read_table)

    p = layouts.add_parser("hf", parents=[common], help="a Hugging Face dataset: imagefolder, save_to_disk or hub name")
    p.add_argument("--dataset", required=True, help="an imagefolder directory (with metadata.jsonl or metadata.csv), "
                                                    "a save_to_disk directory, or a hub name (needs the network)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="text")
    p.add_argument("--id-column", help="image ids (default: the image's file name, else the row number)")
    p.add_argument("--split", nargs=2, action="append", metavar=("NAME", "DATASET_SPLIT"),
                   help="e.g. --split val validation (repeatable; default: every split, validation as val)")
    p.set_defaults(read=lambda a: sources.read_hf(a.dataset, a.image_column, a.caption_column, a.split, a.id_column))

    p = layouts.add_parser("webdataset", parents=[common], help="re-shard WebDataset / img2dataset shards")
    p.add_argument("--split", nargs=2, action="append", required=True, metavar=("NAME", "SHARDS"),
                   help="a split and its shards: a directory (its NAME-*.tar) or a pattern such as "
                        "'laion/{00000..00099}.tar' (repeatable)")
    p.set_defaults(read=_read_webdataset)
    for layout in layouts.choices.values():
        layout.set_defaults(func=cmd_build)

    p = commands.add_parser("check", help="decode every sample of every shard, compare counts with sizes.json")
    p.add_argument("path", help="a directory of shards (every .tar in it) or a brace/glob pattern")
    p.add_argument("--fix-sizes", action="store_true",
                   help="write the counted samples into sizes.json (e.g. for img2dataset shards, which have none)")
    p.add_argument("--workers", type=_workers, default=len(os.sched_getaffinity(0)))
    p.set_defaults(func=cmd_check)


def _read_table(args) -> Source:
    if args.table and not args.split_column:
        raise SourceError("--table needs --split-column (or give each split's table with --split NAME TABLE)")
    tables = [(None, args.table)] if args.table else args.split
    return sources.read_table(tables, args.images, args.image_column, args.caption_column, args.split_column,
                              args.format)
