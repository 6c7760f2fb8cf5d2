"""The catalogue of the benchmark's model-independent noise: one definition per corruption, perturbation and
systematic variant.

Each definition carries what the rest of qrobust asks about the item: its
label in tables and figures, its group, whether it belongs to the benchmark's
own set (the means run over those only), and for a perturbation sequence its
frame count, difficulties, and whether it is a noise sequence. Suites
(:mod:`qrobust.shared.suites`) build their variants from it, the scorer's
summary and the report read it, and the generator registers one
implementation per definition (:mod:`qrobust.generate.natural`,
``sequences``, ``systematic``; a test checks that the two agree).

The catalogue lives in ``shared`` rather than next to the implementations
because both programs need it and the scorer never imports the generator:
the definition is data both read, the implementation is the generator's.

Sources: ImageNet-C and ImageNet-P (Hendrycks & Dietterich, ICLR 2019;
github.com/hendrycks/robustness), ImageNet-S (RobustART,
github.com/DIG-Beihang/RobustART), RobustMQ's Tables 6, 8 and 10 for labels.
"""
from __future__ import annotations

from dataclasses import dataclass

from qrobust.shared.registry import Registry


@dataclass(frozen=True)
class CorruptionDef:
    """An ImageNet-C corruption (five severities)."""

    name: str
    label: str        # as the paper's Table 6 heads its column
    group: str        # noise, blur, weather, digital (ImageNet-C's grouping), or held-out
    benchmark: bool   # one of the 15 test corruptions that mNR, NCI and mCE average


@dataclass(frozen=True)
class PerturbationDef:
    """An ImageNet-P perturbation sequence."""

    name: str
    label: str
    group: str
    benchmark: bool   # one of the 10 test perturbations that mFP averages
    noise: bool       # compared with its clean frame 0, and encoded with -tune grain (ImageNet-P's rule)
    frames: int
    difficulties: tuple[int, ...]  # separate videos per difficulty (noise); the others use frame strides


@dataclass(frozen=True)
class SystematicDef:
    """An ImageNet-S variant: a decoder with the Pillow bilinear square resize, or a resize after Pillow's
    decode."""

    name: str         # "decode-ffmpeg", "resize-opencv-area"
    label: str
    decoder: str
    resize: str


CORRUPTIONS: Registry[CorruptionDef] = Registry("corruption")
PERTURBATIONS: Registry[PerturbationDef] = Registry("sequence perturbation")
SYSTEMATIC: Registry[SystematicDef] = Registry("systematic variant")

for _name, _label, _group in (
        ("gaussian_noise", "Gauss", "noise"), ("shot_noise", "Shot", "noise"), ("impulse_noise", "Impulse", "noise"),
        ("defocus_blur", "Defocus", "blur"), ("glass_blur", "Glass", "blur"), ("motion_blur", "Motion", "blur"),
        ("zoom_blur", "Zoom", "blur"), ("snow", "Snow", "weather"), ("frost", "Frost", "weather"),
        ("fog", "Fog", "weather"), ("brightness", "Bright", "weather"), ("contrast", "Contrast", "digital"),
        ("elastic_transform", "Elastic", "digital"), ("pixelate", "Pixel", "digital"),
        ("jpeg_compression", "JPEG", "digital")):
    CORRUPTIONS.add(_name, CorruptionDef(_name, _label, _group, benchmark=True))
# ImageNet-C's held-out corruptions: in the released files, never in mNR or mCE
for _name, _label in (("speckle_noise", "Speckle noise"), ("gaussian_blur", "Gaussian blur"), ("spatter", "Spatter"),
                      ("saturate", "Saturate")):
    CORRUPTIONS.add(_name, CorruptionDef(_name, _label, "held-out", benchmark=False))

for _name, _label, _group, _frames in (
        ("gaussian_noise", "Gauss", "noise", 31), ("shot_noise", "Shot", "noise", 31),
        ("motion_blur", "Motion", "blur", 31), ("zoom_blur", "Zoom", "blur", 31), ("snow", "Snow", "weather", 31),
        ("brightness", "Bright", "weather", 31), ("translate", "Translate", "digital", 41),
        ("rotate", "Rotate", "digital", 31), ("tilt", "Tilt", "digital", 31), ("scale", "Scale", "digital", 31)):
    _noise = _group == "noise"
    PERTURBATIONS.add(_name, PerturbationDef(_name, _label, _group, True, _noise, _frames,
                                             (1, 2, 3) if _noise else (1,)))
# ImageNet-P's validation perturbations: released, never in mFP
for _name, _label, _noise in (("speckle_noise", "Speckle noise", True), ("gaussian_blur", "Gaussian blur", False),
                              ("spatter", "Spatter", False), ("shear", "Shear", False)):
    PERTURBATIONS.add(_name, PerturbationDef(_name, _label, "validation", False, _noise, 31,
                                             (1, 2, 3) if _noise else (1,)))

DECODER_LABELS = {"pil": "PIL", "opencv": "OpenCV", "ffmpeg": "FFmpeg"}
for _decoder, _label in DECODER_LABELS.items():
    SYSTEMATIC.add(f"decode-{_decoder}", SystematicDef(f"decode-{_decoder}", f"Decode {_label}", _decoder,
                                                       "pil-bilinear"))
for _library in ("pil", "opencv"):
    for _mode in (("bilinear", "nearest", "box", "hamming", "cubic", "lanczos") if _library == "pil"
                  else ("bilinear", "nearest", "area", "cubic", "lanczos")):
        _name = f"resize-{_library}-{_mode}"
        SYSTEMATIC.add(_name, SystematicDef(_name, f"{DECODER_LABELS[_library]} {_mode}", "pil",
                                            f"{_library}-{_mode}"))


def is_noise_sequence(perturbation: str) -> bool:
    """Whether a perturbation is a noise sequence: its definition's flag; for a name the catalogue does not
    know, ImageNet-P's ``test.py`` rule (the name says "noise")."""
    known = PERTURBATIONS.find(perturbation)
    return known.noise if known is not None else "noise" in perturbation


def label(name: str) -> str | None:
    """A corruption's, perturbation's or systematic variant's label (None if the catalogue has no such name)."""
    for registry in (CORRUPTIONS, PERTURBATIONS, SYSTEMATIC):
        item = registry.find(name)
        if item is not None:
            return item.label
    return None


# the benchmark's own sets, in the paper's order
BENCHMARK_CORRUPTIONS = tuple(n for n in CORRUPTIONS.in_order() if CORRUPTIONS.get(n).benchmark)
SEQUENCE_PERTURBATIONS = tuple(n for n in PERTURBATIONS.in_order() if PERTURBATIONS.get(n).benchmark)
SYSTEMATIC_VARIANTS = tuple(SYSTEMATIC.in_order())
SYSTEMATIC_DECODERS = tuple(SYSTEMATIC.get(n).decoder for n in SYSTEMATIC_VARIANTS if n.startswith("decode-"))
SYSTEMATIC_RESIZES = tuple(SYSTEMATIC.get(n).resize for n in SYSTEMATIC_VARIANTS if n.startswith("resize-"))
