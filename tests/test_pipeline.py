"""The WebDataset pipeline on real tars: decoding, skipping bad samples, equal epochs, exact coverage."""

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    ROOT,
    TRAIN_LOADER,
    demo_as_jpegs,
    demo_collate,
    image_bytes,
    make_eval_loader,
    make_train_loader,
    run_env,
    tiny_overrides,
)
from PIL import Image

from imcap.checkpoint import TrainState
from imcap.config import load_config
from imcap.data.batch import Collate, Images, Jpegs
from imcap.data.prefetch import to_device
from imcap.data.samples import SampleError, decode_image, decode_sample, jpeg_for_device
from imcap.data.shards import DataError, ShardWriter, count_samples, iter_tar_members, list_shards
from imcap.data.training_data import split_captions
from imcap.model import Captioner, caption_loss
from imcap.text import Vocabulary


def sample(key: str, data: bytes, ext: str, captions=("a thing",)) -> dict:
    return {"__key__": key, ext: data, "json": json.dumps({"captions": list(captions), "image_id": key}).encode()}


def stream_ids(shards, collate, **kw) -> list[list[str]]:
    return [batch.image_ids for batch in make_train_loader(shards, collate, **kw)]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "RGB"])
def test_every_image_mode_decodes_to_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)  # 16-bit grayscale
    elif mode == "P":
        image = rgb.quantize(16)
    else:
        image = rgb.convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    decoded = decode_image(image_bytes(image, fmt), 64)
    assert decoded.mode == "RGB" and decoded.size == (30, 20)
    if mode == "I;16":  # scaled, not clipped to white
        assert 0 < np.asarray(decoded).mean() < 250


def test_transparent_pixels_become_white_not_black():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(decode_image(image_bytes(image, "PNG"), 8)).min() == 255


def test_real_photos_go_through_the_pipeline_and_the_model(shared_data, tmp_path):
    photos = sorted((shared_data / "photos").iterdir())
    modes = set()
    with ShardWriter(tmp_path, "train", max_samples=100) as writer:
        for path in photos:
            modes.add(Image.open(path).mode)
            ext = "png" if path.suffix.lower() == ".png" else "jpg"
            writer.write(sample(path.stem, path.read_bytes(), ext, [f"a photo of {path.stem}"]))
    assert {"L", "RGB"} <= modes  # grayscale and colour photos
    vocab = Vocabulary.build([f"a photo of {p.stem}" for p in photos], 1)
    loader = make_eval_loader(
        list_shards(str(tmp_path), "train"), Collate(vocab, 10, 1), batch_size=len(photos), image_size=224
    )
    batch = next(iter(loader))
    assert batch.inputs.pixels.shape == (len(photos), 3, 224, 224) and batch.skipped == 0
    model = Captioner(load_config(None, ["model.encoder.weights=none"]).model, len(vocab))
    logits, alphas = model(batch.captions, batch.inputs)
    assert alphas.shape[-1] == 49 and torch.isfinite(caption_loss(logits, alphas, batch.captions, 0, 1.0)[0])


def test_corrupt_and_captionless_samples_are_skipped_and_counted(tmp_path):
    good = image_bytes(Image.new("RGB", (32, 32), "red"), "PNG")
    with ShardWriter(tmp_path, "train", max_samples=100) as writer:
        writer.write(sample("good1", good, "png"))
        writer.write(sample("corrupt", b"\x89PNG\r\n\x1a\n not really", "png"))
        writer.write(sample("truncated", good[: len(good) // 2], "png"))
        writer.write(sample("empty", b"", "jpg"))
        writer.write(sample("nocaption", good, "png", captions=["  "]))
        writer.write({"__key__": "noimage", "txt": b"a caption"})
        writer.write(sample("good2", good, "png"))
    vocab = Vocabulary.build(["a thing"], 1)
    batches = list(
        make_eval_loader(list_shards(str(tmp_path), "train"), Collate(vocab, 5, 1), batch_size=10, image_size=32)
    )
    assert [b.image_ids for b in batches] == [["good1", "good2"]]
    assert batches[0].skipped == 5


@pytest.mark.parametrize("fmt, jpeg_on_device", [("PNG", False), ("JPEG", False), ("JPEG", True)])
def test_an_image_over_the_pixel_limit_is_skipped_as_the_build_leaves_it_out(monkeypatch, fmt, jpeg_on_device):
    """PIL only warns between MAX_IMAGE_PIXELS and twice that; the limit is lowered here to keep the images small."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ext = fmt.lower().replace("jpeg", "jpg")
    small = sample("small", image_bytes(Image.new("RGB", (30, 30)), fmt), ext)  # 900 pixels
    bomb = sample("bomb", image_bytes(Image.new("RGB", (40, 40)), fmt), ext)  # 1,600: a warning only, to PIL
    decode_sample(small, 32, None, jpeg_on_device)
    with pytest.raises(SampleError, match="DecompressionBombWarning"):
        decode_sample(bomb, 32, None, jpeg_on_device)


def smooth_picture(width: int, height: int, seed: int) -> Image.Image:
    """Gradients and a few blobs: different resizers agree on it to within a grey level or two."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    channels = [np.sin(3 * x + 2 * y + p) for p in phase]
    return Image.fromarray((127 + 120 * np.stack(channels, axis=2)).astype(np.uint8))


def one_batch(shards_dir: Path, jpeg_on_device: bool, batch_size: int):
    loader = make_train_loader(
        list_shards(str(shards_dir), "train"),
        Collate(Vocabulary.build(["a thing"], 1), 5, 1),
        jpeg_decode="device" if jpeg_on_device else "workers",
        **{**TRAIN_LOADER, "batch_size": batch_size},
    )
    return next(iter(loader))


def test_jpegs_decoded_on_the_device_are_the_images_the_workers_decode(tmp_path):
    """The device path (here torchvision's CPU decoder: nvJPEG on a GPU) gets the same samples, crops and
    pixels to within resampling differences; PNG and CMYK JPEG are decoded by the worker in the same batch."""
    pictures = {
        "rgb": (smooth_picture(120, 90, 0), "JPEG"),
        "gray": (smooth_picture(80, 100, 1).convert("L"), "JPEG"),
        "cmyk": (smooth_picture(90, 90, 2).convert("CMYK"), "JPEG"),
        "png": (smooth_picture(100, 70, 3), "PNG"),
        "wide": (smooth_picture(127, 64, 4), "JPEG"),
    }
    with ShardWriter(tmp_path, "train", max_samples=100) as writer:
        for key, (picture, fmt) in pictures.items():
            writer.write(sample(key, image_bytes(picture, fmt), "png" if fmt == "PNG" else "jpg"))
    by_workers = one_batch(tmp_path, False, len(pictures))
    on_device = one_batch(tmp_path, True, len(pictures))
    assert isinstance(on_device.inputs, Jpegs) and isinstance(by_workers.inputs, Images)
    images = to_device(on_device, "cpu").inputs.pixels
    assert on_device.image_ids == by_workers.image_ids and torch.equal(on_device.captions, by_workers.captions)
    assert images.shape == by_workers.inputs.pixels.shape == (len(pictures), 3, 64, 64) and images.dtype == torch.uint8
    difference = (images.float() - by_workers.inputs.pixels.float()).abs()
    assert difference.mean() < 2 and difference.amax() < 40, [
        (k, d.mean().item()) for k, d in zip(on_device.image_ids, difference)
    ]


def without_scan(jpeg: bytes) -> bytes:
    """A JPEG cut before its scan, end marker kept: its header reads, no decoder decodes it."""
    return jpeg[: jpeg.index(b"\xff\xda")] + b"\xff\xd9"


def test_a_jpeg_that_decodes_neither_on_the_device_nor_with_pil_is_dropped_with_its_captions_and_counted(tmp_path):
    good = [image_bytes(smooth_picture(300, 200, i), "JPEG") for i in range(3)]
    with ShardWriter(tmp_path, "train", max_samples=100) as writer:
        for i, data in enumerate(good):
            writer.write(sample(f"good{i}", data, "jpg", [f"thing {i}"]))
        writer.write(sample("noscan", without_scan(good[0]), "jpg"))
    batch = one_batch(tmp_path, True, 4)
    assert sorted(batch.image_ids) == ["good0", "good1", "good2", "noscan"]
    decoded = to_device(batch, "cpu")
    assert sorted(decoded.image_ids) == ["good0", "good1", "good2"] and decoded.skipped == 1
    assert decoded.inputs.pixels.shape[0] == decoded.captions.shape[0] == len(decoded.references) == 3
    assert [refs[0] for refs in decoded.references] == [f"thing {key[-1]}" for key in decoded.image_ids]
    assert len(batch) == 4  # the batch it was made from is unchanged


def test_a_truncated_jpeg_stays_with_the_worker_which_skips_it():
    """nvJPEG decodes a truncated JPEG without an error; one without its end marker never reaches it."""
    jpeg = image_bytes(smooth_picture(300, 200, 0), "JPEG")
    truncated = jpeg[: len(jpeg) * 3 // 4]
    assert jpeg_for_device(jpeg, 64, None) is not None and jpeg_for_device(truncated, 64, None) is None
    with pytest.raises(SampleError):
        decode_sample(sample("truncated", truncated, "jpg"), 64, None, jpeg_on_device=True)


def test_training_on_jpegs_decoded_on_the_device_counts_the_one_it_cannot_decode(demo_shards, tmp_path):
    """The demo shards as JPEGs, one without its scan; a whole epoch with data.jpeg_decode=device."""
    shards = tmp_path / "jpeg"
    for split in ("train", "val"):
        samples = demo_as_jpegs(demo_shards, split)
        if split == "train":  # its header reads fine: the worker passes it on
            samples[-1]["jpg"] = without_scan(samples[-1]["jpg"])
        with ShardWriter(shards, split, max_samples=12) as writer:
            for sample in samples:
                writer.write(sample)
    shutil.copy(demo_shards / "vocab.json", shards / "vocab.json")
    done = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            "configs/demo.yaml",
            *tiny_overrides(
                shards,
                tmp_path,
                "data.jpeg_decode=device",
                "train.log_every=1",
                "data.shuffle_buffer=200",
                "model.encoder.feature_stats_images=0",
            ),
        ],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))  # 96 samples, batches of 8: each read once
    assert sum(r["skipped_samples"] for r in steps) == 1  # the one without a scan, dropped in the training process
    assert logged[-1]["images"] == 32 and logged[-1]["skipped"] == 0  # evaluation decodes in the workers


def test_captions_come_from_json_or_txt(tmp_path):
    png = image_bytes(Image.new("RGB", (8, 8)), "PNG")
    with ShardWriter(tmp_path, "train", max_samples=10) as writer:
        writer.write({"__key__": "a", "png": png, "txt": b"from the txt"})
        writer.write({"__key__": "b", "png": png, "json": b'{"caption": "from img2dataset json"}'})
    assert sorted(split_captions(list_shards(str(tmp_path), "train"))) == ["from img2dataset json", "from the txt"]


def test_captions_without_a_word_are_no_training_target_in_shards_built_elsewhere(tmp_path):
    png = image_bytes(Image.new("RGB", (8, 8)), "PNG")
    with ShardWriter(tmp_path, "train", max_samples=10) as writer:
        writer.write(sample("some", png, "png", ["...", "a thing", "!!"]))
        writer.write(sample("none", png, "png", ["?!", "..."]))
        writer.write({"__key__": "txt", "png": png, "txt": b"..."})
    shards, vocab = list_shards(str(tmp_path), "train"), Vocabulary.build(["a thing"], 1)
    assert split_captions(shards) == ["a thing"]
    [batch] = make_eval_loader(shards, Collate(vocab, 5, 2), batch_size=8, image_size=8)
    assert batch.image_ids == ["some"] and batch.references == [["a thing"]] and batch.skipped == 2
    assert batch.captions[0].tolist() == [vocab.encode("a thing", 5)] * 2


def test_training_with_more_captions_per_image_than_some_images_have_says_so_once(tmp_path, caplog):
    png = image_bytes(Image.new("RGB", (8, 8)), "PNG")
    with ShardWriter(tmp_path, "train", max_samples=10) as writer:
        for i, count in enumerate([3, 1, 3, 2]):
            writer.write(sample(f"img{i}", png, "png", [f"thing {j}" for j in range(count)]))
    shards, vocab = list_shards(str(tmp_path), "train"), Vocabulary.build(["thing 0 1 2"], 1)
    kw = {**TRAIN_LOADER, "image_size": 8, "batch_size": 4, "num_batches": 1, "epochs": 3}
    assert len(list(make_train_loader(shards, Collate(vocab, 5, 3), **kw))) == 3
    [warning] = [r.getMessage() for r in caplog.records if "captions_per_image" in r.getMessage()]
    assert re.match(
        r"data.captions_per_image=3, but 2 of a batch's 4 images have fewer captions \(img[13] has [12]\)", warning
    )
    caplog.clear()
    list(make_eval_loader(shards, Collate(vocab, 5, 3), batch_size=4, image_size=8))  # repeats the first, as documented
    assert "captions_per_image" not in caplog.text


def test_every_rank_and_worker_yields_the_computed_number_of_batches(demo_shards):
    shards, collate = list_shards(str(demo_shards), "train"), demo_collate(demo_shards)
    assert count_samples(shards) == 96
    seen = {}
    for rank in range(2):
        batches = stream_ids(
            shards, collate, rank=rank, world_size=2, num_batches=7, skip=0, num_workers=2, **TRAIN_LOADER
        )
        assert len(batches) == 7 and all(len(b) == 4 for b in batches)
        seen[rank] = [i for b in batches for i in b]
    assert not set(seen[0]) & set(seen[1])  # ranks read disjoint shards
    assert len(set(seen[0])) == len(seen[0])


def test_a_worker_with_too_few_samples_reads_its_shards_again(demo_shards):
    shards, collate = list_shards(str(demo_shards), "train")[:2], demo_collate(demo_shards)  # 24 samples
    batches = stream_ids(shards, collate, rank=0, world_size=1, num_batches=9, skip=0, num_workers=0, **TRAIN_LOADER)
    assert len(batches) == 9 and max(Counter(i for b in batches for i in b).values()) == 2


def test_epoch_order_depends_on_seed_and_epoch_only(demo_shards):
    shards, collate = list_shards(str(demo_shards), "train"), demo_collate(demo_shards)
    kw = {**TRAIN_LOADER, "rank": 0, "world_size": 1, "num_batches": 6, "skip": 0}
    first = stream_ids(shards, collate, num_workers=2, **kw)
    assert first == stream_ids(shards, collate, num_workers=2, **kw)
    assert first != stream_ids(shards, collate, num_workers=2, **{**kw, "epoch": 1})


@pytest.mark.parametrize("workers, skip", [(0, 5), (2, 3), (2, 4)])
def test_resuming_inside_an_epoch_yields_exactly_the_batches_not_yet_seen(demo_shards, workers, skip):
    shards, collate = list_shards(str(demo_shards), "train"), demo_collate(demo_shards, k=2)
    kw = {**TRAIN_LOADER, "rank": 1, "world_size": 2, "num_batches": 9, "num_workers": workers}
    full = list(make_train_loader(shards, collate, skip=0, **kw))
    resumed = list(make_train_loader(shards, collate, skip=skip, **kw))
    assert [b.image_ids for b in resumed] == [b.image_ids for b in full[skip:]]
    for a, b in zip(resumed, full[skip:]):  # the same crops and the same chosen captions
        assert torch.equal(a.inputs.pixels, b.inputs.pixels) and torch.equal(a.captions, b.captions)


@pytest.mark.parametrize("workers, skip, buffer, batches", [(0, 5, 16, 12), (2, 9, 4, 12), (2, 15, 0, 24)])
def test_a_resumed_stream_neither_reads_the_shards_nor_decodes_the_samples_it_trained_on(
    demo_shards, tmp_path, workers, skip, buffer, batches
):
    """Resumed where each worker's last trained batch says, the stream gives the batches an uninterrupted one
    would, bitwise, from shards in which every sample trained on before (and not again) is garbage and every
    shard holding only such samples is gone; it skips none. The rank's 48 samples make 12 batches of 4: 24
    are two passes, the last case resumed in the second pass of each worker."""
    shards, collate = list_shards(str(demo_shards), "train"), demo_collate(demo_shards, k=2)
    kw = {**TRAIN_LOADER, "rank": 1, "world_size": 2, "num_workers": workers, "shuffle_buffer": buffer}
    kw["num_batches"] = batches
    full = list(make_train_loader(shards, collate, **kw))
    trained = {i for b in full[:skip] for i in b.image_ids} - {i for b in full[skip:] for i in b.image_ids}
    samples_read = {b.position.worker: b.position.samples_read for b in full[:skip]}
    (tmp_path / "sizes.json").write_text((demo_shards / "sizes.json").read_text())
    gone = 0
    for shard in shards:
        members = dict(iter_tar_members(shard))
        keys = {name.rsplit(".", 1)[0] for name in members}
        if keys <= trained:
            gone += 1
            continue
        with tarfile.open(tmp_path / Path(shard).name, "w") as tar:
            for name, data in members.items():
                garbage = name.endswith(".png") and name.rsplit(".", 1)[0] in trained
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(b"\0" * len(data) if garbage else data))
    assert trained and gone == (2 if buffer == 4 else 0)
    copies = [str(tmp_path / Path(shard).name) for shard in shards]  # a gone one, if read, would be a skip
    resumed = list(make_train_loader(copies, collate, skip=skip, samples_read=samples_read, **kw))
    assert [b.image_ids for b in resumed] == [b.image_ids for b in full[skip:]] and not any(b.skipped for b in resumed)
    for a, b in zip(resumed, full[skip:]):  # the same crops and the same chosen captions
        assert torch.equal(a.inputs.pixels, b.inputs.pixels) and torch.equal(a.captions, b.captions)


def test_a_stream_resumes_after_the_last_sample_its_trained_batches_read_skips_included(demo_shards, tmp_path):
    """The first sample of every shard is corrupt, so each batch reads one more sample than it holds at some
    point: resumed `skip` whole batches in, the stream would start too early."""
    (tmp_path / "sizes.json").write_text((demo_shards / "sizes.json").read_text())
    shards = []
    for shard in list_shards(str(demo_shards), "train"):
        members = dict(iter_tar_members(shard))
        first = min(name.rsplit(".", 1)[0] for name in members)
        shards.append(str(tmp_path / Path(shard).name))
        with tarfile.open(shards[-1], "w") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(b"\0" * len(data) if name == f"{first}.png" else data))
    collate = demo_collate(demo_shards)
    kw = {**TRAIN_LOADER, "num_batches": 20, "num_workers": 2, "shuffle_buffer": 0}
    full = list(make_train_loader(shards, collate, **kw))
    skip = 6
    samples_read = {b.position.worker: b.position.samples_read for b in full[:skip]}
    assert samples_read == {0: 14, 1: 14} and sum(b.skipped for b in full[:skip]) == 4  # 12 samples each
    resumed = list(make_train_loader(shards, collate, skip=skip, samples_read=samples_read, **kw))
    assert [b.image_ids for b in resumed] == [b.image_ids for b in full[skip:]]
    by_batches = list(make_train_loader(shards, collate, skip=skip, **kw))
    assert [b.image_ids for b in by_batches] != [b.image_ids for b in full[skip:]]


def test_a_local_shard_cut_short_keeps_the_samples_before_the_cut_and_skips_and_counts_the_rest(
    demo_shards, tmp_path, caplog
):
    """A shard on disk is read once: a truncated tar (a copy that broke off) is not a miscounted one."""
    shutil.copytree(demo_shards, tmp_path / "shards")
    cut = tmp_path / "shards" / "train-000005.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    shards, collate = list_shards(str(tmp_path / "shards"), "train"), demo_collate(demo_shards)
    batches = list(make_eval_loader(shards, collate, batch_size=8, image_size=64))
    kept = [i for b in batches for i in b.image_ids if 60 <= int(i[-6:]) < 72]
    assert 0 < len(kept) < 12 and sum(b.skipped for b in batches) == 12 - len(kept)
    assert f"skipping {12 - len(kept)} samples of {cut}: 1 read(s) failed" in caplog.text


def test_a_shard_listed_twice_is_read_twice_and_shards_of_no_samples_are_an_error_not_a_hang(demo_shards, tmp_path):
    shards, collate = list_shards(str(demo_shards), "train")[:2], demo_collate(demo_shards)
    kw = {**TRAIN_LOADER, "num_batches": 12, "num_workers": 0}
    twice = Counter(i for b in make_train_loader(shards * 2, collate, **kw) for i in b.image_ids)
    assert set(twice.values()) == {2} and len(twice) == 24
    (tmp_path / "train-000000.tar").write_bytes(b"")
    (tmp_path / "sizes.json").write_text('{"train-000000.tar": 0}')
    with pytest.raises(DataError, match="no samples in .*train-000000.tar: sizes.json records none"):
        list(make_train_loader(list_shards(str(tmp_path), "train"), collate, **kw))


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_one_loader_through_several_epochs_yields_each_epoch_as_its_own_loader_would(demo_shards, workers):
    """The trainer's loader runs through all epochs (its workers start once); resumed mid-epoch, it
    first yields the rest of that epoch. 7 batches an epoch: the workers' turns shift at every epoch."""
    shards, collate = list_shards(str(demo_shards), "train"), demo_collate(demo_shards, k=2)
    kw = {**TRAIN_LOADER, "rank": 0, "world_size": 1, "num_batches": 7, "num_workers": workers}
    by_epoch = [
        list(make_train_loader(shards, collate, skip=2 if epoch == 1 else 0, **{**kw, "epoch": epoch}))
        for epoch in (1, 2, 3)
    ]
    assert [len(e) for e in by_epoch] == [5, 7, 7] and by_epoch[1][0].image_ids != by_epoch[2][0].image_ids
    through = list(make_train_loader(shards, collate, skip=2, epochs=3, **{**kw, "epoch": 1}))
    expected = [b for epoch in by_epoch for b in epoch]
    assert [b.image_ids for b in through] == [b.image_ids for b in expected]
    assert all(
        torch.equal(a.inputs.pixels, b.inputs.pixels) and torch.equal(a.captions, b.captions)
        for a, b in zip(through, expected)
    )
    # resumed with more processes or a larger batch: the saved position lies past the epoch's new end
    past_the_end = list(make_train_loader(shards, collate, skip=9, epochs=3, **{**kw, "epoch": 1}))
    assert [b.image_ids for b in past_the_end] == [b.image_ids for b in expected[5:]]


def test_too_few_shards_for_processes_times_workers_is_an_error_saying_how_to_fix_it(demo_shards):
    shards, collate = list_shards(str(demo_shards), "train"), demo_collate(demo_shards)
    with pytest.raises(DataError, match="8 training shards cannot feed 2 processes x 5 data workers.*num_workers to 4"):
        make_train_loader(shards, collate, rank=0, world_size=2, num_batches=1, skip=0, num_workers=5, **TRAIN_LOADER)


def test_the_trainer_uses_fewer_workers_when_the_shards_are_too_few_and_says_so(demo_shards, caplog):
    from imcap.data.streams import Part
    from imcap.data.training_data import TrainingData

    cfg = load_config(None, [f"data.shards={demo_shards}", "data.num_workers=5"])
    data = TrainingData(
        cfg,
        Vocabulary.load(demo_shards / "vocab.json"),
        list_shards(str(demo_shards), "train"),
        list_shards(str(demo_shards), "val"),
        96,
    )
    loader = data.train_loader(Part(0, 2), TrainState(), num_batches=1)
    assert loader.num_workers == 4  # 8 shards for 2 processes
    assert "data.num_workers=5, but 8 train shards feed only 4 workers in each of 2 processes" in caplog.text


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 1), (3, 2)])
def test_evaluation_covers_the_split_exactly_once_across_ranks_and_workers(demo_shards, world, workers):
    shards, collate = list_shards(str(demo_shards), "val"), demo_collate(demo_shards)
    ids = [
        i
        for rank in range(world)
        for b in make_eval_loader(
            shards, collate, rank=rank, world_size=world, batch_size=5, image_size=64, num_workers=workers
        )
        for i in b.image_ids
    ]
    assert sorted(ids) == sorted(f"val_{i:06d}" for i in range(32))


def test_missing_shards_and_sizes_are_errors_naming_the_place(tmp_path, demo_shards):
    with pytest.raises(DataError, match=f"no shards for split 'train' at {tmp_path}"):
        list_shards(str(tmp_path), "train")
    (tmp_path / "train-000000.tar").write_bytes((demo_shards / "train-000000.tar").read_bytes())
    with pytest.raises(DataError, match="sizes.json has no sample count for train-000000.tar"):
        count_samples(list_shards(str(tmp_path), "train"))


def test_brace_patterns_select_shards(demo_shards):
    shards = list_shards(f"{demo_shards}/train-{{000000..000002}}.tar", "train")
    assert [Path(s).name for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]


def test_a_pattern_for_both_splits_gives_each_split_its_own_shards(demo_shards):
    pattern = f"{demo_shards}/{{train,val}}-{{000000..000002}}.tar"
    assert [Path(s).name for s in list_shards(pattern, "val")] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert all(Path(s).name.startswith("train-") for s in list_shards(pattern, "train"))
    with pytest.raises(DataError, match=re.escape(f"no shards for split 'test' at {pattern}")):
        list_shards(pattern, "test")


@pytest.mark.timeout(60)  # without the check, a worker whose shards hold nothing usable reads them for ever
@pytest.mark.parametrize("broken", ["null captions", "corrupt images"])
def test_shards_without_a_usable_sample_are_an_error_naming_them_not_an_endless_loop(tmp_path, broken):
    png = image_bytes(Image.new("RGB", (8, 8)), "PNG")
    with ShardWriter(tmp_path, "train", max_samples=4) as writer:
        for i in range(4):
            writer.write({"__key__": f"good{i}", "png": png, "json": b'{"caption": "a black square"}'})
        for i in range(4):
            writer.write(
                {
                    "__key__": f"bad{i}",
                    "png": png[:20] if broken == "corrupt images" else png,
                    "json": b'{"caption": null}' if broken == "null captions" else b'{"caption": "a thing"}',
                }
            )
    shards, collate = list_shards(str(tmp_path), "train"), Collate(Vocabulary.build(["a black square"], 1), 5, 1)
    kw = {**TRAIN_LOADER, "world_size": 2, "num_batches": 2, "skip": 0, "num_workers": 0, "batch_size": 2}
    assert len(stream_ids(shards, collate, rank=0, **kw)) == 2  # rank 0 owns the good shard, rank 1 the bad one
    with pytest.raises(DataError, match=re.escape(f"no usable sample in {shards[1]}: 4 skipped")):
        stream_ids(shards, collate, rank=1, **kw)


def test_samples_whose_keys_hold_dots_train_evaluate_and_check_whole(tmp_path):
    """Scraped shards name samples like img.v2.part1: each member splits at its last dot, not its first."""
    from imcap.data.check import check_shards

    keys = [f"img.v{i}.part{i % 3}" for i in range(8)]
    png = image_bytes(Image.new("RGB", (16, 16), "red"), "PNG")
    with ShardWriter(tmp_path, "train", max_samples=4) as writer:
        for key in keys:
            writer.write(sample(key, png, "png", [f"a red square {key}"]))
    shards, collate = list_shards(str(tmp_path), "train"), Collate(Vocabulary.build(["a red square"], 1), 8, 1)
    kw = {**TRAIN_LOADER, "image_size": 16, "num_batches": 2}
    trained = list(make_train_loader(shards, collate, **kw))
    assert sorted(i for b in trained for i in b.image_ids) == sorted(keys) and sum(b.skipped for b in trained) == 0
    [evaluated] = make_eval_loader(shards, collate, batch_size=8, image_size=16)
    assert evaluated.image_ids == keys and evaluated.skipped == 0
    assert sorted(split_captions(shards)) == sorted(f"a red square {key}" for key in keys)
    problems, summary = check_shards(str(tmp_path))
    assert problems == [] and "checked 2 shards, 8 samples: 0 bad samples" in summary


def demo_train_copy(demo_shards: Path, directory: Path, recorded: dict[str, int]) -> list[str]:
    """The demo train shards in a directory of their own, sizes.json changed to say `recorded` of some."""
    directory.mkdir()
    for shard in list_shards(str(demo_shards), "train"):
        shutil.copy(shard, directory)
    sizes = {name: n for name, n in json.loads((demo_shards / "sizes.json").read_text()).items() if "train" in name}
    (directory / "sizes.json").write_text(json.dumps({**sizes, **recorded}))
    return list_shards(str(directory), "train")


@pytest.mark.parametrize("recorded, workers", [(5, 0), (20, 2)])
def test_an_epoch_trains_on_the_samples_the_shards_hold_or_stops_naming_the_shard_sizes_json_miscounts(
    demo_shards, tmp_path, recorded, workers
):
    """An epoch's length comes from sizes.json: 5 of 12 would leave 7 untrained every epoch, 20 would repeat 8."""
    collate = demo_collate(demo_shards)
    kw = {**TRAIN_LOADER, "batch_size": 8, "epochs": 2, "num_workers": workers}
    shards = demo_train_copy(demo_shards, tmp_path / "right", {})
    batches = list(make_train_loader(shards, collate, num_batches=count_samples(shards) // 8, **kw))
    for epoch in (batches[:12], batches[12:]):  # every sample once per epoch
        assert Counter(i for b in epoch for i in b.image_ids) == Counter(f"train_{i:06d}" for i in range(96))

    shards = demo_train_copy(demo_shards, tmp_path / "wrong", {"train-000003.tar": recorded})
    wrong = tmp_path / "wrong" / "train-000003.tar"
    expected = f"{wrong}: {tmp_path / 'wrong' / 'sizes.json'} records {recorded} samples, but reading it gave 12"
    with pytest.raises(DataError, match=re.escape(expected) + ".*" + re.escape("imcap shards check --fix-sizes")):
        list(make_train_loader(shards, collate, num_batches=count_samples(shards) // 8, **kw))
