"""Geometry of the clean references, and suites as data."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qrobust.shared.demo_data import photo
from qrobust.shared.preprocess import onecrop
from qrobust.shared.suites import SpecError, load_suite, packaged_suites


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 257), (256, 256), (1000, 999)])
def test_onecrop_equals_torchvision(size):
    transforms = pytest.importorskip("torchvision.transforms")
    image = photo("coffee").convert("RGB").resize(size, Image.BILINEAR)
    expected = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(image)
    np.testing.assert_array_equal(onecrop(image, 256, 224), np.asarray(expected))


def test_packaged_suites():
    assert {"robustmq", "demo"} <= set(packaged_suites())
    robustmq = load_suite("robustmq")
    ids = [v.id for v in robustmq.variants]
    assert len(ids) == 2 + 75 + 10 + 14 and ids[:2] == ["clean/onecrop", "clean/square"]
    assert {"natural/glass_blur-3", "sequence/translate", "systematic/decode-ffmpeg",
            "systematic/resize-opencv-area"} <= set(ids)
    assert (robustmq.resize, robustmq.crop) == (256, 224)
    demo = load_suite("demo")
    assert [v.id for v in demo.variants] == ids and demo.crop < 224
    jpg = robustmq.select(["natural/fog-1"])[0].encoding
    assert jpg == {"format": "jpg", "quality": 85}


def test_only_globs_and_overrides():
    suite = load_suite("robustmq", encoding="png", seed=5)
    assert [v.id for v in suite.select(["natural/glass_blur-*"])] == [f"natural/glass_blur-{s}" for s in range(1, 6)]
    assert len(suite.select(["clean/*", "natural/*-5"])) == 17
    assert suite.seed == 5 and suite.select(["natural/fog-2"])[0].encoding == {"format": "png"}
    with pytest.raises(SpecError, match="matches no variant.*did you mean 'natural/glass_blur-\\*'"):
        suite.select(["glass_blur-*"])


@pytest.mark.parametrize("text, message", [
    ("name = 'x'\n[geometry]\nresize = 10\ncrop = 20\n[clean]\nvariants=['onecrop']", "crop 20 is larger"),
    ("name = 'x'\ncolour = 1\n", "unknown keys colour"),
    ("name = 'x'\n[geometry]\nresize = 64\ncrop = 32\n[natural]\ncorruptions=['fog']\nseverities=[6]", "severities"),
    ("name = [", "not valid TOML"),
    ("[geometry]\nresize = 64\ncrop = 32\n[natural]\ncorruptions=['fog']\nencoding='webp'", "encoding must be"),
])
def test_malformed_suites(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message):
        load_suite(str(path))
    with pytest.raises(SpecError, match="unknown suite 'nope'"):
        load_suite("nope")


def test_sequence_and_systematic_tables():
    suite = load_suite("robustmq", sequence_encoding="lossless")
    noise = suite.select(["sequence/gaussian_noise"])[0]
    assert noise.params == {"perturbation": "gaussian_noise", "difficulty": 1, "frames": 31, "noise": True}
    assert noise.encoding == {"format": "lossless"}
    decode = suite.select(["systematic/decode-opencv"])[0]
    assert decode.params == {"decoder": "opencv", "resize": "pil-bilinear"}
    assert suite.select(["systematic/resize-opencv-area"])[0].params == {"decoder": "pil", "resize": "opencv-area"}


def test_optional_difficulties_only_for_noise_sequences(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[geometry]\nresize = 64\ncrop = 56\n[sequence]\nperturbations = ["gaussian_noise", "rotate"]\n'
                    'difficulties = [1, 2, 3]\n')
    assert [v.id for v in load_suite(str(path)).variants] == [
        "sequence/gaussian_noise", "sequence/gaussian_noise_2", "sequence/gaussian_noise_3", "sequence/rotate"]
    path.write_text('[geometry]\nresize = 64\ncrop = 56\n[systematic]\ndecoders = ["gimp"]\nresizes = []\n')
    with pytest.raises(SpecError, match="unknown decoders: gimp"):
        load_suite(str(path))
