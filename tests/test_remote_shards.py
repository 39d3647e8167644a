"""Shards at a URL: a real HTTP server on loopback (conftest's `serve`) serves shards that training
streams, through webdataset's gopen (curl), as a local run reads them; what a missing shard, a dropped
transfer and a server that is down give; a resumed stream fetches only the shards it still needs. Shards
in S3 (moto's server on loopback, through fsspec's s3fs) and from pipe: commands stream as from disk."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import (
    ROOT,
    TRAIN_LOADER,
    demo_collate,
    free_port,
    logged,
    make_eval_loader,
    make_train_loader,
    start_ranks,
    tiny_overrides,
    wait_all,
)
from safetensors.torch import load_file

from imcap.config import ConfigError, load_config
from imcap.data.shards import DataError, count_samples, list_shards
from imcap.train import train

# one process, 2 data workers, each with 4 shards of 12: 48 samples, 12 batches of 4
STREAM = {**TRAIN_LOADER, "num_workers": 2, "num_batches": 24, "read_attempts": 2}


def streamed(shards, collate, **kw):
    return list(make_train_loader(shards, collate, **{**STREAM, **kw}))


def ids(batches) -> list:
    return [i for b in batches for i in b.image_ids]


def tiny_run(shards, runs, *extra):
    return load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(shards, runs, "train.cpu=true", *extra))


def test_two_processes_streaming_their_shards_over_http_train_bitwise_as_two_reading_them_from_disk(
    demo_shards, tmp_path, serve
):
    url, server = serve(demo_shards)
    assert list_shards(url, "train") == [f"{url}/{p.rsplit('/', 1)[1]}" for p in list_shards(str(demo_shards), "train")]
    assert count_samples(list_shards(url, "train")) == 96
    for name, shards in (("local", demo_shards), ("remote", url)):
        overrides = tiny_overrides(shards, tmp_path / name, "train.cpu=true", "model.decoder.dropout=0.3")
        procs = start_ranks(overrides, log=tmp_path / name)
        assert wait_all(procs) == [0, 0], (tmp_path / f"{name}.rank0").read_text()[-3000:]
    weights = [
        load_file(tmp_path / run / "tiny" / "checkpoints" / "step-000006" / "model.safetensors")
        for run in ("local", "remote")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    local, remote = (logged(tmp_path / run / "tiny", "val_loss")[-1] for run in ("local", "remote"))
    local.pop("eval_seconds"), remote.pop("eval_seconds")
    assert remote == local and local["images"] == 32  # the evaluation read every val image over http too
    # `imcap eval --shards URL`, as a user scores a run (trained from disk) on shards a server holds
    scored = {}
    for name, shards in (("local", demo_shards), ("remote", url)):
        server.requests.clear()
        argv = [
            "eval",
            str(tmp_path / "local" / "tiny"),
            "--shards",
            str(shards),
            "--cpu",
            "--out",
            str(tmp_path / name),
        ]
        assert subprocess.run([sys.executable, "-m", "imcap.cli", *argv], cwd=ROOT, capture_output=True).returncode == 0
        scored[name] = json.loads((tmp_path / name / "scores.json").read_text())
        scored[name].pop("eval_seconds", None)
        assert (server.requests["val-000000.tar"] > 0) == (name == "remote")
    assert scored["remote"] == scored["local"] and scored["local"]["images"] == 32


def test_a_shard_the_server_does_not_have_is_read_again_then_skipped_and_counted_naming_its_url(
    demo_shards, tmp_path, serve, caplog
):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    (shards / "train-000003.tar").unlink()  # sizes.json still lists it
    url, server = serve(shards)
    collate = demo_collate(demo_shards)
    batches = streamed(list_shards(url, "train"), collate, num_workers=0, num_batches=21)  # 84 samples left
    assert sum(b.skipped for b in batches) == 12 and server.requests["train-000003.tar"] == 2
    assert sorted(ids(batches)) == sorted(f"train_{i:06d}" for i in range(96) if i // 12 != 3)
    assert f"skipping 12 samples of {url}/train-000003.tar: 2 read(s) failed" in caplog.text


def test_a_transfer_dropped_mid_shard_is_read_again_from_where_it_failed(demo_shards, serve):
    collate = demo_collate(demo_shards)
    local = streamed(list_shards(str(demo_shards), "train"), collate)
    url, server = serve(demo_shards, drops={"train-000002.tar": 1})
    remote = streamed(list_shards(url, "train"), collate)
    assert server.requests["train-000002.tar"] == 2 and sum(b.skipped for b in remote) == 0
    assert [b.image_ids for b in remote] == [b.image_ids for b in local]
    assert all(torch.equal(a.inputs.pixels, b.inputs.pixels) for a, b in zip(local, remote))


def test_a_shard_whose_transfer_always_drops_keeps_what_arrived_and_skips_and_counts_the_rest(
    demo_shards, serve, caplog
):
    """Evaluation reads every sample: what did not arrive is what was counted."""
    url, server = serve(demo_shards, drops={"train-000002.tar": 99})
    shards = list_shards(url, "train")
    batches = list(make_eval_loader(shards, demo_collate(demo_shards), batch_size=8, image_size=64, read_attempts=2))
    arrived = [i for i in ids(batches) if 24 <= int(i[-6:]) < 36]
    assert server.requests["train-000002.tar"] == 2 and 0 < len(arrived) < 12
    assert sum(b.skipped for b in batches) == 12 - len(arrived)
    assert len(set(ids(batches))) == len(ids(batches))  # nothing read twice
    assert f"skipping {12 - len(arrived)} samples of {url}/train-000002.tar" in caplog.text


def test_a_stream_resumed_over_http_fetches_only_the_shards_it_still_needs(demo_shards, serve):
    url, server = serve(demo_shards)
    shards, collate = list_shards(url, "train"), demo_collate(demo_shards)
    full = streamed(shards, collate, shuffle_buffer=4)
    fetched_fully = dict(server.requests)
    server.requests.clear()
    skip = 18  # 9 batches of each worker's 12: 36 of its 48 samples
    samples_read = {b.position.worker: b.position.samples_read for b in full[:skip]}
    resumed = streamed(shards, collate, shuffle_buffer=4, skip=skip, samples_read=samples_read)
    assert [b.image_ids for b in resumed] == [b.image_ids for b in full[skip:]]
    assert all(torch.equal(a.inputs.pixels, b.inputs.pixels) for a, b in zip(resumed, full[skip:]))
    assert sum(fetched_fully[s] for s in fetched_fully if s.endswith(".tar")) == 8
    assert 2 <= sum(n for s, n in server.requests.items() if s.endswith(".tar")) <= 4  # of 8


def test_shards_check_reads_shards_at_a_url_and_leaves_fixing_sizes_json_to_the_local_copy(demo_shards, serve):
    from imcap.data.check import check_shards

    url, _ = serve(demo_shards)
    assert check_shards(url) == (
        [],
        "checked 11 shards, 128 samples: 0 bad samples, 0 unreadable shards, 0 sample "
        "counts missing from or wrong in sizes.json",
    )
    with pytest.raises(DataError, match=f"--fix-sizes rewrites the sizes.json beside the shards, and {url} is not"):
        check_shards(url, fix_sizes=True)


def test_a_server_that_is_down_is_an_error_naming_the_url_of_its_sizes_json(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/shards"
    with pytest.raises(DataError, match=f"{url}/sizes.json cannot be fetched"):
        list_shards(url, "train")


def test_a_feature_cache_of_shards_at_a_url_is_refused_at_start(demo_shards, tmp_path, serve):
    url, _ = serve(demo_shards)
    cfg = tiny_run(url, tmp_path / "runs", "data.feature_cache=true", "data.train_crop=center")
    with pytest.raises(ConfigError, match="data.feature_cache writes the cache beside the shards"):
        train(cfg)


@pytest.fixture
def s3_bucket(monkeypatch):
    """An S3 bucket on loopback (moto's server), found through the environment as by any AWS tool."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3 = s3fs.S3FileSystem(skip_instance_cache=True)
    s3.mkdir("shards")
    yield s3
    server.stop()


def test_shards_uploaded_to_s3_stream_as_from_disk(demo_shards, s3_bucket):
    s3_bucket.put(f"{demo_shards}/", "shards/demo/", recursive=True)  # as `aws s3 cp --recursive` uploads
    shards, collate = list_shards("s3://shards/demo", "train"), demo_collate(demo_shards)
    assert shards == [f"s3://shards/demo/{p.rsplit('/', 1)[1]}" for p in list_shards(str(demo_shards), "train")]
    local = streamed(list_shards(str(demo_shards), "train"), collate)
    remote = streamed(shards, collate)
    assert [b.image_ids for b in remote] == [b.image_ids for b in local]
    assert all(torch.equal(a.inputs.pixels, b.inputs.pixels) for a, b in zip(local, remote))
    val = make_eval_loader(list_shards("s3://shards/demo", "val"), collate, batch_size=8, image_size=64)
    assert len(ids(val)) == 32
    with pytest.raises(DataError, match="s3://shards/elsewhere/sizes.json cannot be fetched"):
        list_shards("s3://shards/elsewhere", "train")


def test_shards_from_pipe_commands_stream_as_from_disk_with_sizes_json_from_the_same_command(demo_shards):
    collate = demo_collate(demo_shards)
    shards = list_shards(f"pipe:cat {demo_shards}/train-{{000000..000007}}.tar", "train")
    assert len(shards) == 8 and count_samples(shards) == 96  # pipe:cat .../sizes.json
    local = streamed(list_shards(str(demo_shards), "train"), collate)
    assert [b.image_ids for b in streamed(shards, collate)] == [b.image_ids for b in local]
