"""Shards at a URL: a real HTTP server on loopback serves shards that training streams, through webdataset's
gopen (curl), as a local run reads them; and what a missing shard or a server that is down give."""

import functools
import http.server
import shutil
import threading

import pytest
import torch
from helpers import ROOT, free_port, logged, start_ranks, tiny_overrides, wait_all
from safetensors.torch import load_file

from imcap.config import ConfigError, load_config
from imcap.data.shards import DataError, count_samples, list_shards
from imcap.train import train


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test's output is not the server's log
        pass


@pytest.fixture
def serve():
    """serve(directory) -> the http:// URL of a server on loopback that serves it, for the test's length."""
    servers = []

    def start(directory):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=directory))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def tiny_run(shards, runs, *extra):
    return load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(shards, runs, "train.cpu=true", *extra))


def test_two_processes_streaming_their_shards_over_http_train_bitwise_as_two_reading_them_from_disk(
    demo_shards, tmp_path, serve
):
    url = serve(demo_shards)
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


def test_a_shard_the_server_does_not_have_stops_training_naming_its_url(demo_shards, tmp_path, serve):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    (shards / "train-000003.tar").unlink()  # sizes.json still lists it
    url = serve(shards)
    with pytest.raises(
        DataError, match=f"{url}/train-000003.tar: {url}/sizes.json records 12 samples, but reading it gave 0"
    ):
        train(tiny_run(url, tmp_path / "runs"))


def test_a_server_that_is_down_is_an_error_naming_the_url_of_its_sizes_json(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/shards"
    with pytest.raises(DataError, match=f"{url}/sizes.json cannot be fetched"):
        list_shards(url, "train")


def test_a_feature_cache_of_shards_at_a_url_is_refused_at_start(demo_shards, tmp_path, serve):
    url = serve(demo_shards)
    cfg = tiny_run(url, tmp_path / "runs", "data.feature_cache=true", "data.train_crop=center")
    with pytest.raises(ConfigError, match="data.feature_cache writes the cache beside the shards"):
        train(cfg)
