"""`imcap shards build SOURCE OUT ...` (one subcommand per source layout) and `imcap shards check PATH`."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from imcap.data import sources
from imcap.data.build import BuildOptions, build_shards, build_summary
from imcap.data.check import check_shards
from imcap.data.sources import Source, SourceError
from imcap.runtime import available_cores


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
    options = BuildOptions(
        resize=args.resize,
        quality=args.quality,
        shard_samples=samples,
        shard_bytes=size_bytes,
        min_word_count=args.min_word_count,
    )
    report = build_shards(args.read(args), args.out, options, workers=args.workers)
    print(build_summary(report, Path(args.out), time.perf_counter() - started))


def cmd_check(args) -> int:
    """-> 1 when the shards have problems: a result of the check, printed with them, not an error."""
    problems, summary = check_shards(args.path, workers=args.workers, fix_sizes=args.fix_sizes)
    print("\n".join([*problems, summary]))
    return 1 if problems else 0


def _read_webdataset(args) -> Source:
    out = Path(args.out).resolve()
    for split, spec in args.split:
        if any(Path(shard).resolve().parent == out for shard in sources.webdataset_shards(spec, split)):
            raise SourceError(f"{spec} is in the output directory {args.out}: re-shard into another directory")
    return sources.read_webdataset(args.split)


def add_commands(subparsers) -> None:
    """`imcap shards build SOURCE OUT ...` and `imcap shards check PATH`."""
    shards = subparsers.add_parser("shards", help="write caption datasets as shards; check shards")
    commands = shards.add_subparsers(dest="shards_command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "out",
        help="output directory: {split}-NNNNNN.tar, sizes.json, vocab.json, report.json "
        "(an earlier build there is replaced)",
    )
    common.add_argument(
        "--resize",
        type=int,
        default=0,
        metavar="N",
        help="store images whose shorter side is longer than N pixels shrunk to N (aspect kept) "
        "as JPEG; default: keep every image's original bytes",
    )
    common.add_argument("--quality", type=int, default=BuildOptions.quality, help="JPEG quality with --resize")
    common.add_argument(
        "--shard-size",
        type=parse_shard_size,
        default=(1000, 0),
        metavar="SIZE",
        help="samples per shard (1000) or bytes per shard (256MB); default 1000 samples",
    )
    common.add_argument(
        "--workers",
        type=_workers,
        default=available_cores(),
        help="processes reading and checking images (default: every core)",
    )
    common.add_argument(
        "--min-word-count",
        type=int,
        default=BuildOptions.min_word_count,
        help="words rarer than this in the train captions are left out of vocab.json",
    )

    build = commands.add_parser("build", help="write a caption dataset as shards, one subcommand per source layout")
    layouts = build.add_subparsers(dest="source", required=True, metavar="SOURCE")

    p = layouts.add_parser(
        "flickr",
        parents=[common],
        help="Flickr8k / Flickr30k captions and split lists",
        description=f"Captions: {sources.FLICKR_LAYOUTS}.",
    )
    p.add_argument("--captions", type=Path, required=True, help="Flickr8k.token.txt, captions.txt or results.csv")
    p.add_argument("--images", type=Path, required=True, help="the directory of the images")
    p.add_argument(
        "--split",
        nargs=2,
        action="append",
        required=True,
        metavar=("NAME", "LIST"),
        help="a split and its image list, e.g. --split train Flickr_8k.trainImages.txt (repeatable)",
    )
    p.set_defaults(read=lambda a: sources.read_flickr(a.captions, a.images, a.split))

    p = layouts.add_parser("coco", parents=[common], help="COCO captions JSON (captions_train2017.json)")
    p.add_argument(
        "--split",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "CAPTIONS_JSON", "IMAGES"),
        help="e.g. --split train annotations/captions_train2017.json train2017 (repeatable)",
    )
    p.set_defaults(read=lambda a: sources.read_coco(a.split))

    p = layouts.add_parser("karpathy", parents=[common], help="Karpathy split JSON (dataset_coco.json, ...)")
    p.add_argument("--karpathy", type=Path, required=True, help="dataset_coco.json, dataset_flickr8k.json, ...")
    p.add_argument("--images", type=Path, required=True, help="the directory the entries' filepath/filename are in")
    p.add_argument("--restval-split", default="train", help="where Karpathy's restval images go (default: train)")
    p.set_defaults(read=lambda a: sources.read_karpathy(a.karpathy, a.images, a.restval_split))

    p = layouts.add_parser(
        "table",
        parents=[common],
        help="CSV, TSV or JSONL: an image path and caption(s) per row",
        description="Several captions of an image: repeated rows, or a list (JSONL) or a "
        "JSON list in a CSV/TSV cell. A line that cannot be read is reported.",
    )
    tables = p.add_mutually_exclusive_group(required=True)
    tables.add_argument(
        "--split", nargs=2, action="append", metavar=("NAME", "TABLE"), help="a split and its table (repeatable)"
    )
    tables.add_argument("--table", type=Path, help="one table for every split, with --split-column")
    p.add_argument("--split-column", help="the column holding each row's split (with --table)")
    p.add_argument("--images", type=Path, help="the directory image paths are relative to (default: the table's)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--format", choices=("csv", "tsv", "jsonl"), help="default: from the file's extension")
    p.set_defaults(read=_read_table)

    p = layouts.add_parser("hf", parents=[common], help="a Hugging Face dataset: imagefolder, save_to_disk or hub name")
    p.add_argument(
        "--dataset",
        required=True,
        help="an imagefolder directory (with metadata.jsonl or metadata.csv), "
        "a save_to_disk directory, or a hub name (needs the network)",
    )
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="text")
    p.add_argument("--id-column", help="image ids (default: the image's file name, else the row number)")
    p.add_argument(
        "--split",
        nargs=2,
        action="append",
        metavar=("NAME", "DATASET_SPLIT"),
        help="e.g. --split val validation (repeatable; default: every split, validation as val)",
    )
    p.set_defaults(read=lambda a: sources.read_hf(a.dataset, a.image_column, a.caption_column, a.split, a.id_column))

    p = layouts.add_parser("webdataset", parents=[common], help="re-shard WebDataset / img2dataset shards")
    p.add_argument(
        "--split",
        nargs=2,
        action="append",
        required=True,
        metavar=("NAME", "SHARDS"),
        help="a split and its shards: a directory (its NAME-*.tar) or a pattern such as "
        "'laion/{00000..00099}.tar' (repeatable)",
    )
    p.set_defaults(read=_read_webdataset)
    for layout in layouts.choices.values():
        layout.set_defaults(func=cmd_build)

    p = commands.add_parser("check", help="decode every sample of every shard, compare counts with sizes.json")
    p.add_argument("path", help="a directory of shards (every .tar in it) or a brace/glob pattern")
    p.add_argument(
        "--fix-sizes",
        action="store_true",
        help="write the counted samples into sizes.json (e.g. for img2dataset shards, which have none)",
    )
    p.add_argument("--workers", type=_workers, default=available_cores())
    p.set_defaults(func=cmd_check)


def _read_table(args) -> Source:
    if args.table and not args.split_column:
        raise SourceError("--table needs --split-column (or give each split's table with --split NAME TABLE)")
    tables = [(None, args.table)] if args.table else args.split
    return sources.read_table(
        tables, args.images, args.image_column, args.caption_column, args.split_column, args.format
    )
