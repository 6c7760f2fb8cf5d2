"""The command line, the shard writer, and the installed package layout."""
from __future__ import annotations

import importlib.metadata
import io
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import photo_crop
from qrobust.generate.writer import ShardFile, encode_image
from qrobust.cli import build_parser, main
from qrobust.shared.shards import shard_summary
from qrobust.shared.registry import Registry, UnknownNameError

COMMANDS = ("generate", "verify", "score", "report", "train", "quantize", "ls", "demo")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_ends_with_a_runnable_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    examples = lines[lines.index("example:") + 1:]
    assert examples, lines
    for line in examples:  # one or more, each a command whose arguments parse
        assert line.strip().startswith(f"qrobust {command}"), line
        build_parser().parse_args(shlex.split(line, comments=True)[1:])


def test_help_is_fast_and_imports_no_program():
    code = ("import sys; from qrobust.cli import build_parser; build_parser(); "
            "print(any(m.startswith(('qrobust.generate', 'qrobust.score', 'numpy', 'torch')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_ls(capsys):
    assert main(["ls", "corruptions", "glass*"]) == 0
    assert capsys.readouterr().out.split() == ["glass_blur"]
    assert main(["ls", "variants", "natural/fog-*", "--suite", "demo"]) == 0
    assert len(capsys.readouterr().out.split()) == 5
    assert main(["ls", "models", "tiny*"]) == 0
    assert capsys.readouterr().out.split() == ["tiny_cnn", "tiny_resnet"]
    assert main(["ls", "suites"]) == 0
    assert {"robustmq", "demo"} <= set(capsys.readouterr().out.split())


def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main(["-q", "generate", "--suite", "robustmqq", "--source", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qrobust generate: error: unknown suite 'robustmqq'") and err.count("\n") == 1
    assert main(["-q", "verify", str(tmp_path)]) == 2
    assert "manifest.json not found" in capsys.readouterr().err


def test_registry_suggests_close_names():
    r = Registry("thing")
    r.add("glass_blur", 1)
    with pytest.raises(UnknownNameError, match="Did you mean glass_blur"):
        r.get("glas_blur")
    with pytest.raises(ValueError, match="already registered"):
        r.add("glass_blur", 2)


def test_shards_are_reproducible_and_published_atomically(tmp_path):
    image = photo_crop("astronaut", 64)
    paths = []
    for run in range(2):
        path = tmp_path / f"r{run}" / "v-000000.tar"
        shard = ShardFile(path)
        assert shard.partial.exists() and not path.exists()
        for i, key in enumerate(("a", "b")):
            shard.add(key, i, *encode_image(image, {"format": "png"}))
        summary = shard.publish()
        assert path.exists() and not shard.partial.exists()
        assert summary == shard_summary(path) and summary["count"] == 2
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_failed_shard_leaves_nothing(tmp_path):
    path = tmp_path / "v-000000.tar"
    with pytest.raises(ValueError, match="increasing key order"):
        with ShardFile(path) as shard:
            shard.add("b", 0, "png", b"x")
            shard.add("a", 0, "png", b"x")
    assert list(tmp_path.iterdir()) == []


def test_encodings():
    image = photo_crop("coffee", 64)
    ext, png = encode_image(image, {"format": "png"})
    assert ext == "png" and np.array_equal(np.asarray(Image.open(io.BytesIO(png))), image)
    ext, jpg = encode_image(image, {"format": "jpg", "quality": 85})
    reference = io.BytesIO()
    Image.fromarray(image).save(reference, format="JPEG", quality=85, optimize=True)  # how ImageNet-C was saved
    assert ext == "jpg" and jpg == reference.getvalue()


def test_installed_layout_has_nothing_at_the_top_of_site_packages():
    files = importlib.metadata.files("qrobust") or []
    tops = {f.parts[0] for f in files}
    assert not tops & {"generate", "score", "shared", "suites", "tests"}
    import qrobust.generate
    import qrobust.score
    import qrobust.shared

    assert qrobust.shared.__name__ == "qrobust.shared"
