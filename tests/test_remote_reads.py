"""Remote corpora are read completely, and no further: however a server sends a file, a corpus over HTTP scores
exactly like its local copy, and a server sending more than the manifest declares is cut off and refused.

Every server here is a real one on 127.0.0.1, in a thread: without Content-Length, in chunks of a few bytes
(the manifest byte by byte) with small pauses, or sending without end.
"""
from __future__ import annotations

import http.server
import io
import json
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import MEAN_MODEL, small_corpus
from qrobust.cli import main
from qrobust.score.stream import Corpus, CorpusError, read_url
from qrobust.shared.bounded import read_at_most

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANTS = "clean/onecrop,sequence/rotate"
ENDLESS_CAP = 256 << 20  # what an endless server sends at most, so that a reader that never stops fails, not hangs


MODEL = MEAN_MODEL


def run(*args) -> int:
    return main(["-q", *map(str, args)])


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves the files of ``server.root`` as ``server.mode`` says:

    * ``chunked``: chunked transfer coding, chunks of 1 to 37 bytes (the manifest's of 1), a pause now and then;
    * ``close``: no Content-Length and no chunks: the body ends when the connection closes; small writes, pauses;
    * ``endless``: a shard followed by zeros without end (no Content-Length); the manifest as it is.
    """

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        path = server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        server.requests.append(self.path)
        self.send_response(200)
        if server.mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in self.pieces(data, 1 if path.name == "manifest.json" else 37):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if server.mode == "close" or path.name == "manifest.json":
            for piece in self.pieces(data, 37):
                self.wfile.write(piece)
            return
        self.wfile.write(data)  # endless: the shard, then more than any manifest declares
        sent, zeros = len(data), bytes(1 << 16)
        try:
            while sent < ENDLESS_CAP:
                self.wfile.write(zeros)
                sent += len(zeros)
        except OSError:  # the reader hung up: what it needed it had
            pass
        server.sent.append(sent)

    def pieces(self, data: bytes, most: int):
        rng = random.Random(len(data))
        pos = 0
        while pos < len(data):
            n = rng.randint(1, most)
            yield data[pos:pos + n]
            pos += n
            if rng.random() < 0.002:
                time.sleep(0.002)  # a slow server: the reader must wait, not take what it has


@pytest.fixture
def serve():
    """serve(folder, mode) -> URL of a server on 127.0.0.1 in a thread, shut down after the test."""
    servers = []

    def start(folder: Path, mode: str) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.root, server.mode, server.requests, server.sent = Path(folder), mode, [], []
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    start.servers = servers
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("remote"), VARIANTS)


def predictions(out: Path) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(str(out / "predictions.zarr"), mode="r")
    return {vid: group[vid][...] for vid in VARIANTS.split(",")}


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "r"
    assert run("score", "--corpus", corpus, "--model", MODEL, "--out", out, "--workers", 0) == 0
    return out


@pytest.mark.parametrize("mode, workers", [("chunked", 0), ("close", 0), ("chunked", 2)])
def test_a_corpus_over_http_scores_like_its_local_copy(corpus, local, serve, tmp_path, mode, workers):
    url = serve(corpus, mode)
    out = tmp_path / "remote"
    assert run("score", "--corpus", url, "--model", MODEL, "--out", out, "--workers", workers) == 0
    remote, here = predictions(out), predictions(local)
    for vid in here:
        np.testing.assert_array_equal(remote[vid], here[vid])
    summaries = [json.loads((o / "summary.json").read_text()) for o in (out, local)]
    for key in ("clean", "sequence"):
        assert summaries[0][key] == summaries[1][key]
    assert summaries[0]["corpus"]["manifest_sha256"] == summaries[1]["corpus"]["manifest_sha256"]


def test_read_url_waits_for_every_byte(corpus, serve):
    manifest = (corpus / "manifest.json").read_bytes()
    for mode in ("chunked", "close"):
        url = serve(corpus, mode)
        assert read_url(f"{url}/manifest.json", len(manifest) + 1) == manifest
        assert read_url(f"{url}/manifest.json", 100) == manifest[:100]  # and no more than asked


def test_a_server_sending_more_than_declared_is_cut_off_and_refused(corpus, serve, tmp_path, capsys):
    url = serve(corpus, "endless")
    source = Corpus(url)
    shard = source.manifest["variants"]["clean/onecrop"]["shards"][0]
    with pytest.raises(CorpusError, match=f"{shard['name']}: larger than the manifest's {shard['bytes']} bytes"):
        source.shard_bytes(shard)
    capsys.readouterr()
    assert run("score", "--corpus", url, "--model", MODEL, "--out", tmp_path / "r", "--workers", 0) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "larger than the manifest's" in err and "Traceback" not in err, err
    server = serve.servers[-1]
    deadline = time.monotonic() + 10
    while len(server.sent) < 2 and time.monotonic() < deadline:  # each reader hung up, the handler ended
        time.sleep(0.05)
    assert len(server.sent) >= 2 and max(server.sent) < 64 << 20, server.sent  # cut off, not read on to the cap


def test_read_at_most_reads_through_short_reads_and_stops_at_the_limit():
    class Trickle(io.RawIOBase):
        """One byte per read, from an endless source: what a slow socket may give."""

        def __init__(self):
            self.given = 0

        def readable(self):
            return True

        def read(self, n=-1):
            self.given += 1
            return b"x"

    stream = Trickle()
    assert read_at_most(stream, 1000) == b"x" * 1000 and stream.given == 1000
    assert read_at_most(io.BytesIO(b"abc"), 10) == b"abc"


def test_a_truncated_or_missing_remote_file_is_one_line(corpus, serve, tmp_path, capsys):
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = manifest["variants"]["clean/onecrop"]["shards"][1]
    data = (copy / shard["name"]).read_bytes()
    (copy / shard["name"]).write_bytes(data[:-700])
    url = serve(copy, "close")
    capsys.readouterr()
    assert run("score", "--corpus", url, "--model", MODEL, "--out", tmp_path / "r", "--workers", 0,
               "--only", "clean/onecrop") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{shard['name']}: {len(data) - 700} bytes, manifest says {len(data)}" in err
    (copy / shard["name"]).unlink()
    assert run("score", "--corpus", url, "--model", MODEL, "--out", tmp_path / "r2", "--workers", 0,
               "--only", "clean/onecrop") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "404" in err and shard["name"] in err, err


def test_redirects_leave_http_for_nothing_else(tmp_path):
    """A server redirecting a corpus file to ftp:// or file:// gets a one-line refusal; nothing else is read."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"schema": "not yours"}')
    targets = iter([f"ftp://127.0.0.1:9{secret}", f"file://{secret}"])

    class Redirect(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", next(targets))
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for refusal in ("redirect to a URL that is not HTTP", "is not allowed"):
            with pytest.raises(CorpusError, match=refusal) as e:
                Corpus(f"http://127.0.0.1:{server.server_address[1]}")
            assert "\n" not in str(e.value) and "not yours" not in str(e.value)
    finally:
        server.shutdown()
        server.server_close()
