"""The architectures qrobust knows, one definition each, and the wrapper that makes a model take [0, 1] RGB.

Every registered architecture is an :class:`ArchDef`: how to build it, its
label in tables and figures, whether torchvision publishes weights for it
(``arch:WEIGHTS_NAME``), and its quantization-aware fine-tuning settings
(MQBench's "academic" recipes, which the training recipes read). The small
test architectures (``tiny_cnn``, ``tiny_resnet``) live in the same registry,
so the tests run the real code paths.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock

from qrobust.shared.checkpoints import ModelError
from qrobust.shared.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchDef:
    """One architecture: ``build(num_classes) -> nn.Module`` (taking normalized inputs) and what other
    modules ask about it."""

    name: str
    build: Callable[[int], nn.Module]
    label: str                      # as the paper's tables name it
    torchvision: bool = False       # torchvision publishes ImageNet weights for it (arch:WEIGHTS_NAME)
    tiny: bool = False              # a small test architecture: the demo's training recipes
    qat_lr: float = 0.004           # peak learning rate of quantization-aware fine-tuning
    qat_weight_decay: float = 1e-4
    qat_batch_size: int = 512


ARCHITECTURES: Registry[ArchDef] = Registry("architecture")


def register(name: str, label: str, **settings) -> Callable:
    """Register the decorated builder as architecture ``name`` (see :class:`ArchDef` for ``settings``)."""
    def decorate(build):
        ARCHITECTURES.add(name, ArchDef(name, build, label, **settings))
        return build
    return decorate


class Normalized(nn.Module):
    """``net((x - mean) / std)``: the wrapper that makes a model take [0, 1] RGB.

    mean/std are non-persistent buffers: they follow ``.to(device)`` but stay out
    of the state dict, which is the inner net's alone (``net.*``).
    """

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@register("resnet18", "ResNet18", torchvision=True)
def resnet18(num_classes: int) -> nn.Module:
    return tvm.resnet18(weights=None, num_classes=num_classes)


@register("resnet50", "ResNet50", torchvision=True, qat_batch_size=256)
def resnet50(num_classes: int) -> nn.Module:
    return tvm.resnet50(weights=None, num_classes=num_classes)


@register("regnetx_600mf", "RegNetX600M")  # torchvision has no RegNetX-600MF weights
def regnetx_600mf(num_classes: int) -> nn.Module:
    """pycls RegNetX-600MF (6,196,040 parameters at 1000 classes; torchvision has no builder for it)."""
    params = tvm.regnet.BlockParams.from_init_params(depth=16, w_0=48, w_a=36.97, w_m=2.24, group_width=24)
    return tvm.RegNet(params, num_classes=num_classes)


@register("mobilenet_v2", "MobileNetV2", torchvision=True, qat_lr=0.01, qat_weight_decay=1e-5)
def mobilenet_v2(num_classes: int) -> nn.Module:
    return tvm.mobilenet_v2(weights=None, num_classes=num_classes)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@register("tiny_cnn", "tiny_cnn", tiny=True)
def tiny_cnn(num_classes: int) -> nn.Module:
    """Three stride-2 conv+BN+ReLU layers (16/32/64), global pool, linear: ~24k parameters + 65 per class."""
    return nn.Sequential(_conv_bn(3, 16, 2), _conv_bn(16, 32, 2), _conv_bn(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


class TinyResNet(nn.Module):
    """A stride-2 stem and one torchvision BasicBlock per stage (widths 16/32/64)."""

    def __init__(self, num_classes: int, widths=(16, 32, 64)):
        super().__init__()
        self.stem = _conv_bn(3, widths[0], 2)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and cin == w else nn.Sequential(
                nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            blocks.append(BasicBlock(cin, w, stride, down))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


ARCHITECTURES.add("tiny_resnet", ArchDef("tiny_resnet", TinyResNet, "tiny_resnet", tiny=True))


_REGNET_PARTS = {"conv1.conv": "f.a.0", "conv1.bn": "f.a.1", "conv2.conv": "f.b.0", "conv2.bn": "f.b.1",
                 "conv3.conv": "f.c.0", "conv3.bn": "f.c.1", "downsample.conv": "proj.0", "downsample.bn": "proj.1",
                 # pycls's own names for the same layers
                 "f.a_bn": "f.a.1", "f.b_bn": "f.b.1", "f.c_bn": "f.c.1", "f.a": "f.a.0", "f.b": "f.b.0",
                 "f.c": "f.c.0", "proj": "proj.0", "bn": "proj.1"}


def regnet_from_pycls(sd: dict) -> dict:
    """Rename a timm ``regnetx_006`` or pycls RegNetX state dict to torchvision's RegNet names.

    stem.conv/bn -> stem.0/1; s{i}.b{j} -> trunk_output.block{i}.block{i}-{j-1}; conv1/2/3 (timm) or
    f.a/b/c (pycls) -> f.a/b/c.0 with their norms -> .1; downsample (timm) or proj (pycls) -> proj.0/1;
    head.fc -> fc. Keys already in torchvision's names pass unchanged.
    """
    out = {}
    for key, value in sd.items():
        new = key.replace("stem.conv.", "stem.0.").replace("stem.bn.", "stem.1.").replace("head.fc.", "fc.")
        m = re.match(r"s(\d+)\.b(\d+)\.(.+)\.([^.]+)$", new)
        if m:
            stage, block, part, leaf = m.groups()
            part = _REGNET_PARTS.get(part, part)
            new = f"trunk_output.block{stage}.block{stage}-{int(block) - 1}.{part}.{leaf}"
        out[new] = value
    return out


def torchvision_weights(arch: str, name: str, num_classes: int | None):
    """torchvision's weights enum member ``name`` for ``arch``, and its number of classes (one-line
    :class:`~qrobust.shared.checkpoints.ModelError` for an architecture without published weights, an unknown
    name or another number of classes)."""
    published = [n for n in ARCHITECTURES if ARCHITECTURES.get(n).torchvision]
    if arch not in published:
        raise ModelError(f"torchvision publishes no weights for {arch!r} (it has {', '.join(published)})")
    enum = tvm.get_model_weights(arch)
    short = name.removeprefix(enum.__name__ + ".")
    if short not in enum.__members__:  # torchvision itself answers a bare KeyError('FOO')
        close = difflib.get_close_matches(short, enum.__members__, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown torchvision weights {name!r} for {arch}.{hint} "
                         f"Available: {', '.join(enum.__members__)}")
    weights = enum[short]
    classes = len(weights.meta["categories"])
    if num_classes not in (None, classes):
        raise ModelError(f"{enum.__name__}.{weights.name} has {classes} classes, not {num_classes}")
    return weights, classes
