"""Fake quantization as in the papers (DoReFa, PACT, LSQ) and applying it to a model's layers.

A quantizer maps a tensor to its fake-quantized tensor (same shape) with
straight-through rounding. :func:`quantize_model` quantizes every Conv2d/Linear in
place (weight and input): its class becomes :class:`QuantConv2d`/:class:`QuantLinear`,
or for a subclass such as timm's ``Conv2dSame`` a quantized subclass of it that runs
its own forward; :func:`calibrate` then sets the data-dependent state (input signs,
LSQ steps).
Quantizer state changes only in calibrate(), ``load_state_dict`` or an optimizer
step: no observers, running statistics or lazy init, so evaluation and attacks
cannot change the model (torch's ``FakeQuantize`` does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from qrobust.shared.errors import QrobustError
from qrobust.shared.registry import Registry

BITS = (2, 4, 6, 8)
QUANT_ARGS = ("method", "w_bits", "a_bits", "first_last_bits", "first_input", "per_channel")
FIRST_INPUTS = ("float", "quantize")


class QuantError(QrobustError, ValueError):
    """A quantization request or state the user must fix (bad bits, uncalibrated model, ...)."""


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward. Not ``x + (round(x) - x).detach()``: that is off by an
    ulp now and then, and the levels must be exact."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _round(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x) if _needs_grad(x) else torch.round(x)


def _check_bits(bits, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        raise QuantError(f"{what} must be one of {', '.join(map(str, BITS))}, not {bits!r}")
    return bits


class _Quantizer(nn.Module):
    """Base: ``bits``, persistent ``initialized`` and ``signed`` buffers, mirrored in Python bools so
    forward costs no device sync (calibrate and load_state_dict keep the mirrors in step)."""

    role, per_channel, _first, _negative = "act", False, None, False  # the last two: only while calibrating

    def __init__(self, bits: int, signed: bool = False, ready: bool = False):
        super().__init__()
        self.bits, self.force_signed, self._calibrating = _check_bits(bits), bool(signed), False
        self.register_buffer("initialized", torch.tensor(ready))
        self.register_buffer("signed", torch.tensor(self.force_signed))
        self._sync()

    def _sync(self) -> None:
        self._ready, self._signed = bool(self.initialized), bool(self.signed)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calibrating:  # only calibrate() sets this: passes the input through, unquantized
            self._observe(x)
            return x
        if not self._ready:
            raise QuantError(f"{type(self).__name__} ({self.role}, {self.bits} bit) is not initialized: "
                             f"call qrobust.shared.quant.calibrate(model, batches) first")
        return self._quantize(x, 2 ** self.bits - 1)

    def _observe(self, x: torch.Tensor) -> None:
        self._negative = self._negative or bool((x < 0).any())
        if self._first is None:  # LSQ starts from the first batch (the paper): keep its mean |x| alone
            v = x.detach().abs()
            self._first = v.mean(tuple(range(1, v.dim())), keepdim=True) if self.per_channel else v.mean()

    def _calib_end(self, commit: bool = True) -> bool:
        first, negative = self._first, self._negative
        self._first, self._negative, self._calibrating = None, False, False
        if not commit or first is None:  # a failed pass, or a quantizer no pass reached
            return False
        with torch.no_grad():
            self.signed.fill_(self.force_signed or (negative and self.role == "act"))
            self.initialized.fill_(True)
            self._sync()
            if isinstance(self, LSQ):  # its step depends on the sign just decided
                self._init_state(first)
        return True

    def init_from(self, *batches: torch.Tensor) -> "_Quantizer":
        """Initialize from what it quantizes: the weight, or activation batches (calibrate() for one)."""
        self._calibrating = True
        for x in batches:
            self._observe(x)
        self._calib_end()
        return self

    def extra_repr(self) -> str:
        return f"bits={self.bits}, role={self.role}" + (f", signed={self._signed}" if self.role == "act" else "")


class DoReFaWeight(_Quantizer):
    """DoReFa weights ``2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1`` (2 bit: {-1, -1/3, 1/3, 1}).
    The gradient is autograd's through tanh and max with round as identity (tensorpack's code)."""

    role = "weight"

    def __init__(self, bits: int):
        super().__init__(bits, signed=True, ready=True)  # no data-dependent state

    def _quantize(self, w, n):
        t = torch.tanh(w)
        return 2 * (_round((t / (2 * t.abs().max()) + 0.5) * n) / n) - 1


class DoReFaAct(_Quantizer):
    """DoReFa activations ``quantize_k(clip(x, 0, 1))``; signed ``2 quantize_k((clip(x, -1, 1) + 1) / 2) - 1``.
    ``signed=True`` forces the signed variant, else calibrate() decides. Gradient 1 in the clip range, 0 out."""

    def _quantize(self, x, n):
        if self._signed:
            return 2 * (_round((x.clamp(-1, 1) + 1) * 0.5 * n) / n) - 1
        return _round(x.clamp(0, 1) * n) / n


class PACTAct(_Quantizer):
    """PACT ``y = clip(x, 0, alpha)``, ``y_q = round(y (2^k-1) / alpha) alpha / (2^k-1)``, learnable alpha.
    Straight-through over the whole quantizer (the paper): d y_q/dx = 1 on (0, alpha), d y_q/d alpha = 1
    where x >= alpha, else 0. Signed: clip to [-alpha, alpha], 2^k levels, d/d alpha = -1 where x <= -alpha.
    The paper's L2 penalty on alpha belongs in the training loss."""

    def __init__(self, bits: int, alpha: float = 10.0, signed: bool = False):
        super().__init__(bits, signed)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def _quantize(self, x, n):
        alpha = self.alpha
        a = alpha.detach()  # no gradient through the scale: PACT's STE, not LSQ's
        low = torch.where(x <= -alpha, -alpha, x) if self._signed else x.clamp_min(0)
        y = torch.where(x >= alpha, alpha, low)  # where, not min/max: ties give alpha the whole gradient
        if self._signed:
            return _round((y + a) * (n / (2 * a))) * (2 * a / n) - a
        return _round(y * (n / a)) * (a / n)


class LSQ(_Quantizer):
    """LSQ ``v_hat = round(clip(v / s, -Q_N, Q_P)) s``, learnable step s, straight-through round.
    Unsigned Q_N = 0, Q_P = 2^b - 1; signed Q_N = 2^(b-1), Q_P = 2^(b-1) - 1. The step's gradient is
    scaled by g = 1 / sqrt(N Q_P), N the elements per step: the weight tensor (per channel: one output
    channel), or one sample's features for activations. s starts at 2 mean|v| / sqrt(Q_P), from the
    weight (``init_from``, by quantize_model) or calibrate()'s first batch. ``role="weight"``: calibrate()
    leaves it alone and ``signed`` stays as given; for activations calibrate() decides the sign."""

    def __init__(self, bits: int, signed: bool, per_channel: bool = False, *, role: str = "act"):
        super().__init__(bits, signed)
        if role not in ("act", "weight") or (per_channel and role != "weight"):
            raise QuantError(f"LSQ: role must be 'act' or 'weight' (per channel: weight only), not {role!r}")
        self.role, self.per_channel = role, bool(per_channel)
        self.step = nn.Parameter(torch.tensor(1.0))

    def q_range(self) -> tuple[int, int]:
        """(Q_N, Q_P) for the current sign."""
        return (2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1) if self._signed else (0, 2 ** self.bits - 1)

    def _init_state(self, mean: torch.Tensor) -> None:
        # clamp: an all-zero input would give s = 0 and a division by zero
        step = (2 * mean / math.sqrt(self.q_range()[1])).clamp_min(1e-8).to(self.step)
        if step.shape != self.step.shape:  # per channel: the weight gives the shape
            self.step = nn.Parameter(torch.empty_like(step))
        self.step.copy_(step)  # in place: an optimizer already holding the Parameter keeps working

    def grad_scale(self, v: torch.Tensor) -> float:
        """g = 1 / sqrt(N Q_P) for input ``v``."""
        n = v.numel() // max(1, v.shape[0]) if self.role == "act" or self.per_channel else v.numel()
        return 1.0 / math.sqrt(max(1, n) * self.q_range()[1])

    def _quantize(self, v, _):
        qn, qp = self.q_range()
        s = self.step
        if _needs_grad(s):  # value exactly s, gradient g (LSQ's gradscale without its rounding error)
            s = s.detach() + (s - s.detach()) * self.grad_scale(v)
        return _round(torch.clamp(v / s, -qn, qp)) * s


class _QuantLayer:
    """What quantization adds to a Conv2d/Linear, whatever its class: ``weight_quant`` and ``input_quant``
    submodules, the input quantized before the class's own forward, ``self.weight`` read as w_q inside
    that forward (the float Parameter everywhere else: state dict, optimizer, ``layer.weight``), and
    the w_q cache. A quantized layer's class is :func:`quantized_class` of its float class."""

    _float_class: type = nn.Module  # set on each quantized class: the float class it extends
    _wq_cache = None  # plain attributes, never in the state dict
    _calibrating = False

    @classmethod
    def from_float(cls, module: nn.Module, weight_quant: nn.Module, input_quant: nn.Module | None = None):
        """Quantize ``module`` in place and return it: its class becomes :func:`quantized_class` of its
        own, its weight and bias stay the same Parameters (state dict keys unchanged), and it gains the
        ``weight_quant`` and ``input_quant`` submodules (``nn.Identity()`` for None)."""
        quant_class = quantized_class(type(module))
        if not issubclass(quant_class, cls):
            raise QuantError(f"{cls.__name__}.from_float got a {type(module).__name__}")
        module.__class__ = quant_class
        module.weight_quant = weight_quant
        module.input_quant = nn.Identity() if input_quant is None else input_quant
        return module

    def _float_weight(self) -> torch.Tensor:
        state = self.__dict__
        params = state["_parameters"]
        if "weight" in params:
            return params["weight"]
        if "weight" in state:  # a plain attribute, as nn.DataParallel's replicas hold their weights
            return state["weight"]
        raise AttributeError(f"{type(self).__name__} has no weight")

    @property
    def weight(self) -> torch.Tensor:
        # w_q while the class's own forward runs (computed at its first read there), else the float weight
        active = self.__dict__.get("_in_forward")
        if active is None:
            return self._float_weight()
        if active is True:
            active = self.__dict__["_in_forward"] = self.quantized_weight()
        return active

    @weight.setter
    def weight(self, value) -> None:  # nn.Module.__setattr__ registers Parameters; other tensors land here
        self.__dict__["weight"] = value

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The float class's own forward on ``input_quant(x)``, with ``self.weight`` reading as w_q."""
        x = self.input_quant(x)
        state = self.__dict__  # plain attribute writes, not through nn.Module.__setattr__
        outer, state["_in_forward"] = state.get("_in_forward"), True
        try:
            out = super().forward(x, *args, **kwargs)
            unread = state["_in_forward"] is True
        finally:
            state["_in_forward"] = outer
        if unread:  # it would have computed with nothing quantized but its input
            raise QuantError(f"{type(self).__name__}: the forward of {self._float_class.__qualname__} never "
                             f"reads self.weight, so its weight cannot be quantized")
        return out

    def quantized_weight(self) -> torch.Tensor:
        """w_q; reused while not training, nothing needs its gradient and nothing it depends on changed."""
        weight = self._float_weight()
        if self._calibrating:  # calibration sees the float model (as MQBench's calibration does)
            return weight
        wq = self.weight_quant
        if self.training or _needs_grad(weight, *wq.parameters()):
            self._wq_cache = None
            return wq(weight)
        # _version counts in-place changes (optimizer steps, load_state_dict, edits under no_grad, but
        # not through .data); data_ptr/device/dtype catch .to() and replaced tensors
        key = (id(wq), getattr(wq, "bits", 0), *((t._version, t.data_ptr(), t.device, t.dtype)
                                  for t in (weight, *wq.parameters(), *wq.buffers())))
        if self._wq_cache is None or self._wq_cache[0] != key:
            # a normal tensor even under inference_mode, so a later attack (grad on) can use it
            with torch.inference_mode(False), torch.no_grad():
                self._wq_cache = (key, wq(weight))
        return self._wq_cache[1]

    def __reduce_ex__(self, protocol):
        # a quantized class made for a foreign layer class is not importable by name: rebuild it from that
        state = self.__getstate__()
        state.pop("_wq_cache", None)
        return _new_quantized, (self._float_class,), state


class QuantConv2d(_QuantLayer, nn.Conv2d):
    """A quantized ``nn.Conv2d``: ``conv(input_quant(x), weight_quant(weight), bias)``. A Conv2d subclass
    gets its own quantized class, a subclass of both (see :func:`quantized_class`)."""

    _float_class = nn.Conv2d


class QuantLinear(_QuantLayer, nn.Linear):
    """A quantized ``nn.Linear``: ``linear(input_quant(x), weight_quant(weight), bias)``. A Linear subclass
    gets its own quantized class, a subclass of both (see :func:`quantized_class`)."""

    _float_class = nn.Linear


_QUANTIZED_CLASSES: dict[type, type] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quantized_class(float_class: type) -> type:
    """The class a layer of ``float_class`` (nn.Conv2d, nn.Linear or a subclass) takes when quantized:
    QuantConv2d / QuantLinear for the plain ones; for a subclass ``C`` (timm's ``Conv2dSame``, ...) a
    class ``Quant<C>(QuantConv2d or QuantLinear, C)``, made once, whose forward runs C's own forward, so
    the layer stays an instance of C and computes what C computes, with w_q and the quantized input."""
    made = _QUANTIZED_CLASSES.get(float_class)
    if made is None:
        if not issubclass(float_class, (nn.Conv2d, nn.Linear)) or issubclass(float_class, _QuantLayer):
            raise QuantError(f"quantized_class: {float_class.__qualname__} is not a float Conv2d or Linear class")
        base = QuantConv2d if issubclass(float_class, nn.Conv2d) else QuantLinear
        name = f"Quant{float_class.__name__}"
        try:
            made = type(name, (base, float_class), {"__module__": __name__, "__qualname__": name,
                                                    "_float_class": float_class, "__doc__": base.__doc__})
        except TypeError as e:  # a metaclass or layout conflict
            raise QuantError(f"cannot make a quantized class of {float_class.__qualname__}: "
                             f"{str(e).splitlines()[0]}") from None
        _QUANTIZED_CLASSES[float_class] = made
    return made


def _new_quantized(float_class: type) -> nn.Module:
    """An empty quantized layer of ``float_class`` (unpickling and deepcopy fill in its state)."""
    cls = quantized_class(float_class)
    return cls.__new__(cls)


@dataclass(frozen=True)
class QuantMethodDef:
    """A quantization method: its quantizers and what tables, figures and the command line ask about it."""

    name: str
    label: str                  # as the paper's tables name it
    hue: str                    # matplotlib colormap of its lines and bars (lighter: fewer bits)
    weight: Callable            # (bits, per_channel) -> weight quantizer
    activation: Callable        # (bits, signed=False) -> activation quantizer
    weight_name: str            # the quantizers' names in a checkpoint's policy
    activation_name: str
    bits: tuple[int, ...] = BITS


METHODS: Registry[QuantMethodDef] = Registry("quantization method")
METHODS.add("dorefa", QuantMethodDef("dorefa", "DoReFa", "Blues", lambda b, pc: DoReFaWeight(b), DoReFaAct,
                                     "DoReFaWeight", "DoReFaAct"))
# RobustMQ: "PACT ... leveraging the method in DoReFa for weight quantization"
METHODS.add("pact", QuantMethodDef("pact", "PACT", "Oranges", lambda b, pc: DoReFaWeight(b), PACTAct,
                                   "DoReFaWeight", "PACTAct"))
METHODS.add("lsq", QuantMethodDef("lsq", "LSQ", "Greens", lambda b, pc: LSQ(b, True, pc, role="weight"),
                                  lambda b, signed=False: LSQ(b, signed), "LSQ(signed)", "LSQ"))


def quantizers(model: nn.Module) -> list[nn.Module]:
    """Every quantizer module of ``model`` (weight and activation), in ``modules()`` order."""
    return [m for m in model.modules() if isinstance(m, _Quantizer)]


def quantize_model(model: nn.Module, method: str, w_bits: int, a_bits: int, *, first_last_bits: int | None = 8,
                   first_input: str = "float", per_channel: bool = False) -> dict:
    """Quantize every nn.Conv2d / nn.Linear of `model`, subclasses included, in place (found by
    named_modules, no graph tracing; see :meth:`_QuantLayer.from_float`); return the policy dict.
    Each layer keeps its own forward: a Conv2dSame still pads like TensorFlow, on the quantized input
    with the quantized weight.

    The first layer (first Conv2d/Linear) and the last (last Linear) get ``first_last_bits`` for
    their weights, and the last for its input too (None: w_bits/a_bits like the rest). The first
    layer's input (the normalized image) stays float with ``first_input="float"``, or gets a signed
    quantizer (first_last_bits, else a_bits) with ``"quantize"``. Activation quantizers need
    :func:`calibrate` before use. The policy is JSON-serializable, and
    ``quantize_model(fresh, **{k: policy[k] for k in QUANT_ARGS})`` quantizes a fresh model the same."""
    definition = METHODS.get(method)
    make_w, make_a = definition.weight, definition.activation
    w_name, a_name = definition.weight_name, definition.activation_name
    for what, bits in (("w_bits", w_bits), ("a_bits", a_bits), ("first_last_bits", first_last_bits)):
        if bits is not None or what != "first_last_bits":
            _check_bits(bits, what)
    if first_input not in FIRST_INPUTS:
        raise QuantError(f"first_input must be one of {', '.join(FIRST_INPUTS)}, not {first_input!r}")
    if per_channel and method != "lsq":
        raise QuantError(f"per_channel applies to lsq only ({method} quantizes weights per tensor)")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, m in layers:  # every refusal before any layer changes
        where = name or type(m).__name__
        if isinstance(m, _QuantLayer) or hasattr(m, "weight_fake_quant"):  # ours, or torch.ao's QAT layers
            raise QuantError(f"cannot quantize {where}: already quantized")
        weight = m._parameters.get("weight")
        if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter):
            raise QuantError(f"cannot quantize {where}: its weight is not an initialized Parameter "
                             f"(parametrized, or a lazy layer before its first forward?)")
        quantized_class(type(m))
    if not layers:
        raise QuantError("model has no nn.Conv2d or nn.Linear layer to quantize")
    first = layers[0][0]
    last = ([n for n, m in layers if isinstance(m, nn.Linear)] or [layers[-1][0]])[-1]
    edge_w, edge_a = first_last_bits or w_bits, first_last_bits or a_bits
    for name, m in layers:  # named_modules() lists a layer shared under two names once
        wq = make_w(edge_w if name in (first, last) else w_bits, per_channel).to(m.weight.device).init_from(m.weight)
        if name == first:
            iq = None if first_input == "float" else make_a(edge_a, signed=True)
        else:
            iq = make_a(edge_a if name == last else a_bits)
        _QuantLayer.from_float(m, wq, None if iq is None else iq.to(m.weight.device))
    return {"method": method, "w_bits": w_bits, "a_bits": a_bits, "first_last_bits": first_last_bits,
            "first_input": first_input, "per_channel": bool(per_channel),
            "granularity": "per-channel" if per_channel else "per-tensor",
            "weight_quantizer": w_name, "act_quantizer": a_name,
            "first_layer": first, "last_layer": last, "quantized_layers": len(layers)}


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict:
    """Initialize data-dependent quantizer state from a few input batches (model inputs), under
    no_grad, then mark every quantizer initialized.

    The passes run the float model in eval mode (nothing quantized, BatchNorm statistics untouched;
    training modes are restored after). Every activation quantizer becomes signed iff its inputs had
    a negative value (or it was built signed); LSQ steps start at 2 mean|x| / sqrt(Q_P) over the
    first batch. Returns ``{"batches", "calibrated", "signed_inputs": [quantizer names],
    "uncalibrated": [quantizers no pass reached]}``."""
    acts = [(n, m) for n, m in model.named_modules() if isinstance(m, _Quantizer) and m.role == "act"]
    layers = [m for m in model.modules() if isinstance(m, _QuantLayer)]
    modes = [(m, m.training) for m in model.modules()]
    device = next(model.parameters()).device
    count, commit = 0, False
    for m in [q for _, q in acts] + layers:
        m._calibrating = True
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(batch.to(device))
                count += 1
        commit = count > 0
    finally:  # after a failed pass (or none), every quantizer stays as it was
        for layer in layers:
            layer._calibrating = False
        reached = {name: q._calib_end(commit) for name, q in acts}
        for m, training in modes:
            m.training = training
    if not count:
        raise QuantError("calibrate() got no batches: pass a few input batches of the model")
    return {"batches": count, "calibrated": sum(reached.values()),
            "signed_inputs": [n for n, q in acts if reached[n] and q._signed],
            "uncalibrated": [n for n, ok in reached.items() if not ok]}
