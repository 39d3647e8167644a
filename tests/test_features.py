"""The frozen-feature cache: `imcap features build`, training from it, refusing a mismatched cache."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TRAIN_LOADER, demo_collate, make_train_loader, tiny_overrides

from imcap.cli import main as imcap
from imcap.config import ConfigError, load_config
from imcap.data.feature_cache import cache_is_complete, cache_shards, finish_cache
from imcap.data.shards import DataError, ShardWriter, iter_tar_members, list_shards, read_shard, read_sizes
from imcap.model.encoder import EncoderCNN
from imcap.text import SPECIALS, Vocabulary
from imcap.train import train

FROZEN = [
    "data.image_size=64",
    "model.encoder.train_layer4=false",
    "model.encoder.batchnorm_stats_images=0",
    "train.mixed_precision=no",
]
TRAIN_LOADER_8 = {**TRAIN_LOADER, "batch_size": 8, "train_crop": "center"}
VOCAB = Vocabulary([*SPECIALS, "a"], 1)  # what the cache records as its vocabulary


def cached_sizes(*args) -> dict[str, int]:
    """Every shard cache_shards writes, as {name: samples}."""
    return dict(cached for cached in cache_shards(*args) if cached)


@pytest.fixture(scope="module")
def cache(demo_shards, tmp_path_factory):
    """Of the whole frozen encoder, built where training looks for it: <data.shards>/features/<digest>/ (no --out)."""
    source = tmp_path_factory.mktemp("source") / "demo"
    shutil.copytree(demo_shards, source)
    assert (
        imcap(
            [
                "features",
                "build",
                "--config",
                str(ROOT / "configs" / "demo.yaml"),
                f"data.shards={source}",
                *FROZEN,
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    [out] = (source / "features").iterdir()
    return out


def test_a_cache_mirrors_its_source_shards(cache, demo_shards):
    assert read_sizes(cache) == read_sizes(demo_shards)
    assert [p.rsplit("/", 1)[1] for p in list_shards(str(cache), "val")] == [
        "val-000000.tar",
        "val-000001.tar",
        "val-000002.tar",
    ]
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["image_size"] == 64 and meta["weights"] == "none" and not meta["train_layer4"]
    assert (cache / "vocab.json").read_bytes() == (demo_shards / "vocab.json").read_bytes()


@pytest.mark.parametrize("location", ["http", "pipe"])
def test_a_cache_built_from_shards_at_a_url_is_the_cache_of_the_same_shards_on_disk(
    cache, demo_shards, serve, tmp_path, capsys, location
):
    """Over http, a shard whose transfer fails at every read stops the build, naming it; the next build
    fetches only that one again. From pipe: commands, the shards are a pattern of both splits."""
    url, server = serve(demo_shards, drops={"train-000003.tar": 99})
    pipe = "::".join(
        f"pipe:cat {demo_shards}/{split}-{{000000..00000{n - 1}}}.tar" for split, n in (("train", 8), ("val", 3))
    )
    source, out = (url if location == "http" else pipe), tmp_path / "remote"
    features_build = ["features", "build", "--config", str(ROOT / "configs" / "demo.yaml"), *FROZEN]
    build = [*features_build, f"data.shards={source}", "data.read_attempts=2", "--out", str(out), "--dtype", "fp32"]
    if location == "http":
        assert imcap(build) == 2
        error = capsys.readouterr().err  # the samples before the cut arrived; the rest did not
        assert re.match(f"imcap: {url}/train-000003.tar: [0-9]+ of its samples could not be fetched, so it is ", error)
        server.drops.clear()
    assert imcap(build) == 0
    if location == "http":
        assert server.requests["train-000003.tar"] == 3 and server.requests["train-000002.tar"] == 1
        assert not Path(url).exists()  # demo.yaml's data.demo builds no demo into a local path named like the URL
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in cache.iterdir())
    for name in ("sizes.json", "vocab.json", *(p.name for p in cache.glob("*.tar"))):
        assert (out / name).read_bytes() == (cache / name).read_bytes(), name
    local, remote = (json.loads((d / "cache.json").read_text()) for d in (cache, out))
    assert remote == local | {"shards": {"sizes": read_sizes(demo_shards), "shards": {}}}


def test_training_reads_the_cache_with_the_encoder_it_was_made_with(cache, tmp_path):
    overrides = tiny_overrides(cache, tmp_path, "data.train_crop=center", "eval.max_images=8", *FROZEN)
    scores = train(load_config(ROOT / "configs" / "demo.yaml", overrides))
    assert scores["images"] == 8


@pytest.mark.parametrize("change, what", [("train.seed=1", "weights none"), ("data.image_size=96", "image size 96")])
def test_a_cache_made_with_another_encoder_is_refused(cache, tmp_path, change, what):
    overrides = tiny_overrides(cache, tmp_path, "data.train_crop=center", *FROZEN, change)
    with pytest.raises(DataError, match=f"made with another encoder .*now .*{what}"):
        train(load_config(ROOT / "configs" / "demo.yaml", overrides))


def test_batchnorm_statistics_are_not_estimated_from_a_cache_named_as_the_shards(cache, tmp_path):
    overrides = tiny_overrides(
        cache, tmp_path, "data.train_crop=center", *FROZEN, "model.encoder.batchnorm_stats_images=8"
    )
    with pytest.raises(ConfigError, match="batchnorm_stats_images needs images, but data.shards .* is a feature cache"):
        train(load_config(ROOT / "configs" / "demo.yaml", overrides))


def test_training_finds_the_cache_features_build_made_with_the_same_batchnorm_statistics(demo_shards, tmp_path, capsys):
    source = tmp_path / "demo"
    shutil.copytree(demo_shards, source)
    overrides = tiny_overrides(
        source,
        tmp_path,
        "data.feature_cache=true",
        "data.train_crop=center",
        "eval.max_images=8",
        "model.encoder.train_layer4=true",
        "model.encoder.batchnorm_stats_images=40",
    )
    assert imcap(["features", "build", "--config", str(ROOT / "configs" / "demo.yaml"), *overrides]) == 0
    [built] = (source / "features").iterdir()
    assert json.loads((built / "cache.json").read_text())["train_layer4"]
    capsys.readouterr()
    train(load_config(ROOT / "configs" / "demo.yaml", overrides))
    assert "caching the frozen encoder's features" not in capsys.readouterr().out
    assert list((source / "features").iterdir()) == [built]


def cache_val_split(source, out) -> dict:
    """cache_shards on the val split (3 shards, 32 images), with the encoder `weights: none` gives."""
    torch.manual_seed(0)
    return cached_sizes(EncoderCNN("none", channels_last=False), str(source), ["val"], out, 64, 16)


def test_a_resumed_cache_build_counts_the_shards_it_keeps(demo_shards, tmp_path):
    out = tmp_path / "cache"
    cache_val_split(demo_shards, out)
    (out / "val-000001.tar").unlink()  # as if interrupted before writing it (and before finish_cache)
    sizes = cache_val_split(demo_shards, out)
    val_sizes = {name: n for name, n in read_sizes(demo_shards).items() if name.startswith("val-")}
    assert sizes == val_sizes


def test_a_truncated_source_shard_is_cached_up_to_the_cut_and_reported(demo_shards, tmp_path, caplog):
    source = tmp_path / "source"
    shutil.copytree(demo_shards, source)
    cut = source / "val-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # e.g. a copy cut short
    sizes = cache_val_split(source, tmp_path / "cache")
    assert sizes["val-000000.tar"] == 12 and 0 < sizes["val-000001.tar"] < 12
    assert f"skipping {12 - sizes['val-000001.tar']} samples of {cut}: 1 read(s) failed, the last with ReadError" in (
        caplog.text
    )


def val_captions(shard_dir) -> list[list[str]]:
    return [
        json.loads(data)["captions"]
        for shard in list_shards(str(shard_dir), "val")
        for name, data in iter_tar_members(shard)
        if name.endswith(".json")
    ]


def test_a_cache_of_shards_rebuilt_in_place_is_built_again_from_the_new_shards(demo_shards, tmp_path, caplog):
    source, cache = tmp_path / "source", tmp_path / "cache"
    shutil.copytree(demo_shards, source)
    torch.manual_seed(0)
    encoder = EncoderCNN("none", channels_last=False)
    finish_cache(cache, str(source), cache_val_split(source, cache), encoder, 64, "none", "bf16", VOCAB)
    assert cache_is_complete(cache, str(source))

    # the val shards rebuilt with other captions: the same names and sample counts
    samples = [
        {"__key__": name.partition(".")[0], "png": data}
        for shard in list_shards(str(source), "val")
        for name, data in iter_tar_members(shard)
        if name.endswith(".png")
    ]
    with ShardWriter(source, "val", max_samples=12) as writer:
        for sample in samples:
            meta = {"image_id": sample["__key__"], "captions": ["a new caption"]}
            writer.write(sample | {"json": json.dumps(meta).encode()})
    assert read_sizes(source) == read_sizes(demo_shards)
    assert not cache_is_complete(cache, str(source)) and "building it again" in caplog.text

    finish_cache(cache, str(source), cache_val_split(source, cache), encoder, 64, "none", "bf16", VOCAB)
    assert cache_is_complete(cache, str(source)) and val_captions(cache) == [["a new caption"]] * 32


def with_one_image_cut_short(demo_shards, source) -> str:
    """The first two demo train shards, the 6th image cut short; -> its key."""
    with ShardWriter(source, "train", max_samples=12) as writer:
        samples = (s for shard in list_shards(str(demo_shards), "train")[:2] for s in read_shard(shard, []))
        for i, sample in enumerate(samples):
            if i == 5:
                cut, sample["png"] = sample["__key__"], sample["png"][: len(sample["png"]) // 2]
            writer.write(sample)
    return cut


def test_a_sample_the_cache_cannot_encode_is_skipped_and_counted_in_every_epoch_as_from_the_images(
    demo_shards, tmp_path, caplog
):
    """Three epochs of 3 batches of 8 from the images and from their cache: 23 usable of 24 samples."""
    source, cache = tmp_path / "source", tmp_path / "cache"
    cut = with_one_image_cut_short(demo_shards, source)
    torch.manual_seed(0)
    encoder = EncoderCNN("none", channels_last=False)
    sizes = cached_sizes(encoder, str(source), ["train"], cache, 64, 16)
    finish_cache(cache, str(source), sizes, encoder, 64, "none", "fp32", VOCAB)

    def skipped_by_epoch(shards: list[str]) -> list[int]:
        batches = list(make_train_loader(shards, demo_collate(demo_shards), epochs=3, num_batches=3, **TRAIN_LOADER_8))
        return [sum(b.skipped for b in batches[epoch * 3 : epoch * 3 + 3]) for epoch in range(3)]

    from_images = skipped_by_epoch(list_shards(str(source), "train"))
    assert skipped_by_epoch(list_shards(str(cache), "train")) == from_images and min(from_images) >= 1
    assert f"{source / 'train-000000.tar'}: 1 of its samples could not be cached (the first: {cut}" in caplog.text
    resumed = cached_sizes(encoder, str(source), ["train"], cache, 64, 16)  # counts the shards it keeps
    assert read_sizes(cache) == read_sizes(source) == resumed
