"""`imcap shards build` and `imcap shards check` on real files: the Flickr8k and COCO data in ../shared/data
in each layout they are distributed in, broken images, a build killed with SIGKILL, img2dataset shards."""

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.parse
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import ROOT, make_eval_loader, run_env
from PIL import Image

from imcap.cli import main as imcap
from imcap.cli.shards import parse_shard_size
from imcap.data.batch import Collate
from imcap.data.build import BuildOptions, build_shards
from imcap.data.check import check_shards
from imcap.data.samples import decode_image
from imcap.data.shards import DataError, ShardWriter, TarShard, count_samples, list_shards, read_sizes
from imcap.data.sources import SourceError, read_coco, read_flickr, read_hf, read_karpathy, read_table, read_webdataset
from imcap.data.training_data import split_captions
from imcap.text import Vocabulary

TRAIN_IMAGES, VAL_IMAGES = 40, 10  # a subset of Flickr8k's 6,000 + 1,000, for speed


# ------------------------------------------------------------------------------------------- helpers


def shard_samples(out_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of every shard in out_dir, read by plain webdataset."""
    urls = sorted(str(p) for p in Path(out_dir).glob("*.tar"))
    return {
        s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
        for s in wds.WebDataset(urls, shardshuffle=False)
    }


def shard_keys(shard: str | Path) -> list[str]:
    return [s["__key__"] for s in wds.WebDataset([str(shard)], shardshuffle=False)]


def tar_listing(shard: Path) -> list[str]:
    return subprocess.run(["tar", "tf", str(shard)], check=True, capture_output=True, text=True).stdout.split()


def all_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def build(source, out_dir: Path, workers: int = 1, **options) -> dict:
    return build_shards(
        source, out_dir, BuildOptions(**{"min_word_count": 1, "shard_samples": 16, **options}), workers=workers
    )


@pytest.fixture
def flickr(shared_data, tmp_path) -> dict:
    """The first 40 train and 10 dev images of Flickr8k, as split lists in tmp_path, and their captions
    read independently of imcap."""
    root = shared_data / "flickr8k"
    lists = {}
    for split, name, count in (
        ("train", "Flickr_8k.trainImages.txt", TRAIN_IMAGES),
        ("val", "Flickr_8k.devImages.txt", VAL_IMAGES),
    ):
        names = (root / name).read_text().split()[:count]
        lists[split] = tmp_path / name
        lists[split].write_text("\n".join(names) + "\n")
    with open(root / "captions.txt", newline="", encoding="utf-8") as f:
        captions = {}
        for row in csv.DictReader(f):
            captions.setdefault(row["image"], []).append(row["caption"])
    names = {split: path.read_text().split() for split, path in lists.items()}
    return {
        "captions_file": root / "captions.txt",
        "images": root / "images",
        "lists": lists,
        "names": names,
        "captions": captions,
        "tmp": tmp_path,
    }


def flickr_source(flickr):
    return read_flickr(flickr["captions_file"], flickr["images"], list(flickr["lists"].items()))


# --------------------------------------------------------------------------------- real data to shards


def test_flickr8k_csv_builds_shards_with_every_image_and_caption_byte_for_byte(flickr):
    out = flickr["tmp"] / "shards"
    report = build(flickr_source(flickr), out, workers=2)

    assert read_sizes(out) == {
        "train-000000.tar": 16,
        "train-000001.tar": 16,
        "train-000002.tar": 8,
        "val-000000.tar": 10,
    }
    assert report["splits"] == {
        "train": {"images": 40, "captions": 200, "shards": 3},
        "val": {"images": 10, "captions": 50, "shards": 1},
    }
    assert report["problems"] == []
    samples = shard_samples(out)
    for split, names in flickr["names"].items():
        keys = [Path(n).stem for n in names]
        in_shards = [k for shard in list_shards(str(out), split) for k in shard_keys(shard)]
        assert in_shards == sorted(keys)  # every image of the split, in key order
        for name, key in zip(names, keys):
            meta = json.loads(samples[key]["json"])
            assert meta == {"image_id": key, "captions": flickr["captions"][name], "file": name}
            assert samples[key]["txt"] == flickr["captions"][name][0].encode()
            assert samples[key]["jpg"] == (flickr["images"] / name).read_bytes()  # original bytes kept
    for shard in sorted(out.glob("*.tar")):
        keys = shard_keys(shard)
        assert tar_listing(shard) == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt")]
    train_captions = [c for n in flickr["names"]["train"] for c in flickr["captions"][n]]
    assert Vocabulary.load(out / "vocab.json") == Vocabulary.build(train_captions, 1)  # train split only
    assert check_shards(str(out))[0] == []


def test_coco_captions_json_builds_shards_with_every_image_and_caption(shared_data, tmp_path):
    coco = shared_data / "coco-mini"
    annotations = json.loads((coco / "captions_train2017.json").read_text())
    out = tmp_path / "coco"
    report = build(
        read_coco([("train", coco / "captions_train2017.json", coco / "train2017")]), out, workers=2, shard_samples=1000
    )

    assert report["splits"] == {"train": {"images": 80, "captions": 400, "shards": 1}} and report["problems"] == []
    samples = shard_samples(out)
    assert len(samples) == len(annotations["images"]) == 80
    for image in annotations["images"]:
        sample = samples[Path(image["file_name"]).stem]
        expected = [a["caption"] for a in annotations["annotations"] if a["image_id"] == image["id"]]
        assert json.loads(sample["json"]) == {"image_id": image["id"], "captions": expected, "file": image["file_name"]}
        assert sample["jpg"] == (coco / "train2017" / image["file_name"]).read_bytes()
    assert tar_listing(out / "train-000000.tar")[:3] == [f"{min(samples)}.{e}" for e in ("jpg", "json", "txt")]


# ------------------------------------------------------------- the same data in the other layouts


def write_token_file(flickr) -> tuple:
    path = flickr["tmp"] / "Flickr8k.token.txt"
    lines = [f"{name}#{i}\t{caption}" for name, caps in flickr["captions"].items() for i, caption in enumerate(caps)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return read_flickr(path, flickr["images"], list(flickr["lists"].items())), {}


def write_results_csv(flickr) -> tuple:
    """Flickr30k's results.csv layout, with one line missing its last field, as in the published file."""
    path = flickr["tmp"] / "results.csv"
    lines = ["image_name| comment_number| comment"]
    lines += [f"{name}| {i}| {caption}" for name, caps in flickr["captions"].items() for i, caption in enumerate(caps)]
    lines.insert(3, "2199200615.jpg| 4 A dog runs across the grass .")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return read_flickr(path, flickr["images"], list(flickr["lists"].items())), {"malformed line": 1}


def write_karpathy(flickr) -> tuple:
    """dataset_flickr8k.json, with some train images marked restval (folded into train by default)."""
    images = []
    for split, names in flickr["names"].items():
        for i, name in enumerate(names):
            karpathy_split = "restval" if split == "train" and i % 4 == 0 else split
            sentences = [{"raw": c, "tokens": c.lower().split()} for c in flickr["captions"][name]]
            images.append({"filename": name, "imgid": len(images), "split": karpathy_split, "sentences": sentences})
    path = flickr["tmp"] / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images[::-1], "dataset": "flickr8k"}))
    return read_karpathy(path, flickr["images"]), {}


def write_jsonl(flickr) -> tuple:
    """One JSONL for both splits: captions as a list, the split in a column."""
    path = flickr["tmp"] / "captions.jsonl"
    rows = [
        {"image": name, "captions": flickr["captions"][name], "split": split}
        for split, names in flickr["names"].items()
        for name in names
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_table([(None, path)], flickr["images"], "image", "captions", split_column="split"), {}


def write_tsv(flickr) -> tuple:
    """One TSV per split, one caption per row."""
    tables = []
    for split, names in flickr["names"].items():
        path = flickr["tmp"] / f"{split}.tsv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["path", "text"])
            writer.writerows([name, c] for name in names for c in flickr["captions"][name])
        tables.append((split, path))
    return read_table(tables, flickr["images"], "path", "text"), {}


def write_imagefolder(flickr) -> tuple:
    """A Hugging Face imagefolder: train/ and val/ with the images and a metadata.jsonl each."""
    root = flickr["tmp"] / "imagefolder"
    for split, names in flickr["names"].items():
        (root / split).mkdir(parents=True)
        with open(root / split / "metadata.jsonl", "w") as f:
            for name in names:
                (root / split / name).write_bytes((flickr["images"] / name).read_bytes())
                f.write(json.dumps({"file_name": name, "text": flickr["captions"][name]}) + "\n")
    return read_hf(str(root), "image", "text"), {}


def write_saved_dataset(flickr) -> tuple:
    """A Hugging Face dataset saved with save_to_disk: the image bytes are inside its arrow files."""
    import datasets

    write_imagefolder(flickr)
    datasets.load_dataset("imagefolder", data_dir=str(flickr["tmp"] / "imagefolder")).save_to_disk(
        flickr["tmp"] / "saved"
    )
    return read_hf(str(flickr["tmp"] / "saved"), "image", "text"), {}


@pytest.mark.parametrize(
    "layout",
    [
        write_token_file,
        write_results_csv,
        write_karpathy,
        write_jsonl,
        write_tsv,
        write_imagefolder,
        write_saved_dataset,
    ],
    ids=lambda f: f.__name__.removeprefix("write_"),
)
def test_every_layout_of_the_same_data_gives_the_same_samples(flickr, layout, monkeypatch):
    if layout in (write_imagefolder, write_saved_dataset):  # datasets caches what it loads: keep that in tmp_path
        import datasets

        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(flickr["tmp"] / "hf-cache"))
    build(flickr_source(flickr), flickr["tmp"] / "from-csv")
    source, expected_problems = layout(flickr)
    report = build(source, flickr["tmp"] / "from-layout")

    assert report["problems_by_reason"] == expected_problems
    assert shard_samples(flickr["tmp"] / "from-layout") == shard_samples(flickr["tmp"] / "from-csv")
    assert read_sizes(flickr["tmp"] / "from-layout") == read_sizes(flickr["tmp"] / "from-csv")


def test_imagefolder_images_of_one_name_in_two_folders_are_two_samples(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    split = tmp_path / "imagefolder" / "train"
    for folder, colour in (("cats", "red"), ("dogs", "green")):
        (split / folder).mkdir(parents=True)
        Image.new("RGB", (16, 16), colour).save(split / folder / "1.jpg")
    (split / "metadata.jsonl").write_text(
        '{"file_name": "cats/1.jpg", "text": "a cat"}\n{"file_name": "dogs/1.jpg", "text": "a dog"}\n'
    )
    report = build(read_hf(str(tmp_path / "imagefolder"), "image", "text"), tmp_path / "out")

    assert report["problems"] == []
    samples = shard_samples(tmp_path / "out")
    assert {key: json.loads(s["json"]) for key, s in samples.items()} == {
        "cats%2F1": {"image_id": "cats/1", "captions": ["a cat"], "file": "cats/1.jpg"},
        "dogs%2F1": {"image_id": "dogs/1", "captions": ["a dog"], "file": "dogs/1.jpg"},
    }


def test_names_that_differ_only_in_punctuation_or_script_are_all_kept_under_keys_that_give_the_name_back(tmp_path):
    """Space and underscore, two Cyrillic and two Chinese names of one length, a name whose key is longer than
    a ustar header holds, and re-sharded samples whose keys hold dots."""
    names = [
        "photo 1.jpg",
        "photo_1.jpg",
        "кошка.jpg",
        "мышка.jpg",
        "小猫.jpg",
        "小狗.jpg",
        "一张很长的中文文件名的照片示例.jpg",
    ]
    (tmp_path / "images").mkdir()
    for i, name in enumerate(names):
        Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(tmp_path / "images" / name)
    rows = [[name, f"picture number {i}"] for i, name in enumerate(names)]
    with open(tmp_path / "captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["image", "caption"], *rows])
    source = read_table([("train", tmp_path / "captions.csv")], tmp_path / "images", "image", "caption")
    report = build(source, tmp_path / "out")

    assert report["problems"] == [] and report["splits"]["train"]["images"] == len(names)
    samples = shard_samples(tmp_path / "out")
    assert sorted(urllib.parse.unquote(key) for key in samples) == sorted(Path(n).stem for n in names)
    assert not any("." in key for key in samples)
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        assert meta["file"] == f"{meta['image_id']}.jpg" == f"{urllib.parse.unquote(key)}.jpg"

    dotted = tmp_path / "dotted"
    with ShardWriter(dotted, "train", max_samples=4) as writer:
        for i in range(3):
            jpg = image_bytes(Image.new("RGB", (16, 16), (0, 40 * i, 0)), "JPEG")
            writer.write({"__key__": f"img.v2.part{i}", "jpg": jpg, "txt": f"green square {i}".encode()})
    report = build(read_webdataset([("train", str(dotted))]), tmp_path / "resharded")
    assert report["problems"] == []
    resharded = {key: json.loads(s["json"]) for key, s in shard_samples(tmp_path / "resharded").items()}
    assert resharded == {
        f"img%2Ev2%2Epart{i}": {
            "image_id": f"img.v2.part{i}",
            "captions": [f"green square {i}"],
            "file": f"img.v2.part{i}.jpg",
        }
        for i in range(3)
    }


# -------------------------------------------------------------------------------------------- bad input


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header says width x height: PIL sees the size without decoding anything."""
    data = bytearray(image_bytes(Image.new("L", (1, 1)), "PNG"))
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts after signature, length and type
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def write_test_images(directory: Path) -> dict[str, bytes]:
    """Good images in every awkward mode, and broken ones; -> name -> bytes written."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    files = {
        "photo.jpg": image_bytes(rgb, "JPEG"),
        "gray.jpg": image_bytes(rgb.convert("L"), "JPEG"),
        "rgba.png": image_bytes(rgba, "PNG"),
        "palette.png": image_bytes(rgb.quantize(16), "PNG"),
        "cmyk.jpg": image_bytes(rgb.convert("CMYK"), "JPEG"),
        "sixteen.png": image_bytes(Image.fromarray((np.arange(1200, dtype=np.uint16) * 50).reshape(30, 40)), "PNG"),
        "blank.jpg": image_bytes(rgb, "JPEG"),
        "latin1.jpg": image_bytes(rgb, "JPEG"),
        "corrupt.jpg": image_bytes(rgb, "JPEG")[:4] + rng.integers(0, 255, 3000, dtype=np.uint8).tobytes(),
        "truncated.png": image_bytes(rgb, "PNG")[:1500],
        "empty.jpg": b"",
        "bomb.png": png_claiming_size(20000, 20000),  # 400 megapixels
    }
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


GOOD = ["photo.jpg", "gray.jpg", "rgba.png", "palette.png", "cmyk.jpg", "sixteen.png", "latin1.jpg"]


@pytest.mark.parametrize("resize", [0, 24])
def test_bad_images_and_captions_are_reported_and_every_good_image_lands_in_the_shards(tmp_path, resize):
    files = write_test_images(tmp_path / "images")
    assert Image.open(tmp_path / "images" / "cmyk.jpg").mode == "CMYK"
    assert Image.open(tmp_path / "images" / "sixteen.png").mode.startswith("I;16")
    rows = [f"{name},a picture called {Path(name).stem}".encode() for name in files if name != "blank.jpg"]
    rows += [
        b"missing.jpg,a picture that is not there",
        b'blank.jpg,"   "',
        b"latin1.jpg,caf\xe9 au lait",
        b"half-a-row.jpg",
    ]
    (tmp_path / "captions.csv").write_bytes(b"image,caption\n" + b"\n".join(rows) + b"\n")
    source = read_table([("train", tmp_path / "captions.csv")], tmp_path / "images", "image", "caption")
    out = tmp_path / "shards"
    report = build(source, out, workers=2, resize=resize)

    found = sorted((p["reason"], Path(p["file"]).name) for p in report["problems"])
    assert found == sorted(
        [
            ("corrupt image", "corrupt.jpg"),
            ("corrupt image", "truncated.png"),
            ("empty file", "empty.jpg"),
            ("missing file", "missing.jpg"),
            ("decompression bomb", "bomb.png"),
            ("empty caption", "blank.jpg"),
            ("no captions", "blank.jpg"),
            ("caption not valid UTF-8", "latin1.jpg"),
            ("malformed line", f"captions.csv:{len(rows) + 1}"),
        ]
    )
    assert json.loads((out / "report.json").read_text())["problems"] == report["problems"]
    samples = shard_samples(out)
    assert sorted(samples) == sorted(Path(n).stem for n in GOOD)
    assert json.loads(samples["latin1"]["json"])["captions"] == ["a picture called latin1"]
    for name in GOOD:
        sample = samples[Path(name).stem]
        [ext] = [e for e in sample if e not in ("json", "txt")]
        stored = Image.open(io.BytesIO(sample[ext]))
        if resize:
            assert (ext, stored.format, stored.size) == ("jpg", "JPEG", (32, 24))
        else:
            assert (ext, sample[ext]) == (Path(name).suffix[1:], files[name])
        assert decode_image(sample[ext], 64).mode == "RGB"
    assert check_shards(str(out))[0] == []
    build(source, tmp_path / "again", workers=1, resize=resize)  # the same report and shards, in one process
    assert all_files(tmp_path / "again") == all_files(out)


def test_a_caption_of_punctuation_only_is_left_out_and_reported_as_without_words(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    (tmp_path / "captions.csv").write_text('image,caption\na.jpg,...\na.jpg,a black square\na.jpg,!!\nb.jpg," - "\n')
    report = build(read_table([("train", tmp_path / "captions.csv")], None, "image", "caption"), tmp_path / "out")

    assert report["problems_by_reason"] == {"caption without words": 3, "no captions": 1}
    assert sorted(p["detail"] for p in report["problems"] if p["reason"] == "caption without words") == [
        " - ",
        "!!",
        "...",
    ]
    samples = shard_samples(tmp_path / "out")
    assert list(samples) == ["a"] and json.loads(samples["a"]["json"])["captions"] == ["a black square"]


def test_a_row_listed_twice_in_a_table_gives_its_caption_once_and_is_reported(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    rows = ["a.jpg,a dog", "b.jpg,a dog", "a.jpg,a dog on grass", "a.jpg,a dog", 'b.jpg,"[""a cat"", ""a cat ""]"']
    (tmp_path / "captions.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    report = build(read_table([("train", tmp_path / "captions.csv")], None, "image", "caption"), tmp_path / "out")

    assert [(p["reason"], Path(p["file"]).name, p["detail"]) for p in report["problems"]] == [
        ("duplicate caption", "captions.csv:5", "a.jpg: 'a dog', as on line 2"),
        ("duplicate caption", "captions.csv:6", "b.jpg: 'a cat', as on line 6"),
    ]
    captions = {key: json.loads(s["json"])["captions"] for key, s in shard_samples(tmp_path / "out").items()}
    assert captions == {"a": ["a dog", "a dog on grass"], "b": ["a dog", "a cat"]}


@pytest.mark.parametrize(
    "write, expected",
    [
        (
            lambda p: p.write_text('{"images": [], "annotations": [\n{"image_id": 1,}]}'),
            r"captions\.json: not valid JSON at line 2, column \d+",
        ),
        (
            lambda p: p.write_text('{"images": [{"id": 1}], "annotations": []}'),
            r"captions\.json: images\[0\] has no 'file_name'",
        ),
        (lambda p: p.write_text('{"annotations": []}'), r"captions\.json has no 'images'"),
    ],
)
def test_a_coco_file_that_cannot_be_parsed_is_an_error_naming_the_file_and_place(tmp_path, write, expected):
    write(tmp_path / "captions.json")
    with pytest.raises(SourceError, match=expected):
        read_coco([("train", tmp_path / "captions.json", tmp_path)])


def test_a_table_without_the_caption_column_is_an_error_naming_file_and_columns(tmp_path):
    (tmp_path / "t.csv").write_text("image,text\na.jpg,a cat\n")
    with pytest.raises(SourceError, match=r"t\.csv:1: no column 'caption' in the header \(columns: image, text\)"):
        read_table([("train", tmp_path / "t.csv")], None, "image", "caption")


def test_an_image_in_the_tables_of_two_splits_is_an_error_naming_both(tmp_path):
    (tmp_path / "train.csv").write_text("image,caption\n0.jpg,a dog\n1.jpg,a cat\n")
    (tmp_path / "val.csv").write_text("image,caption\n1.jpg,a cat on a mat\n2.jpg,a bird\n")
    with pytest.raises(
        SourceError,
        match=r"val\.csv: 1\.jpg is in split 'val' here and in 'train' in .*train\.csv; "
        "an image must be in one split only",
    ):
        read_table([("train", tmp_path / "train.csv"), ("val", tmp_path / "val.csv")], None, "image", "caption")


def test_a_karpathy_entry_without_sentences_is_an_error_naming_it(tmp_path):
    (tmp_path / "k.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train"}]}))
    with pytest.raises(SourceError, match=r"k\.json: images\[0\] has no 'sentences'"):
        read_karpathy(tmp_path / "k.json", tmp_path)


# ----------------------------------------------------------------------------- interrupted and repeated


def test_a_build_replacing_an_earlier_one_removes_the_feature_caches_made_from_it(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.jpg")
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg,a black square\n")
    source = read_table([("train", tmp_path / "captions.csv")], None, "image", "caption")
    build(source, tmp_path / "shards")
    (tmp_path / "shards" / "features" / "0123456789abcdef").mkdir(parents=True)  # as `imcap features build` makes
    build(source, tmp_path / "shards")
    assert not (tmp_path / "shards" / "features").exists()


def test_same_inputs_and_options_give_byte_identical_shards(flickr):
    """Once here in one process, once through the command line in another (another hash seed) with a pool."""
    first = build(flickr_source(flickr), flickr["tmp"] / "first", workers=1, resize=128, quality=80)
    command = [
        sys.executable,
        "-m",
        "imcap.cli",
        "shards",
        "build",
        "flickr",
        str(flickr["tmp"] / "second"),
        "--captions",
        str(flickr["captions_file"]),
        "--images",
        str(flickr["images"]),
        *(a for split, path in flickr["lists"].items() for a in ("--split", split, str(path))),
        "--resize",
        "128",
        "--quality",
        "80",
        "--shard-size",
        "16",
        "--min-word-count",
        "1",
        "--workers",
        "2",
    ]
    done = subprocess.run(
        command, cwd=ROOT, env={**run_env(), "PYTHONHASHSEED": "12345"}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "train: 40 images, 200 captions, 3 shards" in done.stdout

    some_image = next(iter(shard_samples(flickr["tmp"] / "first").values()))["jpg"]
    assert first["options"]["resize"] == 128 and Image.open(io.BytesIO(some_image)).size == (128, 128)
    assert all_files(flickr["tmp"] / "first") == all_files(flickr["tmp"] / "second")


def test_shard_size_in_bytes_closes_each_shard_once_it_reaches_that_size(flickr):
    samples, size = parse_shard_size("300KB")
    report = build(flickr_source(flickr), flickr["tmp"] / "out", shard_samples=samples, shard_bytes=size)

    shards = sorted((flickr["tmp"] / "out").glob("train-*.tar"))
    assert (samples, size) == (0, 300_000) and len(shards) == report["splits"]["train"]["shards"] > 1
    largest_sample = max(len(s["jpg"]) for s in shard_samples(flickr["tmp"] / "out").values()) + 3 * 512
    for shard in shards[:-1]:
        assert 300_000 <= shard.stat().st_size < 300_000 + largest_sample + 10240  # + tar's end blocks
    assert parse_shard_size("1000") == (1000, 0) and parse_shard_size("2GB") == (0, 2_000_000_000)


def write_source_tar(path: Path, flickr, count: int) -> list[int]:
    """count Flickr8k samples as one tar; -> the byte offset at which each sample ends."""
    ends = []
    with TarShard(path) as shard:
        for name in sorted(flickr["captions"])[:count]:
            captions = flickr["captions"][name]
            shard.write(
                {
                    "__key__": Path(name).stem,
                    "jpg": (flickr["images"] / name).read_bytes(),
                    "json": json.dumps({"captions": captions}).encode(),
                }
            )
            ends.append(shard.file.tell())
    return ends


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert process.poll() is None, f"the build exited ({process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)
    return result


def open_for_writing(fifo: Path) -> int | None:
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO until a reader has the FIFO open
        return None


def test_a_build_killed_mid_way_leaves_no_complete_looking_shard_and_a_rerun_completes(flickr):
    """The build reads its input from a FIFO that the test feeds 23 samples and then holds open, so the
    build is certainly mid-way when it is killed: 5 shards of 4 done, the 6th holding 1 or 2 samples
    (the tar reader yields a sample once it has read the next one's image)."""
    tmp = flickr["tmp"]
    (tmp / "input").mkdir()
    ends = write_source_tar(tmp / "input" / "train-000000.tar", flickr, count=30)
    reference = tmp / "reference"
    build_shards(read_webdataset([("train", str(tmp / "input"))]), reference, BuildOptions(shard_samples=4))

    (tmp / "fifo").mkdir()
    os.mkfifo(tmp / "fifo" / "train-000000.tar")
    out = tmp / "out"
    command = [
        sys.executable,
        "-m",
        "imcap.cli",
        "shards",
        "build",
        "webdataset",
        str(out),
        "--split",
        "train",
        str(tmp / "fifo"),
        "--shard-size",
        "4",
        "--workers",
        "2",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env=run_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    fifo = None
    try:
        fifo = wait_for(lambda: open_for_writing(tmp / "fifo" / "train-000000.tar"), process, "FIFO opened")
        os.set_blocking(fifo, True)
        unsent = memoryview((tmp / "input" / "train-000000.tar").read_bytes()[: ends[22]])
        while unsent:
            unsent = unsent[os.write(fifo, unsent) :]
        sixth = [out / ".train-000005.tar.tmp", out / "train-000005.tar"]  # its name under the build's rules, or not
        wait_for(lambda: any(p.exists() for p in sixth), process, "sixth shard started")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the build and its pool: the whole session it leads
        process.wait()
        if fifo is not None:
            os.close(fifo)

    finished = sorted(p.name for p in out.glob("*.tar"))
    assert finished == [f"train-00000{i}.tar" for i in range(5)]
    for name in finished:  # a final name only ever holds a complete shard
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert not any((out / f).exists() for f in ("sizes.json", "vocab.json", "report.json"))

    build_shards(read_webdataset([("train", str(tmp / "input"))]), out, BuildOptions(shard_samples=4))
    assert all_files(out) == all_files(reference)


# ---------------------------------------------------------------------------------------------- check


def write_noise_shards(directory: Path, images: int = 12) -> list[bytes]:
    """Noise PNGs with one caption each, in shards of 4, with sizes.json; -> the PNG bytes."""
    rng = np.random.default_rng(1)
    noise = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(images)]
    pngs = [image_bytes(image, "PNG") for image in noise]
    with ShardWriter(directory, "train", max_samples=4) as writer:
        for i, png in enumerate(pngs):
            writer.write({"__key__": f"img{i:03d}", "png": png, "txt": f"picture {i}".encode()})
    return pngs


def run_check(capsys, *args, workers: int = 1) -> tuple[int, str]:
    try:
        code = imcap(["shards", "check", *map(str, args), "--workers", str(workers)])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


def test_check_passes_on_good_shards_and_names_the_shard_and_key_of_a_corrupt_sample(tmp_path, capsys):
    pngs = write_noise_shards(tmp_path)
    code, output = run_check(capsys, tmp_path, workers=2)  # a pool of 2 (each starts in seconds: torch)
    assert code == 0, output
    assert "checked 3 shards, 12 samples: 0 bad samples" in output

    with TarShard(tmp_path / "train-000001.tar") as shard:  # same samples, one image cut short
        for i in range(4, 8):
            png = pngs[i][: len(pngs[i]) // 2] if i == 6 else pngs[i]
            shard.write({"__key__": f"img{i:03d}", "png": png, "txt": f"picture {i}".encode()})
    code, output = run_check(capsys, tmp_path)
    assert code == 1
    assert f"{tmp_path / 'train-000001.tar'}: key img006: " in output
    assert output.count(": key ") == 1

    shard = tmp_path / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1000])  # cut inside the first image
    code, output = run_check(capsys, tmp_path)
    assert code == 1 and f"{shard}: unreadable after 0 samples: ReadError" in output


def test_check_reports_counts_that_disagree_with_sizes_json_and_fix_sizes_rewrites_them(tmp_path, capsys):
    write_noise_shards(tmp_path)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    (tmp_path / "sizes.json").write_text(json.dumps({**sizes, "train-000002.tar": 5}))
    code, output = run_check(capsys, tmp_path)
    assert code == 1
    assert f"{tmp_path / 'train-000002.tar'}: {tmp_path / 'sizes.json'} says 5 samples, the shard holds 4" in output

    code, output = run_check(capsys, tmp_path, "--fix-sizes")
    assert code == 0 and read_sizes(tmp_path) == sizes


def test_check_reports_a_shard_listed_in_sizes_json_that_does_not_exist_and_fix_sizes_removes_it(tmp_path, capsys):
    write_noise_shards(tmp_path)
    sizes = read_sizes(tmp_path)
    (tmp_path / "sizes.json").write_text(json.dumps({**sizes, "train-000003.tar": 4}))  # e.g. deleted since
    code, output = run_check(capsys, tmp_path)
    assert code == 1
    assert f"{tmp_path / 'train-000003.tar'}: listed in {tmp_path / 'sizes.json'} with 4 samples, but there" in output

    code, output = run_check(capsys, tmp_path, "--fix-sizes")
    assert code == 0 and read_sizes(tmp_path) == sizes


# ------------------------------------------------------------------------------ img2dataset shards


def write_img2dataset_shards(directory: Path) -> dict[str, tuple[bytes, str | None]]:
    """Two shards as img2dataset writes them (webdataset's TarWriter, 00000.tar, key.jpg/.txt/.json,
    00000_stats.json, no sizes.json); one image had no caption (null in the JSON, empty txt)."""
    rng = np.random.default_rng(2)
    written = {}
    directory.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(directory / f"{shard:05d}.tar")) as tar:
            for i in range(5):
                key = f"{shard:05d}{i:04d}"
                jpg = image_bytes(Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)), "JPEG")
                caption = None if key == "000010003" else f"a noisy picture number {key}"
                meta = {
                    "url": f"https://example.com/{key}.jpg",
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": 28,
                    "height": 20,
                    "original_width": 28,
                    "original_height": 20,
                    "exif": "{}",
                }
                tar.write({"__key__": key, "jpg": jpg, "txt": caption or "", "json": json.dumps(meta, indent=4)})
                written[key] = (jpg, caption)
        (directory / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 5, "successes": 5}))
    return written


def test_img2dataset_shards_are_read_by_the_trainer_once_check_fixes_their_sizes(tmp_path, capsys):
    written = write_img2dataset_shards(tmp_path / "laion")
    shards = list_shards(str(tmp_path / "laion" / "{00000..00001}.tar"))
    with pytest.raises(DataError, match="--fix-sizes"):
        count_samples(shards)

    code, output = run_check(capsys, tmp_path / "laion", "--fix-sizes")
    assert code == 1 and f"{tmp_path / 'laion' / '00001.tar'}: key 000010003: no caption" in output  # the null one
    assert count_samples(shards) == 10

    captioned = {k: c for k, (_, c) in written.items() if c}
    assert sorted(split_captions(shards)) == sorted(captioned.values())
    vocab = Vocabulary.build(captioned.values(), 1)
    [batch] = make_eval_loader(shards, Collate(vocab, 10, 1), batch_size=16, image_size=32, max_images=0, num_workers=0)
    assert sorted(batch.image_ids) == sorted(captioned) and batch.skipped == 1


def test_img2dataset_shards_reshard_into_imcap_shards(tmp_path):
    written = write_img2dataset_shards(tmp_path / "laion")
    report = build(read_webdataset([("train", str(tmp_path / "laion" / "*.tar"))]), tmp_path / "out")

    assert report["problems_by_reason"] == {"no captions": 1}
    samples = shard_samples(tmp_path / "out")
    assert sorted(samples) == sorted(k for k, (_, c) in written.items() if c)
    for key, sample in samples.items():
        assert sample["jpg"] == written[key][0]
        assert json.loads(sample["json"]) == {"image_id": key, "captions": [written[key][1]], "file": f"{key}.jpg"}


def test_a_caption_json_that_is_not_utf8_is_left_out_of_a_reshard_and_reported_with_its_shard_and_key(tmp_path):
    jpg = image_bytes(Image.new("RGB", (16, 16), "red"), "JPEG")
    with wds.TarWriter(str(tmp_path / "00000.tar")) as tar:
        tar.write({"__key__": "good", "jpg": jpg, "json": b'{"caption": "a red square"}'})
        tar.write({"__key__": "latin1", "jpg": jpg, "json": b'{"caption": "caf\xe9 sign"}'})
        tar.write({"__key__": "latin1txt", "jpg": jpg, "json": b'{"caption": "caf\xe9"}', "txt": b"a cafe"})
    report = build(read_webdataset([("train", str(tmp_path / "*.tar"))]), tmp_path / "out")

    assert sorted(shard_samples(tmp_path / "out")) == ["good"]
    assert [(p["reason"], p["file"]) for p in report["problems"]] == [
        ("unreadable caption JSON", f"{tmp_path / '00000.tar'}:{key}") for key in ("latin1", "latin1txt")
    ]
