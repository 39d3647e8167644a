"""Shared fixtures: a tiny demo dataset as real shards, the shared data folder, a web server on loopback
(plain helpers: helpers.py)."""

from __future__ import annotations

import functools
import http.server
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import SHARED_DATA


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """96 train and 32 val demo images at 64 px in shards of 12 samples (8 train, 3 val shards)."""
    from imcap.data.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train_images=96, val_images=32, image_size=64, shard_samples=12)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: the shared real-data folder is needed for this test")
    return SHARED_DATA


class ShardHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; a file named in the server's `drops` is cut off half-way that many times (the
    connection stalls, then closes with fewer bytes sent than announced), and every request is counted."""

    def do_GET(self):
        self.server.requests[self.path.rsplit("/", 1)[-1]] += 1
        super().do_GET()

    def copyfile(self, source, outputfile):
        name = self.path.rsplit("/", 1)[-1]
        if self.server.drops.get(name, 0) > 0:
            self.server.drops[name] -= 1
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            # A link that drops stalls first. Closed at once, curl could exit before the reader drained
            # the pipe, and webdataset's pipe drops what it holds when curl's exit code is an error.
            time.sleep(1)
            self.close_connection = True
            return
        super().copyfile(source, outputfile)

    def log_message(self, *args):  # the test's output is not the server's log
        pass


@pytest.fixture
def serve():
    """serve(directory, drops={file name: times}) -> (the http:// URL of a server on loopback that serves the
    directory for the test's length, the server: its `requests` counts them by file name)."""
    servers = []

    def start(directory, drops=None):
        handler = functools.partial(ShardHandler, directory=directory)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.drops, server.requests = dict(drops or {}), Counter()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
