"""Building shards from a caption source (imcap/data/sources/).

    records of a split -> pool of workers: drop bad captions, read the image, decode it in full (as the
    trainer would), optionally shrink and re-encode it -> samples, in record order -> ShardWriter
    -> {split}-NNNNNN.tar (each renamed into place when complete), sizes.json as each split closes,
    then vocab.json (train captions only) and, last, report.json: a build without it did not finish.

The same records and options give byte-identical shards: records come in a fixed order, the pool hands
results back in that order, and tar headers carry nothing of this machine. Bad input never stops a build:
each image or caption left out is counted by reason and named in report.json.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import multiprocessing
import shutil
import sys
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image
from tqdm import tqdm

from imcap.data.samples import decode_image, open_image
from imcap.data.shards import FEATURES_DIR, SIZES_FILE, ShardWriter, atomic_write, read_sizes
from imcap.data.sources import Problem, Record, Source
from imcap.text import VOCAB_FILE, Vocabulary, tokenize

REPORT_FILE = "report.json"
TRAIN_SPLIT = "train"  # the vocabulary is built from this split's captions only
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
    if not caption.strip():
        return "empty caption"
    return None if tokenize(caption) else "caption without words"  # it would train as <start> <end> alone


def _shown(caption) -> str:
    if isinstance(caption, str):
        return caption.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return repr(caption)


def encode_record(record: Record, resize: int, quality: int) -> Encoded:
    """A record -> a sample (image, `json` with image_id, captions and the source's file name, `txt` with the
    first caption)."""
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
    meta = {"image_id": record.image_id, "captions": captions, **({"file": record.name} if record.name else {})}
    sample = {
        "__key__": record.key,
        ext: data,
        "txt": captions[0].encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }
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
    with ordered_pool(workers) as ordered_map:
        for split, items in source.splits.items():
            images = captions = 0
            total = len(items) if hasattr(items, "__len__") else None
            reader_problems, image_problems = [], []  # apart: the pool's feeder thread fills the first
            with ShardWriter(out_dir, split, max_samples=max_samples, max_bytes=options.shard_bytes) as writer:
                results = ordered_map(encode, _unique_records(items, reader_problems))
                for sample, sample_captions, sample_problems in tqdm(
                    results, total=total, desc=split, unit="img", disable=None
                ):
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
    report = {
        "source": source.description,
        "options": asdict(options),
        "splits": splits,
        "vocabulary": vocabulary,
        "problems_by_reason": dict(sorted(Counter(p.reason for p in problems).items())),
        "problems": [{"reason": p.reason, "file": p.origin, "detail": p.detail} for p in problems],
    }
    atomic_write(out_dir / REPORT_FILE, json.dumps(report, indent=1, ensure_ascii=False))
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
def ordered_pool(workers: int):
    """map over `workers` processes, results in input order; one worker maps in this process.
    One task per item: a chunk would wait for items that a streaming source has not produced yet.
    Spawned, not forked: a fork of a process whose torch/OpenMP threads have run can hang in its children."""
    if workers <= 1:
        yield map
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield pool.imap


def build_summary(report: dict, out_dir: Path, seconds: float) -> str:
    lines = [
        f"{split}: {s['images']} images, {s['captions']} captions, {s['shards']} shards"
        for split, s in report["splits"].items()
    ]
    images = sum(s["images"] for s in report["splits"].values())
    lines.append(f"{images} images in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s) into {out_dir}")
    if report["vocabulary"]:
        lines.append(
            f"vocabulary: {report['vocabulary']['words']} words seen at least "
            f"{report['vocabulary']['min_word_count']} times in {TRAIN_SPLIT} captions ({VOCAB_FILE})"
        )
    else:
        lines.append(f"no {TRAIN_SPLIT!r} split: no {VOCAB_FILE} written")
    if report["problems"]:
        lines.append("left out: " + ", ".join(f"{n} x {reason}" for reason, n in report["problems_by_reason"].items()))
        lines += [
            f"  {p['reason']}: {p['file']}" + (f" ({p['detail']})" if p["detail"] else "")
            for p in report["problems"][:10]
        ]
        if len(report["problems"]) > 10:
            lines.append(f"  ... {len(report['problems']) - 10} more")
    lines.append(f"every problem is listed in {out_dir / REPORT_FILE}")
    return "\n".join(lines)
