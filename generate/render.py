"""Rendering one (variant, sample): from the source file to the pixels to store.

A :class:`SampleContext` reads a source file once and derives the decoded image
and the clean geometries lazily, so the variants of one group (e.g. the five
severities of a corruption) share the decode and the resize. Each noise family
registers a renderer ``render(variant, ctx, seed)`` returning uint8 (H, W, 3)
pixels, or (T, H, W, 3) frames for a sequence.
"""
from __future__ import annotations

from functools import cached_property
from typing import Callable

import numpy as np

from qrobust.generate import natural, sequences, systematic
from qrobust.shared import preprocess
from qrobust.shared.registry import Registry
from qrobust.shared.sources import BadImage, SourceSample, decode_rgb
from qrobust.shared.suites import SpecError, Suite, Variant
from qrobust.shared.video import check_encoder


class SampleContext:
    """One source sample with its decoded image and clean crops, computed on first use."""

    def __init__(self, sample: SourceSample, suite: Suite):
        self.sample = sample
        self.suite = suite

    @cached_property
    def raw(self) -> bytes:
        """The source file's bytes, untouched (the systematic family decodes them itself)."""
        try:
            with open(self.sample.path, "rb") as f:
                return f.read()
        except OSError as e:
            raise BadImage(f"cannot read: {e.strerror or e}") from None

    @cached_property
    def rgb(self):
        return decode_rgb(self.raw)

    @cached_property
    def decodes(self) -> dict:
        """Decoded arrays by systematic decoder name (filled by :func:`systematic.decoded`)."""
        return {"pil": np.asarray(self.rgb)}

    @cached_property
    def resized(self):
        """Shorter side resized to the suite's ``resize`` (the input of the sequences)."""
        return preprocess.resize_shorter(self.rgb, self.suite.resize)

    @cached_property
    def onecrop(self) -> np.ndarray:
        return np.asarray(preprocess.center_crop(self.resized, self.suite.crop)).copy()


Renderer = Callable[[Variant, SampleContext, int], np.ndarray]
RENDERERS: Registry[Renderer] = Registry("noise family")


@RENDERERS.register("clean")
def render_clean(variant: Variant, ctx: SampleContext, seed: int) -> np.ndarray:
    if variant.name == "onecrop":
        return ctx.onecrop
    if variant.name == "square":  # the systematic family's reference: Pillow decode, bilinear square resize
        return systematic.square_crop(systematic.decoded(ctx.decodes, ctx.raw, "pil"), "pil-bilinear",
                                      ctx.suite.resize, ctx.suite.crop)
    raise ValueError(f"unknown clean variant {variant.name!r}")


@RENDERERS.register("natural")
def render_natural(variant: Variant, ctx: SampleContext, seed: int) -> np.ndarray:
    return natural.corrupt(ctx.onecrop, variant.params["corruption"], variant.params["severity"], seed)


@RENDERERS.register("sequence")
def render_sequence(variant: Variant, ctx: SampleContext, seed: int) -> np.ndarray:
    return sequences.render_sequence(ctx.resized, ctx.suite.crop, variant.params["perturbation"],
                                     variant.params["difficulty"], seed)


@RENDERERS.register("systematic")
def render_systematic(variant: Variant, ctx: SampleContext, seed: int) -> np.ndarray:
    image = systematic.decoded(ctx.decodes, ctx.raw, variant.params["decoder"])
    return systematic.square_crop(image, variant.params["resize"], ctx.suite.resize, ctx.suite.crop)


def check_sample(ctx: SampleContext) -> None:
    """Everything the suite needs from one source must work, or the sample is rejected
    from every variant (so all variants keep the same samples, whatever --only selects):
    the Pillow decode and crop, and each systematic decoder the suite lists."""
    ctx.onecrop
    for decoder in ctx.suite.spec.get("systematic", {}).get("decoders", []):
        systematic.decoded(ctx.decodes, ctx.raw, decoder)


def check_renderable(variant: Variant, suite: Suite) -> None:
    """Fail early (before any work) on a variant no renderer can make, e.g. a misspelled
    corruption or a crop too small for the reference corruptions."""
    RENDERERS.get(variant.family)
    if variant.family == "natural":
        natural.CORRUPTIONS.get(variant.params["corruption"])
        if suite.crop < natural.MIN_SIDE:
            raise SpecError(f"[geometry] crop {suite.crop} is below {natural.MIN_SIDE} px, "
                            "the smallest image the natural corruptions accept")
    if variant.family == "sequence":
        check_encoder(variant.encoding["format"])
        if suite.crop < sequences.MIN_SIDE:
            raise SpecError(f"[geometry] crop {suite.crop} is below {sequences.MIN_SIDE} px: the sequences' "
                            "motion blurs (up to 29 px wide) would lose kernel taps at the borders")
