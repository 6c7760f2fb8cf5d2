"""Rendering one (variant, sample): from the source file to the pixels to store.

A :class:`SampleContext` decodes a source file once and derives the clean
geometries lazily, so the variants of one group (e.g. the five severities of a
corruption) share the decode and the resize. Each noise family registers a
renderer ``render(variant, ctx, seed) -> uint8 (H, W, 3)``.
"""
from __future__ import annotations

from functools import cached_property
from typing import Callable

import numpy as np

from qrobust.generate import natural
from qrobust.shared import preprocess
from qrobust.shared.registry import Registry
from qrobust.shared.sources import SourceSample, load_rgb
from qrobust.shared.spec import SpecError, Suite, Variant


class SampleContext:
    """One source sample with its decoded image and clean crops, computed on first use."""

    def __init__(self, sample: SourceSample, suite: Suite):
        self.sample = sample
        self.suite = suite

    @cached_property
    def rgb(self):
        return load_rgb(self.sample.path)

    @cached_property
    def onecrop(self) -> np.ndarray:
        return preprocess.onecrop(self.rgb, self.suite.resize, self.suite.crop)


Renderer = Callable[[Variant, SampleContext, int], np.ndarray]
RENDERERS: Registry[Renderer] = Registry("noise family")


@RENDERERS.register("clean")
def render_clean(variant: Variant, ctx: SampleContext, seed: int) -> np.ndarray:
    if variant.name == "onecrop":
        return ctx.onecrop
    raise ValueError(f"unknown clean variant {variant.name!r}")


@RENDERERS.register("natural")
def render_natural(variant: Variant, ctx: SampleContext, seed: int) -> np.ndarray:
    return natural.corrupt(ctx.onecrop, variant.params["corruption"], variant.params["severity"], seed)


def check_renderable(variant: Variant, suite: Suite) -> None:
    """Fail early (before any work) on a variant no renderer can make, e.g. a misspelled
    corruption or a crop too small for the reference corruptions."""
    RENDERERS.get(variant.family)
    if variant.family == "natural":
        natural.CORRUPTIONS.get(variant.params["corruption"])
        if suite.crop < natural.MIN_SIDE:
            raise SpecError(f"[geometry] crop {suite.crop} is below {natural.MIN_SIDE} px, "
                            "the smallest image the natural corruptions accept")
