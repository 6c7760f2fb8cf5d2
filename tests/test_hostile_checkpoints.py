"""Hostile and broken model files: loading never runs code from a file, and every refusal is one clear line.

Pickle payloads (``__reduce__`` writing a marker file) go through every public
way of loading a model: ``load_model`` (checkpoint, ARCH + weights, callable +
weights), ``build_model``, ``qrobust score --model/--weights``, ``qrobust ls
checkpoints``, ``qrobust quantize --from`` and the training state that
``train`` resumes from. Broken safetensors files (garbage header, truncated,
bad metadata, unknown architecture, a callable named by the file) must give a
qrobust error naming the file, never a traceback from deep inside.
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from helpers import make_class_folder
from qrobust.cli import main
from qrobust.shared.errors import QrobustError
from qrobust.shared.models import META_MODEL, ModelError, ModelSpec, build_model, load_model, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES = 3
MARKER_ENV = "QROBUST_TEST_HOSTILE_MARKER"


class OpenPayload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): what a malicious .pt file does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class TouchPayload(OpenPayload):
    """The same through ``pathlib.Path.touch`` (a GLOBAL that is not a builtin)."""

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def plant_marker(num_classes: int = CLASSES) -> nn.Module:
    """A model callable with a side effect: a checkpoint naming it must not get it called."""
    Path(os.environ[MARKER_ENV]).touch()
    return build_model("tiny_cnn", num_classes).net


def tiny_state_dict() -> dict:
    return build_model("tiny_cnn", CLASSES).net.state_dict()


def pickle_file(kind: str, path: Path, marker: Path) -> Path:
    """A weights file whose unpickling would create ``marker``."""
    tensors = tiny_state_dict()
    if kind == "zip":
        torch.save({**tensors, "x": OpenPayload(marker)}, path)
    elif kind == "legacy":  # torch's pre-1.6 format: a bare pickle stream with torch's magic number
        torch.save({**tensors, "x": TouchPayload(marker)}, path, _use_new_zipfile_serialization=False)
    elif kind == "raw":  # not torch's format at all: a plain pickle
        path.write_bytes(pickle.dumps({"state_dict": TouchPayload(marker)}))
    elif kind == "wrapped":  # the payload where a training checkpoint keeps its weights
        torch.save({"state_dict": OpenPayload(marker), "epoch": 3}, path)
    else:
        raise ValueError(kind)
    return path


PICKLES = ["zip", "legacy", "raw", "wrapped"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A 3-class corpus (clean/onecrop only) for the `qrobust score` paths."""
    tmp = tmp_path_factory.mktemp("hostile")
    src = make_class_folder(tmp / "src", per_class=1, size=40)
    (tmp / "s.toml").write_text('name = "s"\n[geometry]\nresize = 40\ncrop = 36\n[clean]\nvariants = ["onecrop"]\n'
                                'encoding = "png"\n')
    assert main(["-q", "generate", "--suite", str(tmp / "s.toml"), "--source", str(src), "--out",
                 str(tmp / "corpus"), "--workers", "1"]) == 0
    return tmp / "corpus"


def one_line_error(e: BaseException, path: Path) -> str:
    text = str(e)
    assert isinstance(e, QrobustError), type(e)
    assert "\n" not in text and "Traceback" not in text and "\x1b" not in text
    assert str(path) in text, text
    return text


def cli_error(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["-q", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- pickle payloads

@pytest.mark.parametrize("kind", PICKLES)
def test_the_payloads_are_live(tmp_path, kind):
    """Each file kind really runs its payload when unpickled without the weights-only guard."""
    witness = tmp_path / "witness"
    path = pickle_file(kind, tmp_path / "live.pt", witness)
    if kind == "raw":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert witness.exists()


@pytest.mark.parametrize("kind", PICKLES)
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pickle_payload_never_runs_through_the_python_api(tmp_path, kind, suffix, monkeypatch):
    marker = tmp_path / "pwned"
    path = pickle_file(kind, tmp_path / f"evil{suffix}", marker)
    with pytest.raises(ModelError, match="refused, not a plain tensor state dict") as e:
        load_model("tiny_cnn", weights=path, num_classes=CLASSES)
    text = one_line_error(e.value, path)
    assert "weights_only=False" not in text and "trust" not in text  # no advice to load it unsafely
    with pytest.raises(ModelError, match="not a qrobust checkpoint") as e:  # never opened: no spec in a .pt
        load_model(str(path))
    one_line_error(e.value, path)
    monkeypatch.setenv(MARKER_ENV, str(tmp_path / "callable-ran"))
    with pytest.raises(ModelError, match="refused"):
        load_model("test_hostile_checkpoints:plant_marker", weights=path, num_classes=CLASSES)
    build_model(ModelSpec("tiny_cnn", CLASSES, weights=str(path), source="state_dict"))  # builds, never reads
    assert not marker.exists()


def test_pickle_payload_named_safetensors_is_not_a_safetensors_file(tmp_path):
    marker = tmp_path / "pwned"
    path = pickle_file("zip", tmp_path / "evil.safetensors", marker)
    for load in (lambda: load_model(str(path)), lambda: load_model("tiny_cnn", weights=path, num_classes=CLASSES)):
        with pytest.raises(ModelError, match="not a readable safetensors file") as e:
            load()
        one_line_error(e.value, path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_pickle_payload_never_runs_through_the_cli(tmp_path, corpus, capsys, kind):
    marker = tmp_path / "pwned"
    path = pickle_file(kind, tmp_path / "evil.pth", marker)
    err = cli_error(capsys, "score", "--corpus", corpus, "--model", path, "--out", tmp_path / "r1")
    assert err.startswith(f"qrobust score: error: {path} is not a qrobust checkpoint")
    err = cli_error(capsys, "score", "--corpus", corpus, "--model", "tiny_cnn", "--weights", path,
                    "--out", tmp_path / "r2")
    assert err.startswith(f"qrobust score: error: {path}: refused, not a plain tensor state dict")
    # quantize: a state dict with --arch, and the file alone
    train = make_class_folder(tmp_path / "train", per_class=2, size=40)
    err = cli_error(capsys, "quantize", "--from", path, "--arch", "tiny_cnn", "--method", "lsq", "--bits", "4",
                    "--train", train, "--val", train, "--out", tmp_path / "q.safetensors", "--epochs", "1")
    assert f"{path}: refused" in err
    err = cli_error(capsys, "quantize", "--from", path, "--method", "lsq", "--bits", "4", "--train", train,
                    "--out", tmp_path / "q.safetensors")
    assert f"{path} is not a qrobust checkpoint" in err
    # ls checkpoints looks at .safetensors files only: the .pth is never opened
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "evil.pth").write_bytes(path.read_bytes())
    evil = pickle_file(kind, tmp_path / "models" / "evil.safetensors", marker)
    capsys.readouterr()
    assert main(["-q", "ls", "checkpoints", str(tmp_path / "models")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{evil}: not a qrobust checkpoint (not a readable safetensors file: ") and \
        out.count("\n") == 1
    assert not marker.exists()


# --------------------------------------------------------------------------- broken safetensors files

def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def _with_spec(path: Path, spec, tensors: dict | None = None) -> Path:
    """A safetensors file with ``spec`` (a JSON text, or an object dumped to JSON) as its qrobust metadata."""
    text = spec if isinstance(spec, str) else json.dumps(spec)
    save_file(tiny_state_dict() if tensors is None else tensors, str(path), metadata={META_MODEL: text})
    return path


GOOD_SPEC = {"arch": "tiny_cnn", "num_classes": CLASSES, "quant": None, "weights": None, "source": "init"}

BROKEN = {  # name -> (make(path), what the one-line error says)
    "empty": (lambda p: _write(p, b""), "not a readable safetensors file: .*header too small"),
    "huge-header": (lambda p: _write(p, struct.pack("<Q", 2 ** 62) + b"{}"),  # a 4 EiB header: never allocated
                    "not a readable safetensors file: .*header too large"),
    "header-not-json": (lambda p: _raw_safetensors(p, b"{{{{not json"), "not a readable safetensors file: .*JSON"),
    "offsets-past-the-end": (lambda p: _raw_safetensors(
        p, {"w": {"dtype": "F32", "shape": [10], "data_offsets": [0, 4000]}}, b"\0" * 40),
        "not a readable safetensors file"),
    "shape-bigger-than-data": (lambda p: _raw_safetensors(
        p, {"w": {"dtype": "F32", "shape": [2 ** 40], "data_offsets": [0, 40]}}, b"\0" * 40),
        "not a readable safetensors file"),
    "truncated": (lambda p: _write(p, _with_spec(p, GOOD_SPEC).read_bytes()[:-100]),
                  "not a readable safetensors file: .*incomplete metadata"),
    "metadata-not-json": (lambda p: _with_spec(p, '{"arch": "tiny_cnn", '),
                          "malformed qrobust.model metadata \\(not JSON"),
    "metadata-a-list": (lambda p: _with_spec(p, [1, 2]), "malformed qrobust.model metadata: not a qrobust model spec"),
    "metadata-null": (lambda p: _with_spec(p, "null"), "malformed qrobust.model metadata: not a qrobust model spec"),
    "metadata-deep": (lambda p: _with_spec(p, "[" * 100000 + "]" * 100000), "malformed qrobust.model metadata"),
    "unknown-keys": (lambda p: _with_spec(p, {**GOOD_SPEC, "hook": "os:system"}), "unknown keys \\['hook'\\]"),
    "arch-not-a-string": (lambda p: _with_spec(p, {**GOOD_SPEC, "arch": 5}), "arch must be a non-empty string"),
    "classes-huge": (lambda p: _with_spec(p, {**GOOD_SPEC, "num_classes": 10 ** 12}),
                     "num_classes must be an integer from 1 to 100000"),
    "classes-text": (lambda p: _with_spec(p, {**GOOD_SPEC, "num_classes": "many"}), "num_classes must be"),
    "classes-bool": (lambda p: _with_spec(p, {**GOOD_SPEC, "num_classes": True}), "num_classes must be"),
    "quant-a-list": (lambda p: _with_spec(p, {**GOOD_SPEC, "quant": ["lsq"]}), "quant must be null or an object"),
    "quant-method-a-list": (lambda p: _with_spec(p, {**GOOD_SPEC, "quant": {"method": [], "w_bits": 4,
                                                                              "a_bits": 4}}),
                            "quant.method must be a string"),
    "quant-bits": (lambda p: _with_spec(p, {**GOOD_SPEC, "quant": {"method": "lsq", "w_bits": 3, "a_bits": 4}}),
                   "w_bits must be one of"),
    "quant-method": (lambda p: _with_spec(p, {**GOOD_SPEC, "quant": {"method": "evil", "w_bits": 4, "a_bits": 4}}),
                     "unknown quantization method 'evil'|unknown .*'evil'"),
    "unknown-arch": (lambda p: _with_spec(p, {**GOOD_SPEC, "arch": "resnet1337"}), "unknown architecture 'resnet1337'"),
    "tensors-of-another-arch": (lambda p: _with_spec(p, {**GOOD_SPEC, "arch": "tiny_resnet"}),
                                "state dict does not match tiny_resnet"),
    "callable-arch": (lambda p: _with_spec(p, {**GOOD_SPEC, "arch": "test_hostile_checkpoints:plant_marker"}),
                      "names the callable 'test_hostile_checkpoints:plant_marker' as its architecture, and a "
                      "checkpoint may not choose code to run"),
    "callable-in-stdlib": (lambda p: _with_spec(p, {**GOOD_SPEC, "arch": "os:getpid"}), "may not choose code to run"),
}


@pytest.fixture
def marker_env(tmp_path, monkeypatch) -> Path:
    marker = tmp_path / "callable-ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    return marker


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_checkpoint_is_one_clear_error(tmp_path, name, marker_env):
    make, message = BROKEN[name]
    path = make(tmp_path / f"{name}.safetensors")
    with pytest.raises(ModelError, match=message) as e:
        load_model(str(path))
    one_line_error(e.value, path)
    assert not marker_env.exists()


def test_broken_checkpoints_through_the_cli(tmp_path, corpus, capsys, marker_env):
    """`qrobust score` answers each with one line naming the file; `qrobust ls checkpoints` lists each."""
    folder = tmp_path / "models"
    folder.mkdir()
    paths = {name: make(folder / f"{name}.safetensors") for name, (make, _) in BROKEN.items()
             if name != "metadata-deep"}  # see the next test
    for name in ("huge-header", "truncated", "metadata-not-json", "classes-huge", "unknown-arch", "callable-arch"):
        err = cli_error(capsys, "score", "--corpus", corpus, "--model", paths[name], "--out", tmp_path / name)
        assert err.startswith(f"qrobust score: error: {paths[name]}"), err
    good = save_checkpoint(build_model("tiny_cnn", CLASSES), ModelSpec("tiny_cnn", CLASSES),
                           folder / "good.safetensors")
    capsys.readouterr()
    assert main(["-q", "ls", "checkpoints", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(paths) + 1
    assert f"{good}: tiny_cnn ({CLASSES} classes)" in lines
    for name in ("empty", "huge-header", "truncated", "metadata-not-json", "classes-huge", "unknown-keys"):
        assert any(line.startswith(f"{paths[name]}: not a qrobust checkpoint (") for line in lines), name
    assert not marker_env.exists()


def test_ls_checkpoints_lists_deeply_nested_metadata_as_not_a_checkpoint(tmp_path, capsys):
    path = BROKEN["metadata-deep"][0](tmp_path / "deep.safetensors")
    capsys.readouterr()
    assert main(["-q", "ls", "checkpoints", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: not a qrobust checkpoint (")


def test_a_callable_is_run_only_when_the_user_names_it(tmp_path, marker_env):
    """The file may not name code; the user may (and then the file gives the spec, quantization included)."""
    path = BROKEN["callable-arch"][0](tmp_path / "c.safetensors")
    with pytest.raises(ModelError, match="may not choose code"):
        load_model(str(path))
    model, _, _ = load_model("tiny_cnn", weights=path, num_classes=CLASSES)  # as a plain state dict: no call
    assert not marker_env.exists()
    model, spec, sha = load_model("test_hostile_checkpoints:plant_marker", weights=path, num_classes=CLASSES)
    assert marker_env.exists()  # the callable is live: it ran because the user named it
    assert (spec.arch, spec.source, spec.weights, len(sha)) == ("test_hostile_checkpoints:plant_marker",
                                                               "checkpoint", str(path), 64)
    with pytest.raises(ModelError, match="is a checkpoint of 'test_hostile_checkpoints:plant_marker', not of"):
        load_model("test_models:make_net", weights=path)


@pytest.mark.parametrize("name", ["huge-header", "truncated", "metadata-not-json", "metadata-a-list",
                                  "classes-huge"])
def test_quantize_refuses_a_broken_float_checkpoint(tmp_path, name):
    from qrobust.train.qat import quantize

    path = BROKEN[name][0](tmp_path / f"{name}.safetensors")
    with pytest.raises(QrobustError) as e:
        quantize(str(path), "lsq", 4, str(tmp_path / "no-data"), str(tmp_path / "q"))
    one_line_error(e.value, path)


# --------------------------------------------------------------------------- the training state train resumes from

def _state(path: Path, meta) -> Path:
    from qrobust.train.state import META_STATE

    save_file({"model/w": torch.zeros(2)}, str(path), metadata={META_STATE: meta if isinstance(meta, str)
                                                                 else json.dumps(meta)})
    return path


@pytest.mark.parametrize("make", [
    lambda p, m: pickle_file("zip", p, m),
    lambda p, m: pickle_file("legacy", p, m),
    lambda p, m: BROKEN["truncated"][0](p),
    lambda p, m: BROKEN["huge-header"][0](p),
    lambda p, m: _state(p, "{not json"),
    lambda p, m: save_file({"w": torch.zeros(1)}, str(p)) or p,  # no training-state metadata at all
    lambda p, m: _state(p, {"schema": "qrobust.train_state/999"}),
], ids=["pickle-zip", "pickle-legacy", "truncated", "huge-header", "bad-json", "no-metadata", "other-schema"])
def test_training_state_is_read_without_unpickling(tmp_path, make):
    from qrobust.train.recipes import TrainError
    from qrobust.train.state import STATE_NAME, read_state

    marker = tmp_path / "pwned"
    path = make(tmp_path / STATE_NAME, marker)
    with pytest.raises(TrainError) as e:
        read_state(path)
    one_line_error(e.value, path)
    assert not marker.exists()


def test_training_state_whose_metadata_is_not_an_object(tmp_path):
    from qrobust.train.recipes import TrainError
    from qrobust.train.state import STATE_NAME, read_state

    path = _state(tmp_path / STATE_NAME, [1, 2, 3])
    with pytest.raises(TrainError) as e:
        read_state(path)
    one_line_error(e.value, path)
