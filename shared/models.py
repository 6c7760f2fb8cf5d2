"""Models: architectures, the [0, 1] input convention, and loading by spec.

Every model qrobust scores takes RGB in [0, 1], shape (N, 3, H, W), and
normalizes inside itself, so attack budgets are in pixel units. qrobust's
registered architectures (and torchvision's weights) are wrapped in
:class:`Normalized` with ImageNet mean/std. A user's ``package.module:callable``
model gets the [0, 1] images as they are (``normalize="none"``, the default: it
normalizes itself, as RobustBench's models do) unless ``normalize="imagenet"``
asks qrobust to wrap it; the choice is part of the :class:`ModelSpec`, of a
checkpoint and of a results folder's identity. A model is named by a
:class:`ModelSpec`; :func:`load_model` accepts

* ``ckpt.safetensors`` -- a qrobust checkpoint (the spec is in its metadata);
* ``resnet18`` with ``weights=FILE`` -- a torchvision-style state dict
  (``.pt``/``.pth`` read with ``weights_only=True``, or ``.safetensors``);
* ``resnet18:IMAGENET1K_V1`` -- torchvision's published weights (downloads);
* ``package.module:callable`` -- any callable returning an ``nn.Module``
  (with ``weights=FILE``: a state dict, or a qrobust checkpoint of that callable);
* ``resnet18`` alone -- random initialisation (seed 0), with a warning.

Loading a file never runs code from it: ``.pt``/``.pth`` files go through
``torch.load(weights_only=True)`` (tensors and plain containers only), and a
checkpoint's metadata may name a registered architecture but not a callable
(a ``module:callable`` in a file's metadata is what a pickle's GLOBAL opcode
is; the user names the callable instead). Every malformed, hostile or
mismatched file is a one-line :class:`ModelError` that names it.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from qrobust.shared.architectures import ARCHITECTURES, Normalized, regnet_from_pycls, torchvision_weights
from qrobust.shared.checkpoints import (ModelError, one_line, read_checkpoint_metadata, read_state_dict,
                                        write_safetensors)
from qrobust.shared.errors import QrobustError
from qrobust.shared.files import file_sha256

log = logging.getLogger("qrobust.models")

SOURCES = ("init", "checkpoint", "state_dict", "torchvision", "callable", "memory")
# what qrobust applies to [0, 1] RGB before a model's own forward: ImageNet mean/std, or nothing
NORMALIZATIONS = ("imagenet", "none")
META_MODEL, META_VERSION = "qrobust.model", "qrobust.version"

MAX_CLASSES = 100_000  # a spec read from a file asking for more (a 10**12-way classifier) is refused, not allocated


@dataclass(frozen=True)
class ModelSpec:
    """What a model is: architecture, classes, quantization and where its weights came from.

    >>> ModelSpec("resnet18", quant={"method": "lsq", "w_bits": 4, "a_bits": 4}).name
    'resnet18-lsq-w4a4'
    """

    arch: str  # a registered architecture, or "package.module:callable" when source == "callable"
    num_classes: int = 1000
    quant: dict | None = field(default=None, hash=False)  # the policy of qrobust.shared.quant.quantize_model
    weights: str | None = None  # a file path or a torchvision weights name
    source: str = "init"
    # what qrobust applies to the [0, 1] images before the net: "imagenet" (mean/std; every registered
    # architecture) or "none" (a callable that normalizes itself). None: a callable's checkpoint written
    # before this was recorded, which is rebuilt as it was then (see build_model).
    normalize: str | None = None

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ModelError(f"model source {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.normalize is not None and self.normalize not in NORMALIZATIONS:
            raise ModelError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, not {self.normalize!r}")
        if not self.is_callable:  # a registered architecture always carries its own ImageNet normalization
            if self.normalize not in (None, "imagenet"):
                raise ModelError(f"{self.arch} is a registered architecture, which normalizes with ImageNet "
                                 f"mean/std inside; normalize={self.normalize!r} applies to module:callable models")
            object.__setattr__(self, "normalize", "imagenet")

    @property
    def is_callable(self) -> bool:
        """Built by a user's ``package.module:callable`` rather than a registered architecture."""
        return ":" in self.arch

    @property
    def name(self) -> str:
        if not self.quant:
            return self.arch
        q = self.quant
        return f"{self.arch}-{q.get('method', 'q')}-w{q.get('w_bits', '?')}a{q.get('a_bits', '?')}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """The spec a dict (read from a file: untrusted) describes; :class:`ModelError` unless every field
        has the right type and a sane value."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or "arch" not in d or set(d) - known:
            extra = sorted(set(d) - known) if isinstance(d, dict) else []
            raise ModelError(f"not a qrobust model spec: {_short(d)}" + (f" (unknown keys {extra})" if extra else ""))
        n = d.get("num_classes", 1000)
        problems = [
            what for what, bad in (
                ("arch must be a non-empty string", not isinstance(d["arch"], str) or not d["arch"].strip()),
                (f"num_classes must be an integer from 1 to {MAX_CLASSES}",
                 not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CLASSES),
                ("quant must be null or an object", d.get("quant") is not None and not isinstance(d["quant"], dict)),
                ("quant.method must be a string", isinstance(d.get("quant"), dict)
                 and not isinstance(d["quant"].get("method", ""), str)),
                ("weights must be null or a string",
                 d.get("weights") is not None and not isinstance(d["weights"], str)),
                (f"source must be one of {', '.join(SOURCES)}", d.get("source", "init") not in SOURCES),
                (f"normalize must be null or one of {', '.join(NORMALIZATIONS)}",
                 d.get("normalize") is not None and d["normalize"] not in NORMALIZATIONS),
            ) if bad]
        if problems:
            raise ModelError(f"not a qrobust model spec ({'; '.join(problems)}): {_short(d)}")
        return cls(**d)


def _short(value, limit: int = 120) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def build_model(spec: ModelSpec | str, num_classes: int | None = None) -> nn.Module:
    """A freshly initialised model for a spec or an architecture name; the same every call (seed 0).

    Registered architectures come wrapped in :class:`Normalized`; a spec whose
    ``arch`` is ``package.module:callable`` is built by that callable and
    wrapped only if ``spec.normalize == "imagenet"``.

    >>> build_model("tiny_cnn", 10)(torch.rand(1, 3, 32, 32)).shape
    torch.Size([1, 10])
    >>> build_model(ModelSpec("tiny_resnet", num_classes=3)).net.fc.out_features
    3
    """
    if isinstance(spec, str):
        spec = ModelSpec(spec, 1000 if num_classes is None else num_classes)
    elif num_classes is not None:
        raise TypeError("build_model: num_classes goes in the ModelSpec")
    if spec.is_callable:  # a callable's spec keeps its "package.module:callable" as arch
        model = _build_callable(spec.arch, spec.num_classes)[0]
        # None: a checkpoint from before the choice was recorded, when a callable was wrapped unless it
        # carried qrobust_normalizes_input; rebuilt the same way, so its weights see what they were trained on
        legacy = spec.normalize is None and not getattr(model, "qrobust_normalizes_input", False)
        if spec.normalize == "imagenet" or legacy:
            model = Normalized(model)
    else:
        builder = ARCHITECTURES.get(spec.arch).build
        with torch.random.fork_rng(devices=[]):  # reproducible init without touching the caller's RNG
            torch.manual_seed(0)
            model = Normalized(builder(spec.num_classes))
    if spec.quant:  # the same module swap as at training time; quantizer state comes with the weights
        from qrobust.shared.quant import QUANT_ARGS, quantize_model

        missing = {"method", "w_bits", "a_bits"} - set(spec.quant)
        if missing:
            raise ModelError(f"{spec.name}: quantization spec lacks {', '.join(sorted(missing))}")
        quantize_model(model, **{k: spec.quant[k] for k in QUANT_ARGS if k in spec.quant})
    return model


def _build_callable(target: str, num_classes: int | None) -> tuple[nn.Module, int]:
    module_name, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        hint = ""
        if "." not in module_name and "/" not in module_name:  # maybe a mistyped architecture
            hint = f" ({ARCHITECTURES.unknown_message(module_name)})"
        raise ModelError(f"cannot load model callable {target!r}: {e}{hint}") from None
    try:  # pass num_classes only to callables that take it
        takes = "num_classes" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = fn(num_classes=num_classes) if num_classes is not None and takes else fn()
    if not isinstance(net, nn.Module):
        raise ModelError(f"{target} returned {type(net).__name__}, not a torch.nn.Module")
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    found = linears[-1].out_features if linears else None  # the spec's best guess: the last Linear's outputs
    if num_classes is not None and found not in (None, num_classes):
        raise ModelError(f"{target} makes a model with {found} classes, not {num_classes}")
    return net, num_classes or found or 1000


def _normalizes_itself(model: nn.Module) -> bool:
    """Whether a model holds a layer that normalizes its input (qrobust's wrapper or torchvision's transform)."""
    from torchvision.transforms import Normalize

    return any(isinstance(m, (Normalized, Normalize)) for m in model.modules())


def _inner(model: nn.Module) -> nn.Module:
    return model.net if isinstance(model, Normalized) else model


def read_checkpoint_spec(path: str | os.PathLike) -> ModelSpec:
    """The :class:`ModelSpec` a qrobust checkpoint records, without building the model.

    :class:`ModelError` (one line, naming the file) when the file is not a
    readable safetensors file, has no ``qrobust.model`` metadata, or records a
    spec that is not valid JSON or not a valid spec.
    """
    meta = read_checkpoint_metadata(path)
    if META_MODEL not in meta:
        raise ModelError(f"{path} is not a qrobust checkpoint (no {META_MODEL!r} metadata): name its "
                         f"architecture and pass the file as weights, e.g. load_model('resnet18', weights=...)")
    try:
        return ModelSpec.from_dict(json.loads(meta[META_MODEL]))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelError(f"{path}: malformed {META_MODEL} metadata (not JSON: {one_line(e)})") from None
    except ModelError as e:
        raise ModelError(f"{path}: malformed {META_MODEL} metadata: {e}") from None


def _load_into(model: nn.Module, sd: dict, what: str) -> None:
    """Load a state dict for the inner net (``net.``/``module.`` prefixes stripped); one-line error on mismatch."""
    net = _inner(model)
    own = net.state_dict()
    for prefix in ("module.", "net.", "module."):  # DataParallel, the wrapper, or both
        # (unless the model's own names start so: a user's model may hold its backbone as `net`)
        if sd and all(k.startswith(prefix) for k in sd) and not all(k.startswith(prefix) for k in own):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if isinstance(net, tvm.RegNet) and "stem.conv.weight" in sd:  # timm / pycls RegNetX weights
        sd = regnet_from_pycls(sd)
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
              if k in own and v.shape != own[k].shape]
    missing = unexpected = []
    if not shapes:  # load_state_dict raises on shapes even when not strict; we report them ourselves
        result = net.load_state_dict(sd, strict=False)  # lets BatchNorm fill num_batches_tracked in old files
        missing, unexpected = result.missing_keys, result.unexpected_keys
    if shapes or missing or unexpected:
        parts = [f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if keys]
        hint = " (a different num_classes?)" if shapes else ""
        raise ModelError(f"state dict does not match {what}: {'; '.join(parts)}{hint}")


def state_digest(model: nn.Module) -> str:
    """sha256 over a built model's state dict (names, dtypes, shapes and bytes, in order): what the model
    computes with, whatever file or code it came from."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def from_module(module: nn.Module, *, num_classes: int | None = None, normalize: str | None = None,
                device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """An ``nn.Module`` built in this process (say, just trained in a notebook) as a scorable model.

    Like a ``module:callable`` model it gets RGB in [0, 1] unless ``normalize="imagenet"``; ``num_classes``
    defaults to its last Linear's outputs. It is moved to ``device`` and put in eval mode (in place).
    """
    if not isinstance(module, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ModelError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, not {normalize!r}")
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    n = num_classes or (linears[-1].out_features if linears else 1000)
    kind = type(module)
    spec = ModelSpec(f"memory:{kind.__module__}.{kind.__qualname__}", n, source="memory",
                     normalize=normalize or "none")
    net = Normalized(module) if spec.normalize == "imagenet" else module
    return net.to(device).eval(), spec


def load_model(spec_string: str, weights: str | os.PathLike | None = None, num_classes: int | None = None,
               device: str | torch.device = "cpu", normalize: str | None = None
               ) -> tuple[nn.Module, ModelSpec, str | None]:
    """Build and load a model; return ``(model in eval mode, spec, sha256 of the weights file or None)``.

    ``normalize`` is the input convention of a ``package.module:callable``
    model: ``"none"`` (the default: the callable's model takes [0, 1] RGB and
    normalizes itself) or ``"imagenet"`` (qrobust applies ImageNet mean/std
    before it). Registered architectures always normalize with ImageNet
    statistics inside; for them only ``None`` or ``"imagenet"`` is accepted. A
    checkpoint's recorded choice wins, and asking for another is an error.

    >>> model, spec, sha = load_model("ckpt.safetensors")  # doctest: +SKIP
    >>> model, spec, sha = load_model("resnet18", weights="resnet18.pth")  # doctest: +SKIP
    >>> model, spec, sha = load_model("mypkg.nets:build", weights="net.pth", normalize="imagenet")  # doctest: +SKIP
    >>> model, spec, _ = load_model("tiny_cnn", num_classes=10)  # random init, with a warning
    >>> spec.source, spec.normalize
    ('init', 'imagenet')

    Raises :class:`ModelError` for missing or unsafe files, mismatched state
    dicts and a ``normalize`` that does not fit the model, and
    :class:`~qrobust.shared.registry.UnknownNameError` for unknown architectures.
    """
    text, path = str(spec_string), Path(spec_string)
    sha = None
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ModelError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, not {normalize!r}")
    if path.is_file() or path.suffix in (".safetensors", ".pt", ".pth", ".bin") or os.sep in text:
        if not path.is_file():
            raise ModelError(f"model file {path} not found")
        if path.suffix != ".safetensors":  # never opened: only safetensors files carry a spec
            raise ModelError(f"{path} is not a qrobust checkpoint (no {META_MODEL!r} metadata): name its "
                             f"architecture and pass the file as weights, e.g. load_model('resnet18', weights=...)")
        read_checkpoint_spec(path)  # a file that is not a checkpoint says so before any other complaint
        if weights is not None:
            raise ModelError(f"{path} is a qrobust checkpoint with its own weights; do not pass weights as well")
        return _load_checkpoint(path, num_classes, device, normalize=normalize)
    elif ":" in text and text.partition(":")[0] not in ARCHITECTURES:
        if weights is not None and _is_checkpoint(Path(weights)):  # the user names the code, the file its spec
            return _load_checkpoint(Path(weights), num_classes, device, callable_named=text, normalize=normalize)
        model, n = _build_callable(text, num_classes)
        spec = ModelSpec(text, n, weights=str(weights) if weights is not None else None, source="callable",
                         normalize=normalize or "none")
        if spec.normalize == "imagenet":
            if _normalizes_itself(model):
                log.warning("%s already holds a normalization layer, and --normalize imagenet normalizes its "
                            "inputs once more: is that meant? (the default, --normalize none, gives it [0, 1] RGB)",
                            text)
            model = Normalized(model)
    elif normalize not in (None, "imagenet"):
        raise ModelError(f"{text} is a registered architecture, which normalizes with ImageNet mean/std inside; "
                         f"--normalize {normalize} applies to module:callable models")
    elif ":" in text:
        arch, _, name = text.partition(":")
        if weights is not None:
            raise ModelError(f"{text} names torchvision weights; do not pass a weights file as well")
        tv_weights, n = torchvision_weights(arch, name, num_classes)
        model = build_model(arch, n)
        # check_hash: torchvision's file names carry a sha256 prefix; weights_only: no pickled code
        _load_into(model, tv_weights.get_state_dict(progress=True, check_hash=True, weights_only=True), arch)
        spec = ModelSpec(arch, n, weights=f"{type(tv_weights).__name__}.{tv_weights.name}", source="torchvision")
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(tv_weights.url)
        sha = file_sha256(cached) if cached.is_file() else None
    else:
        n = 1000 if num_classes is None else num_classes
        model = build_model(text, n)
        if weights is None:
            log.warning("model %s has no weights: randomly initialised (seed 0); its scores mean nothing", text)
        spec = ModelSpec(text, n, weights=None if weights is None else str(weights),
                         source="init" if weights is None else "state_dict")
    if weights is not None and spec.source in ("state_dict", "callable"):
        try:
            _load_into(model, read_state_dict(Path(weights)), f"{spec.arch} ({spec.num_classes} classes)")
        except ModelError as e:
            raise _naming(weights, e) from None
        sha = file_sha256(weights)
    return model.to(device).eval(), spec, sha


def _naming(path, e: Exception) -> ModelError:
    """``e`` as a one-line :class:`ModelError` that starts with the file's name."""
    text = one_line(e)
    return ModelError(text if text.startswith(str(path)) else f"{path}: {text}")


def _is_checkpoint(path: Path) -> bool:
    return path.suffix == ".safetensors" and path.is_file() and META_MODEL in read_checkpoint_metadata(path)


def _load_checkpoint(path: Path, num_classes: int | None, device, callable_named: str | None = None,
                     normalize: str | None = None):
    """Build the model a qrobust checkpoint describes and load its weights (see :func:`load_model`)."""
    saved = read_checkpoint_spec(path)
    if normalize is not None and saved.normalize is None and saved.is_callable:
        saved = dataclasses.replace(saved, normalize=normalize)  # written before the choice was recorded
    if normalize not in (None, saved.normalize):
        raise ModelError(f"{path} records inputs normalized {saved.normalize!r} (the convention its weights were "
                         f"trained with); --normalize {normalize} contradicts it")
    if callable_named is not None and saved.arch != callable_named:
        raise ModelError(f"{path} is a checkpoint of {saved.arch!r}, not of {callable_named!r}")
    if callable_named is None and ":" in saved.arch:
        raise ModelError(f"{path} names the callable {saved.arch!r} as its architecture, and a checkpoint may not "
                         f"choose code to run: if you trust that code, name it yourself, "
                         f"load_model({saved.arch!r}, weights={str(path)!r}) "
                         f"(qrobust score --model {saved.arch} --weights {path})")
    if ":" not in saved.arch and saved.arch not in ARCHITECTURES:
        raise ModelError(f"{path}: {ARCHITECTURES.unknown_message(saved.arch)}")
    if num_classes not in (None, saved.num_classes):
        raise ModelError(f"{path} has {saved.num_classes} classes, not {num_classes}")
    spec = dataclasses.replace(saved, source="checkpoint", weights=str(path))
    try:
        model = build_model(saved)
        _load_into(model, read_state_dict(path), f"{saved.arch} ({saved.num_classes} classes)")
    except (QrobustError, TypeError, ValueError) as e:  # e.g. a quantization spec with bits=3 or method "x"
        raise _naming(path, e) from None
    return model.to(device).eval(), spec, file_sha256(path)


def save_checkpoint(model: nn.Module, spec: ModelSpec, path: str | os.PathLike,
                    extra_metadata: dict | None = None) -> Path:
    """Write the inner net's state dict as a self-describing ``.safetensors`` checkpoint (atomically).

    >>> model, spec, _ = load_model("tiny_cnn", num_classes=10)
    >>> save_checkpoint(model, spec, "/tmp/tiny.safetensors")  # doctest: +SKIP
    """
    from qrobust._version import __version__

    path = Path(path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()}
    if META_MODEL in meta or META_VERSION in meta:
        raise ValueError(f"extra_metadata may not set {META_MODEL!r} or {META_VERSION!r}")
    meta.update({META_MODEL: json.dumps(spec.to_dict(), sort_keys=True), META_VERSION: __version__})
    tensors = {k: v.detach().cpu().contiguous() for k, v in _inner(model).state_dict().items()}
    return write_safetensors(tensors, path, meta)


