"""Test helpers: real photographs (shipped with scikit-image), image folders
made from them, and small suites so generation tests run in seconds."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from qrobust.shared.demo_data import photo


def photo_crop(name: str, size: int) -> np.ndarray:
    """A real photo, shorter side resized to ``size`` and center-cropped square (uint8 RGB)."""
    from qrobust.shared.preprocess import onecrop

    return onecrop(photo(name).convert("RGB"), size, size)


def save_jpeg(path: Path, image: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kw)
    path.write_bytes(buf.getvalue())
    return path


def make_class_folder(root: Path, per_class: int = 2, size: int = 80,
                      names=("astronaut", "chelsea", "coffee")) -> Path:
    """An ImageFolder of real photo crops: ``root/<photo>/<photo>_<n>.jpg``, non-square, 4:2:0."""
    for name in names:
        full = photo(name).convert("RGB")
        w, h = full.size
        for n in range(per_class):
            box = (n * w // 10, 0, w - n * w // 12, h)  # different non-square crops
            crop = full.crop(box)
            crop = crop.resize((size * crop.width // crop.height, size), Image.BILINEAR)
            save_jpeg(root / name / f"{name}_{n}.jpg", crop)
    return root


SMALL_SUITE = """
name = "small"
seed = 7
[geometry]
resize = 40
crop = 36
[shards]
samples = {shard}
[clean]
variants = ["onecrop", "square"]
encoding = "png"
[natural]
corruptions = {corruptions}
severities = {severities}
encoding = "jpg"
jpeg_quality = 85
[sequence]
perturbations = ["gaussian_noise", "rotate"]
encoding = "lossless"
[systematic]
decoders = ["ffmpeg"]
resizes = ["opencv-area"]
"""


def write_suite(path: Path, corruptions=("gaussian_noise", "impulse_noise", "fog"), severities=(1, 3),
                shard: int = 2) -> Path:
    path.write_text(SMALL_SUITE.format(shard=shard, corruptions=list(corruptions), severities=list(severities))
                    .replace("'", '"'))
    return path




def small_corpus(tmp: Path, only: str, severities=(1,), per_class: int = 2, shard: int = 2) -> Path:
    """A corpus of 3 * ``per_class`` real photos (3 classes), ``shard`` samples per shard, of the variants ``only``
    selects."""
    from qrobust.cli import main

    src = make_class_folder(tmp / "src", per_class=per_class)
    suite = write_suite(tmp / "small.toml", corruptions=("fog",), severities=severities, shard=shard)
    assert main(["-q", "generate", "--suite", str(suite), "--source", str(src), "--out", str(tmp / "corpus"),
                 "--workers", "2", "--only", only]) == 0
    return tmp / "corpus"


def tar_members(path: Path) -> list:
    """(TarInfo, bytes) of every member of a tar, in order."""
    import tarfile

    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar]


def fitted_checkpoint(corpus: Path, path: Path, arch: str = "tiny_cnn", steps: int = 30) -> Path:
    """A checkpoint of ``arch`` fitted (Adam, seeded) to the corpus's ``clean/onecrop`` images, saved at ``path``."""
    import torch

    from qrobust.score.run import Corpus, plan_units
    from qrobust.score.stream import read_unit
    from qrobust.shared.models import ModelSpec, build_model, save_checkpoint

    source = Corpus(str(corpus))
    units, _ = plan_units(source.manifest, ["clean/onecrop"], None)
    pieces = [p for u in units for p in read_unit(source, u, True, 64)]
    x = torch.from_numpy(np.concatenate([p.pixels for p in pieces])).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(np.concatenate([p.labels for p in pieces])).long()
    spec = ModelSpec(arch=arch, num_classes=len(source.manifest["classes"]))
    torch.manual_seed(0)
    model = build_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    save_checkpoint(model, spec, path)
    return path


MEAN_MODEL = "helpers:mean_model"  # as `--model` names it (tests/ is on the path of in-process runs)


def mean_model():
    """A model whose logits are the three channel means: no weights to fit, differentiable (for attacks), and
    predictions that depend on every pixel read, so two reads of a corpus can be compared through it."""
    import torch

    class MeanModel(torch.nn.Module):
        qrobust_normalizes_input = True

        def forward(self, x):
            return x.mean(dim=(2, 3)) * torch.tensor([1.0, 1.1, 1.2], device=x.device)

    return MeanModel()
