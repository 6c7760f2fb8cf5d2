"""`qrobust score` end to end on a corpus generated from real photos."""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_class_folder, write_suite
from qrobust.cli import main

SUMMARY_KEYS = {"schema", "model", "corpus", "env", "clean", "natural", "sequence", "systematic", "attacks", "wcar",
                "comparability", "intervals", "checks"}


def run(*args) -> int:
    return main(["-q", *map(str, args)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("score")
    src = make_class_folder(tmp / "src", per_class=2)
    suite = write_suite(tmp / "small.toml")
    assert run("generate", "--suite", suite, "--source", src, "--out", tmp / "corpus", "--workers", 2) == 0
    return tmp / "corpus"


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory) -> Path:
    """tiny_resnet fitted to the corpus's clean images (a model that is right on them: ACC 1.0)."""
    from qrobust.shared.models import ModelSpec, build_model, save_checkpoint

    images, labels = _shard_images(corpus, "clean/onecrop")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels)
    spec = ModelSpec(arch="tiny_resnet", num_classes=3)
    torch.manual_seed(0)
    model = build_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny_resnet.safetensors"
    save_checkpoint(model, spec, path)
    return path


class ConstantModel(torch.nn.Module):
    """Always predicts class 0 (for a model that is NC); loaded as `test_score:constant_model`."""

    qrobust_normalizes_input = True

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.fc = torch.nn.Linear(1, num_classes)

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.fc.out_features)
        logits[:, 0] = 1
        return logits


def constant_model(num_classes: int = 3):
    return ConstantModel(num_classes)


def _zarr(results: Path, name: str) -> np.ndarray:
    import zarr

    return zarr.open_group(str(results / "predictions.zarr"), mode="r")[name][...]


def _shard_images(corpus: Path, variant: str) -> tuple[np.ndarray, np.ndarray]:
    manifest = json.loads((corpus / "manifest.json").read_text())
    images, labels = [], []
    for shard in manifest["variants"][variant]["shards"]:
        with tarfile.open(corpus / shard["name"]) as tar:
            for m in tar:
                data = tar.extractfile(m).read()
                if m.name.endswith(".cls"):
                    labels.append(int(data))
                else:
                    images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return np.stack(images), np.asarray(labels)


def test_score_stores_what_the_model_predicts(corpus, checkpoint, tmp_path):
    from qrobust.shared.models import load_model

    out = tmp_path / "r"
    assert run("score", "--corpus", corpus, "--model", checkpoint, "--out", out, "--workers", 2,
               "--batch-size", 4) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS and summary["schema"] == "qrobust.summary/2"
    assert summary["model"]["arch"] == "tiny_resnet" and summary["corpus"]["samples"] == 6
    # the stored top-5 equal an independent forward pass on independently decoded shards
    images, labels = _shard_images(corpus, "clean/onecrop")
    model, _, _ = load_model(str(checkpoint))
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    expected = logits.topk(5 if logits.shape[1] >= 5 else logits.shape[1], dim=1).indices.numpy()
    stored = _zarr(out, "clean/onecrop")
    np.testing.assert_array_equal(stored[:, :expected.shape[1]], expected)
    assert summary["clean"]["acc"] == pytest.approx((expected[:, 0] == labels).mean())
    np.testing.assert_array_equal(_zarr(out, "labels"), labels)
    import zarr

    attrs = dict(zarr.open_group(str(out / "predictions.zarr"), mode="r").attrs)
    manifest_sha = __import__("hashlib").sha256((corpus / "manifest.json").read_bytes()).hexdigest()
    assert attrs["manifest_sha256"] == manifest_sha and attrs["model_sha256"] == summary["model"]["sha256"]
    # every family is summarised from the stored predictions
    natural = summary["natural"]
    assert set(natural["acc"]) == {f"{c}-{s}" for c in ("gaussian_noise", "impulse_noise", "fog") for s in (1, 3)}
    assert natural["mnr"] == pytest.approx(np.mean(list(natural["acc_by_corruption"].values())))
    assert _zarr(out, "sequence/rotate").shape == (6, 31, 5)
    assert set(summary["sequence"]["fp"]) == {"gaussian_noise", "rotate"}
    assert 0 <= summary["sequence"]["mfp"] <= 1
    assert set(summary["systematic"]["acc"]) == {"decode-ffmpeg", "resize-opencv-area"}
    # the schema, pinned (README "summary.json")
    assert set(summary["model"]) == {"name", "arch", "quant", "sha256", "state_sha256", "normalize", "spec"}
    assert summary["model"]["normalize"] == "imagenet"  # a registered architecture
    assert set(summary["corpus"]) == {"suite", "manifest_sha256", "samples", "location", "provenance"}
    assert summary["corpus"]["location"] == corpus.name  # a shared summary names no local path
    assert summary["model"]["spec"]["weights"] == checkpoint.name
    assert set(summary["env"]) == {"qrobust", "torch", "python", "device", "batch_size", "seed"}
    assert set(summary["clean"]) == {"acc", "acc_square"}
    assert set(natural) == {"acc", "acc_by_corruption", "mnr", "nci", "extra", "mce", "relative_mce", "mce_basis"}
    assert natural["mce"] is None  # 3 classes, not ImageNet: no AlexNet normalization
    assert set(summary["sequence"]) == {"fp", "mfp", "t5d", "mt5d", "extra", "difficulty"}
    assert set(summary["systematic"]) == {"acc", "mean", "sni", "sni_square", "sr"}
    assert set(summary["comparability"]) == {"corpus", "clean", "natural", "mce", "sequence", "systematic"}
    # every headline number has its interval, and the interval holds the number
    intervals = summary["intervals"]
    assert intervals["resamples"] == 1000 and intervals["level"] == 0.95 and intervals["samples"] == 6
    for path in ("clean.acc", "natural.mnr", "natural.nci", "sequence.mfp", "sequence.fp.rotate", "systematic.mean",
                 "systematic.sr", "systematic.sni", "natural.acc.fog-3"):
        low, high = intervals["values"][path]
        value = summary
        for key in path.split(".", 2) if path.startswith("natural.acc.") else path.split("."):
            value = value[key]
        assert low <= value + 1e-9 and value - 1e-9 <= high, path
    assert summary["attacks"] == {} and summary["wcar"] == {}
    assert set(summary["checks"]) == {"gradient_masking", "warnings"}
    from qrobust.score import metrics

    rotate = _zarr(out, "sequence/rotate")
    assert summary["sequence"]["fp"]["rotate"] == pytest.approx(metrics.flip_probability(rotate[..., 0], noise=False))
    noise = _zarr(out, "sequence/gaussian_noise")
    assert summary["sequence"]["fp"]["gaussian_noise"] == pytest.approx(
        np.mean(noise[:, 1:, 0] != noise[:, :1, 0]))
    assert summary["systematic"]["sni"] == pytest.approx(  # relative to the one-crop ACC, as the paper's Table 9
        (summary["clean"]["acc"] - summary["systematic"]["mean"]) / summary["clean"]["acc"])
    assert summary["systematic"]["sni_square"] == pytest.approx(
        (summary["clean"]["acc_square"] - summary["systematic"]["mean"]) / summary["clean"]["acc_square"])


def test_workers_and_batch_size_do_not_change_results(corpus, checkpoint, tmp_path):
    for name, workers, batch in (("a", 0, 64), ("b", 2, 3)):
        assert run("score", "--corpus", corpus, "--model", checkpoint, "--out", tmp_path / name,
                   "--workers", workers, "--batch-size", batch) == 0
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in "ab")
    for family in ("clean", "natural", "sequence", "systematic"):
        assert a[family] == b[family]


def test_killed_score_resumes_to_the_same_results(corpus, checkpoint, tmp_path):
    args = ["score", "--corpus", corpus, "--model", checkpoint, "--workers", 0, "--batch-size", 1]
    assert run(*args, "--out", tmp_path / "ref") == 0
    out = tmp_path / "killed"
    for attempt in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "qrobust", "-q", *map(str, args), "--out", out],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        progress = out / "progress.json"
        while time.time() < deadline and proc.poll() is None:
            if progress.is_file() and len(json.loads(progress.read_text() or "[]")) >= 4 + 8 * attempt:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert run(*args, "--out", out) == 0
    ref, got = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("ref", "killed"))
    assert {k: v for k, v in got.items() if k != "corpus"} == {k: v for k, v in ref.items() if k != "corpus"}
    for variant in ("clean/onecrop", "sequence/gaussian_noise", "natural/fog-3"):
        np.testing.assert_array_equal(_zarr(out, variant), _zarr(tmp_path / "ref", variant))


def test_results_folder_belongs_to_one_model_and_corpus(corpus, checkpoint, tmp_path, capsys):
    out = tmp_path / "r"
    assert run("score", "--corpus", corpus, "--model", checkpoint, "--out", out, "--only", "clean/*") == 0
    capsys.readouterr()
    assert run("score", "--corpus", corpus, "--model", "tiny_cnn", "--out", out, "--only", "clean/*") == 2
    assert "holds results of another" in capsys.readouterr().err
    # another --only adds to the same results, and the summary covers both
    assert run("score", "--corpus", corpus, "--model", checkpoint, "--out", out, "--only", "systematic/*") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clean"]["acc"] is not None and summary["systematic"] is not None and summary["natural"] is None


def test_tampered_shard_stops_scoring(corpus, checkpoint, tmp_path, capsys):

    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    shard = copy / "natural/fog-1/fog-1-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    for workers in (0, 2):  # in a DataLoader worker too: one line, no traceback
        capsys.readouterr()
        assert run("score", "--corpus", copy, "--model", checkpoint, "--out", tmp_path / f"r{workers}",
                   "--workers", workers, "--only", "natural/fog-1") == 2
        err = capsys.readouterr().err
        assert "natural/fog-1/fog-1-000001.tar: sha256 differs" in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "http://elsewhere/x.tar", "natural/fog-1/x.tar"])
def test_manifest_names_cannot_leave_the_corpus(corpus, tmp_path, name):

    from qrobust.score.stream import Corpus, CorpusError

    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["variants"]["natural/fog-1"]["shards"][0]["name"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match="fog-1"):
        Corpus(str(copy))


def test_corpus_at_an_http_url(corpus, checkpoint, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(corpus))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert run("score", "--corpus", url, "--model", checkpoint, "--out", tmp_path / "remote",
                   "--only", "clean/*", "--workers", 0) == 0
    finally:
        server.shutdown()
    assert run("score", "--corpus", corpus, "--model", checkpoint, "--out", tmp_path / "local", "--only", "clean/*",
               "--workers", 0) == 0
    remote, local = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("remote", "local"))
    assert remote["clean"] == local["clean"] and remote["corpus"]["manifest_sha256"] == local["corpus"]["manifest_sha256"]


@pytest.fixture
def served(tmp_path):
    """Serve a folder over HTTP on loopback; yields a function folder -> URL."""
    servers = []

    def serve(folder):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a, **k: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()


def test_a_tampered_shard_at_a_url_stops_the_run_before_it_is_used(corpus, checkpoint, tmp_path, served, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    victim = sorted(copy.glob("clean/onecrop/*.tar"))[-1]  # the last shard: earlier ones are scored first
    data = bytearray(victim.read_bytes())
    data[700] ^= 1  # one bit inside the first member's payload, same size: only the hash can tell
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert run("score", "--corpus", served(copy), "--model", checkpoint, "--out", tmp_path / "r",
               "--only", "clean/onecrop", "--workers", 0) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "sha256" in err
    assert not (tmp_path / "r" / "summary.json").exists()
    stored = json.loads((tmp_path / "r" / "progress.json").read_text()) if (tmp_path / "r" / "progress.json").exists() \
        else []
    assert not [u for u in stored if u.endswith(f"#{len(list(copy.glob('clean/onecrop/*.tar'))) - 1}")]


def test_two_models_scored_and_reported(corpus, checkpoint, tmp_path):
    import csv

    for name, model in (("fitted", checkpoint), ("constant", "test_score:constant_model")):
        assert run("score", "--corpus", corpus, "--model", model, "--out", tmp_path / name) == 0
    assert run("report", tmp_path / "fitted", tmp_path / "constant", "--out", tmp_path / "report",
               "--nc-threshold", 0.5) == 0
    report = tmp_path / "report"
    index = (report / "index.html").read_text()
    assert index.count("<table") >= 5 and 'src="http' not in index
    summaries = {}
    for name in ("fitted", "constant"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        summaries[name] = summary
    assert summaries["fitted"]["clean"]["acc"] == 1.0 and summaries["constant"]["clean"]["acc"] == pytest.approx(1 / 3)
    fitted_name = summaries["fitted"]["model"]["name"]
    constant_name = summaries["constant"]["model"]["name"]

    def table(name):
        with open(report / "tables" / f"{name}.csv") as f:
            return {row["Model"]: row for row in csv.DictReader(f)}

    checks = {"clean": [("ACC", ("clean", "acc"))],
              "natural": [("mNR", ("natural", "mnr")), ("NCI", ("natural", "nci"))],
              "systematic": [("Mean ACC_s", ("systematic", "mean")), ("SR", ("systematic", "sr"))]}
    for name, columns in checks.items():
        rows = table(name)
        # below --nc-threshold 0.5: flagged in its own column, its numbers kept (a CSV is read by programs)
        assert rows[constant_name]["NC"] == "yes" and rows[fitted_name]["NC"] == ""
        column, (family, key) = columns[0]
        assert float(rows[constant_name][column]) == pytest.approx(round(summaries["constant"][family][key] * 100, 2),
                                                                   abs=0.006)
        for column, (family, key) in columns:
            assert float(rows[fitted_name][column]) == pytest.approx(
                round(summaries["fitted"][family][key] * 100, 2), abs=0.006)
    for name in ("natural", "sequences", "systematic", "systematic-variants"):
        assert (report / "tables" / f"{name}.md").is_file() and (report / "tables" / f"{name}.tex").is_file()
    assert list((report / "figures").glob("*.png")) and list((report / "figures").glob("*.svg"))


def test_model_and_corpus_classes_must_agree(corpus, tmp_path, capsys):
    assert run("score", "--corpus", corpus, "--model", "test_score:constant_model", "--out", tmp_path / "ok",
               "--only", "clean/onecrop") == 0
    capsys.readouterr()
    from qrobust.shared.models import build_model

    torch.save(build_model("tiny_cnn", 10).net.state_dict(), tmp_path / "ten.pth")
    assert run("score", "--corpus", corpus, "--model", "tiny_cnn", "--weights", tmp_path / "ten.pth",
               "--out", tmp_path / "r") == 2
    assert "tiny_cnn" in capsys.readouterr().err


def test_partial_files_of_killed_runs_are_removed_when_the_folder_is_reopened(corpus, checkpoint, tmp_path):
    """A run killed between writing progress.json's partial file and renaming it leaves the partial; the next
    run removes it (and only it: a live process's partial, or another host's, stays)."""
    from qrobust.shared.files import partial_path

    out = tmp_path / "r"
    assert run("score", "--corpus", corpus, "--model", checkpoint, "--out", out, "--workers", 0,
               "--only", "clean/onecrop") == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = partial_path(out / "x").name.removeprefix("x.partial-").removesuffix(f"-{os.getpid()}")
    stale = out / f"progress.json.partial-{host}-{int(dead.stdout)}"
    live = out / f"summary.json.partial-{host}-{os.getppid()}"
    remote = out / "progress.json.partial-otherhost-1"
    for p in (stale, live, remote):
        p.write_text("{")
    assert run("score", "--corpus", corpus, "--model", checkpoint, "--out", out, "--workers", 0,
               "--only", "clean/onecrop") == 0
    assert not stale.exists() and live.exists() and remote.exists()
