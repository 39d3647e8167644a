"""Benchmark (not a test): how fast `imcap shards build` writes Flickr8k (train + dev, 7,000 images) with 1 and 2
processes, and how fast the trainer decodes the resulting shards on one core (decode + resize + center crop to
224 px: imcap.data.samples.decode_sample), with and without pre-resizing at build time.

The Flickr8k copy in ../shared/data holds 224 x 224 images, so pre-resizing to 256 changes nothing there; the
decode figures are also given for COCO-mini (80 images of about 640 x 480, decoded several times over).

    .venv/bin/python bench/build_shards.py --limit 2000
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import PIL
import torch
import webdataset as wds

from imcap.data.build import BuildOptions, build_shards
from imcap.data.samples import decode_sample
from imcap.data.sources import read_coco, read_flickr

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def flickr_source(data: Path, limit: int, work: Path):
    """Train and dev lists cut to `limit` images in all, in Flickr8k's proportion (6,000 : 1,000)."""
    root = data / "flickr8k"
    train = (root / "Flickr_8k.trainImages.txt").read_text().split()
    dev = (root / "Flickr_8k.devImages.txt").read_text().split()
    if limit:
        train, dev = train[: round(limit * 6 / 7)], dev[: limit - round(limit * 6 / 7)]
    lists = []
    for split, names in (("train", train), ("val", dev)):
        lists.append((split, work / f"{split}.txt"))
        lists[-1][1].write_text("\n".join(names) + "\n")
    return read_flickr(root / "captions.txt", root / "images", lists), len(train) + len(dev)


def timed_build(source, out: Path, workers: int, resize: int) -> float:
    started = time.perf_counter()
    report = build_shards(source, out, BuildOptions(resize=resize, shard_samples=1000), workers=workers)
    seconds = time.perf_counter() - started
    images = sum(s["images"] for s in report["splits"].values())
    return images / seconds


def decode_rate(shard_dir: Path, passes: int = 1) -> tuple[float, int]:
    """Images/s of decode_sample at 224 px on one core, over samples already in memory; -> (rate, bytes per image)."""
    samples = list(wds.WebDataset(sorted(str(p) for p in shard_dir.glob("*.tar")), shardshuffle=False))
    image_bytes = sum(len(s.get("jpg", b"")) for s in samples) // len(samples)
    started = time.perf_counter()
    for _ in range(passes):
        for sample in samples:
            decode_sample(sample, 224, None)
    return passes * len(samples) / (time.perf_counter() - started), image_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--limit", type=int, default=0, help="build this many Flickr8k images (default: all 7,000)")
    parser.add_argument("--resize", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the start (other processes share the cores); "
        f"Python {platform.python_version()}, Pillow {PIL.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source, images = flickr_source(args.data, args.limit, work)
        print(f"Flickr8k: {images} images (train + dev), shards of 1000")
        for record in (r for records in source.splits.values() for r in records):
            record.path.read_bytes()  # into the page cache, so that the first build is not the only one reading disk
        for workers in (1, 2):
            rate = timed_build(source, work / f"flickr-{workers}", workers, resize=0)
            print(f"  build, original bytes, {workers} process(es): {rate:7.1f} images/s")
        rate = timed_build(source, work / "flickr-resized", 2, resize=args.resize)
        print(f"  build, --resize {args.resize}, 2 processes:      {rate:7.1f} images/s")
        for name in ("flickr-1", "flickr-resized"):
            rate, size = decode_rate(work / name)
            print(f"  decode + resize to 224, {name:15s} {rate:7.1f} images/s per core ({size // 1000} kB per image)")

        coco = args.data / "coco-mini"
        source = read_coco([("train", coco / "captions_train2017.json", coco / "train2017")])
        print("COCO-mini: 80 images, decoded 10 times over")
        for resize in (0, args.resize):
            out = work / f"coco-{resize}"
            build_shards(source, out, BuildOptions(resize=resize), workers=2)
            rate, size = decode_rate(out, passes=10)
            label = f"--resize {resize}" if resize else "original bytes"
            print(f"  decode + resize to 224, {label:15s} {rate:7.1f} images/s per core ({size // 1000} kB per image)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
