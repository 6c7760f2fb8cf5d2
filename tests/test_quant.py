"""Fake quantization (DoReFa, PACT, LSQ): levels, straight-through gradients, swapping, calibration,
state that evaluation and attacks must never change, the weight cache (offline, CPU)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qrobust.shared.errors import QrobustError
from qrobust.shared.architectures import ARCHITECTURES
from qrobust.shared.models import build_model
from qrobust.shared.quant import (BITS, LSQ, METHODS, QUANT_ARGS, DoReFaAct, DoReFaWeight, PACTAct, QuantConv2d,
                                  QuantError, QuantLinear, _needs_grad, _Quantizer, calibrate, quantize_model,
                                  quantizers)
from qrobust.shared.registry import UnknownNameError

SMALL = ("tiny_cnn", "tiny_resnet")
BIG = tuple(a for a in ARCHITECTURES.names() if a not in SMALL)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rand(*shape, seed=0, scale=1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def images(n=2, size=32, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def quantized(arch="tiny_resnet", method="lsq", w_bits=4, a_bits=4, size=32, **kw):
    model = build_model(arch, 10)
    policy = quantize_model(model, method, w_bits, a_bits, **kw)
    calibrate(model, [images(4, size, seed=1), images(4, size, seed=2)])
    return model.eval(), policy


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def act_quantizer(kind: str, bits: int, signed: bool) -> nn.Module:
    """An activation quantizer calibrated on a batch with (signed) or without negative values."""
    q = {"dorefa": DoReFaAct(bits), "pact": PACTAct(bits, alpha=2.0), "lsq": LSQ(bits, signed=False)}[kind]
    return q.init_from(torch.linspace(-1 if signed else 0, 1, 101))


# levels

def test_dorefa_weight_2bit_levels_are_the_papers():
    w = rand(64, 32, 3, 3)
    levels = torch.unique(DoReFaWeight(2)(w))
    assert torch.allclose(levels, torch.tensor([-1, -1 / 3, 1 / 3, 1]), atol=1e-6)
    assert DoReFaWeight(2)(w).shape == w.shape and DoReFaWeight(2)(w).dtype == w.dtype


@pytest.mark.parametrize("bits", BITS)
def test_every_quantizer_has_at_most_and_exactly_2_to_the_bits_levels(bits):
    wide = torch.linspace(-30, 30, 200_001)
    narrow = torch.linspace(0.2, 0.3, 1001)  # a narrow input uses only a few levels
    cases = {"dorefa-weight": DoReFaWeight(bits), "lsq-weight": LSQ(bits, True, role="weight").init_from(wide / 100)}
    for kind in ("dorefa", "pact", "lsq"):
        for signed in (False, True):
            cases[f"{kind}-{'signed' if signed else 'unsigned'}"] = act_quantizer(kind, bits, signed)
    for name, q in cases.items():
        assert torch.unique(q(wide)).numel() == 2 ** bits, name
        assert torch.unique(q(narrow)).numel() <= 2 ** bits, name
    # DoReFa weights scale by their max |tanh|: any symmetric range uses every level
    assert torch.unique(DoReFaWeight(bits)(narrow - 0.25)).numel() == 2 ** bits


def test_signed_variants_follow_the_formulas():
    x = torch.linspace(-3, 3, 601)
    n = 2 ** 4 - 1
    dorefa = act_quantizer("dorefa", 4, signed=True)
    assert torch.equal(dorefa(x), 2 * (torch.round((x.clamp(-1, 1) + 1) / 2 * n) / n) - 1)
    pact = act_quantizer("pact", 4, signed=True)
    assert pact(x).min() == -2 and pact(x).max() == 2 and torch.unique(pact(x)).numel() == 16
    assert torch.equal(act_quantizer("dorefa", 4, signed=False)(x), torch.round(x.clamp(0, 1) * n) / n)


# straight-through gradients

@pytest.mark.parametrize("kind", ["dorefa", "pact", "lsq"])
@pytest.mark.parametrize("signed", [False, True])
def test_ste_input_gradient_is_one_inside_and_zero_outside_the_clip_range(kind, signed):
    q = act_quantizer(kind, 4, signed)
    if kind == "dorefa":
        lo, hi = (-1.0 if signed else 0.0), 1.0
    elif kind == "pact":
        lo, hi = (-2.0 if signed else 0.0), 2.0
    else:
        qn, qp = q.q_range()
        lo, hi = -qn * q.step.item(), qp * q.step.item()
    span = hi - lo
    inside = torch.linspace(lo + 0.01 * span, hi - 0.01 * span, 50)
    outside = torch.cat([torch.linspace(lo - span, lo - 0.01 * span, 25),
                         torch.linspace(hi + 0.01 * span, hi + span, 25)])
    x = torch.cat([inside, outside]).requires_grad_(True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.cat([torch.ones(50), torch.zeros(50)]))


def test_dorefa_weight_gradient_is_autograd_of_the_formula_with_round_as_identity():
    w, up = rand(16, 8, 3, 3).requires_grad_(True), rand(16, 8, 3, 3, seed=1)
    (DoReFaWeight(4)(w) * up).sum().backward()
    ref = w.detach().clone().requires_grad_(True)
    t = torch.tanh(ref)
    (((2 * (t / (2 * t.abs().max()) + 0.5)) - 1) * up).sum().backward()  # quantize_k with round = identity
    assert torch.allclose(w.grad, ref.grad, atol=1e-6)


@pytest.mark.parametrize("signed", [False, True])
def test_pact_alpha_gradient_counts_the_clipped_elements(signed):
    q = act_quantizer("pact", 2, signed)
    x = torch.tensor([-3.0, -2.0, -0.5, 0.0, 0.7, 1.9, 2.0, 2.5, 7.0])
    up = torch.arange(1.0, 10.0)
    (q(x) * up).sum().backward()
    expected = up[x >= 2].sum() - (up[x <= -2].sum() if signed else 0)
    assert q.alpha.grad.item() == pytest.approx(expected.item())
    # the same as autograd of the unquantized clip when no element ties with alpha
    alpha = torch.tensor(2.0, requires_grad=True)
    x2, up2 = x[x.abs() != 2], up[x.abs() != 2]
    torch.minimum(torch.maximum(x2, -alpha if signed else torch.tensor(0.0)), alpha).mul(up2).sum().backward()
    q.alpha.grad = None
    (q(x2) * up2).sum().backward()
    assert q.alpha.grad.item() == pytest.approx(alpha.grad.item())


@pytest.mark.parametrize("role,signed", [("weight", True), ("act", False), ("act", True)])
def test_lsq_step_gradient_matches_the_paper(role, signed):
    v = rand(2, 5, 4, scale=2.0, seed=3)
    q = LSQ(2, signed=role == "weight", role=role).init_from(v if signed else v.abs())
    qn, qp = q.q_range()
    assert (qn, qp) == ((2, 1) if signed else (0, 3))
    up = rand(2, 5, 4, seed=4)
    (q(v) * up).sum().backward()
    s = q.step.detach()
    r = v / s
    local = torch.where(r <= -qn, torch.tensor(-float(qn)),
                        torch.where(r >= qp, torch.tensor(float(qp)), -r + torch.round(r)))
    n = v.numel() if role == "weight" else v.numel() // v.shape[0]
    g = 1 / math.sqrt(n * qp)
    assert q.grad_scale(v) == pytest.approx(g) and (r <= -qn).any() | (r >= qp).any() and (r.abs() < qp).any()
    assert q.step.grad.item() == pytest.approx((g * (up * local).sum()).item(), rel=1e-5)


def test_lsq_initial_step_follows_the_formula():
    w = rand(8, 4, 3, 3, seed=5)
    step = LSQ(4, True, role="weight").init_from(w).step
    assert step.shape == () and step.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(7))
    per = LSQ(4, True, per_channel=True, role="weight").init_from(w)
    assert per.step.shape == (8, 1, 1, 1)
    assert torch.allclose(per.step.flatten(), 2 * w.abs().flatten(1).mean(1) / math.sqrt(7))
    assert per.grad_scale(w) == pytest.approx(1 / math.sqrt(4 * 9 * 7))
    # activations: step from the first batch only, sign from all batches (here the second one is negative)
    first, second = rand(4, 10, seed=6).abs(), -rand(4, 10, seed=7).abs()
    act = LSQ(4, signed=False).init_from(first, second)
    assert act.signed.item() and act.q_range() == (8, 7)
    assert act.step.item() == pytest.approx(2 * first.abs().mean().item() / math.sqrt(7))
    assert LSQ(4, signed=False).init_from(first).q_range() == (0, 15)


# models

def check_policy(model: nn.Module, policy: dict, w_bits: int, a_bits: int) -> None:
    layers = dict(model.named_modules())
    first, last = layers[policy["first_layer"]], layers[policy["last_layer"]]
    assert isinstance(last, QuantLinear) and first.weight_quant.bits == 8 and last.weight_quant.bits == 8
    assert isinstance(first.input_quant, nn.Identity) and last.input_quant.bits == 8
    quant = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(quant) == policy["quantized_layers"]
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    inner = [m for m in quant if m is not first and m is not last]
    assert all(m.weight_quant.bits == w_bits and m.input_quant.bits == a_bits for m in inner)


def run_grid(arch: str, methods, bits_list, size: int) -> None:
    base = build_model(arch, 5)
    x = images(2, size)
    for method in methods:
        for bits in bits_list:
            model = copy.deepcopy(base)
            policy = quantize_model(model, method, bits, bits)
            check_policy(model, policy, bits, bits)
            calibrate(model, [x])
            with torch.no_grad():
                out = model.eval()(x)
            assert out.shape == (2, 5) and torch.isfinite(out).all(), (arch, method, bits)


@pytest.mark.parametrize("arch", SMALL)
def test_small_architectures_quantize_at_every_method_and_bit_width(arch):
    run_grid(arch, METHODS.names(), BITS, 32)


@pytest.mark.parametrize("arch", BIG)
def test_big_architectures_quantize_at_every_method(arch):
    # one build, every method, the bit widths spread over the methods (the full grid is marked slow)
    base = build_model(arch, 5)
    x = images(2, 64)
    for method, (w_bits, a_bits) in zip(METHODS.names(), [(2, 6), (4, 8), (6, 2)]):
        model = copy.deepcopy(base)
        check_policy(model, quantize_model(model, method, w_bits, a_bits), w_bits, a_bits)
        calibrate(model, [x])
        with torch.no_grad():
            assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.slow
@pytest.mark.parametrize("arch", BIG)
def test_big_architectures_quantize_at_every_method_and_bit_width(arch):
    run_grid(arch, METHODS.names(), BITS, 64)


def test_first_last_bits_none_and_quantized_first_input():
    model = build_model("tiny_cnn", 10)
    policy = quantize_model(model, "pact", 2, 4, first_last_bits=None, first_input="quantize")
    layers = dict(model.named_modules())
    first, last = layers[policy["first_layer"]], layers[policy["last_layer"]]
    assert first.weight_quant.bits == 2 and last.weight_quant.bits == 2 and last.input_quant.bits == 4
    assert isinstance(first.input_quant, PACTAct) and first.input_quant.bits == 4
    report = calibrate(model, [images()])
    assert report["signed_inputs"] == [policy["first_layer"] + ".input_quant"]  # the normalized image


def test_calibrate_decides_signs_from_data_and_leaves_the_model_as_it_was():
    # the second conv sees BatchNorm output without ReLU: negative inputs, like MobileNetV2's bottlenecks
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1),
                        nn.Flatten(), nn.Linear(4 * 28 * 28, 3))
    policy = quantize_model(net, "lsq", 4, 4)
    assert (policy["first_layer"], policy["last_layer"]) == ("0", "6")
    net.train()
    bn = snapshot(net[3])
    report = calibrate(net, [images(2) - 0.5, images(2, seed=3)])
    assert report["signed_inputs"] == ["4.input_quant", "6.input_quant"]
    assert report["batches"] == 2 and report["calibrated"] == 3 and report["uncalibrated"] == []
    assert net.training and all(m.training for m in net.modules())
    assert same_state(bn, snapshot(net[3]))  # calibration ran in eval mode
    with pytest.raises(QuantError, match="no batches"):
        calibrate(net, [])


def test_policy_is_json_and_reproduces_the_quantization():
    model, policy = quantized("tiny_resnet", "lsq", 2, 6, per_channel=True, first_input="quantize")
    assert json.loads(json.dumps(policy)) == policy
    assert set(QUANT_ARGS) < set(policy) and policy["granularity"] == "per-channel"
    again = build_model("tiny_resnet", 10)
    assert quantize_model(again, **{k: policy[k] for k in QUANT_ARGS}) == policy
    assert again.state_dict().keys() == model.state_dict().keys()
    assert [repr(q) for q in quantizers(again)] != [] and len(quantizers(again)) == len(quantizers(model))


def test_quant_layers_share_the_float_parameters_and_keep_the_keys():
    float_model = build_model("tiny_cnn", 10)
    conv_w, fc_w = float_model.net[0][0].weight, float_model.net[5].weight
    keys = set(float_model.state_dict())
    quantize_model(float_model, "dorefa", 4, 4)
    assert float_model.net[0][0].weight is conv_w and float_model.net[5].weight is fc_w
    assert keys <= set(float_model.state_dict())
    assert all(".weight_quant." in k or ".input_quant." in k for k in set(float_model.state_dict()) - keys)
    conv, lin = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Linear(4, 2)
    float_conv, float_lin = copy.deepcopy(conv), copy.deepcopy(lin)
    x, v = images(), images()[:, 0, 0, :4]
    with torch.no_grad():  # in place; with identity quantizers, the layers compute exactly the float ones
        assert QuantConv2d.from_float(conv, nn.Identity(), None) is conv and type(conv) is QuantConv2d
        assert QuantLinear.from_float(lin, nn.Identity(), nn.Identity()) is lin and type(lin) is QuantLinear
        assert torch.equal(conv.eval()(x), float_conv(x)) and torch.equal(lin(v), float_lin(v))
    assert isinstance(conv.weight, nn.Parameter) and torch.equal(conv.weight, float_conv.weight)  # float outside
    with pytest.raises(QuantError, match="QuantConv2d.from_float got a Linear"):
        QuantConv2d.from_float(nn.Linear(2, 2), nn.Identity())


# state never changes outside calibrate() or an optimizer step

@pytest.mark.parametrize("method", ["dorefa", "pact", "lsq"])
def test_eval_and_attacks_change_nothing(method):
    model, _ = quantized("tiny_resnet", method)
    x = images(4, seed=9)
    before = snapshot(model)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(model(x), out)
    for p in model.parameters():
        p.requires_grad_(False)
    adv = x.clone()
    for _ in range(5):  # an attack-like loop: sign-gradient steps on the input
        adv.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(adv), torch.zeros(4, dtype=torch.long))
        grad, = torch.autograd.grad(loss, adv)
        assert grad.abs().sum() > 0
        adv = (adv.detach() + 2 / 255 * grad.sign()).clamp(0, 1)
    with torch.inference_mode():
        assert torch.equal(model(x), out)
    assert same_state(before, snapshot(model))
    # train mode, a backward and no optimizer step: BatchNorm moves, quantizers must not
    for p in model.parameters():
        p.requires_grad_(True)
    quant_before = [snapshot(q) for q in quantizers(model)]
    model.train()
    model(x).sum().backward()
    assert all(same_state(a, snapshot(q)) for a, q in zip(quant_before, quantizers(model)))


@pytest.mark.parametrize("method", ["dorefa", "pact", "lsq"])
def test_state_dict_round_trip_gives_identical_outputs(method, tmp_path):
    from safetensors.torch import load_file, save_file

    model, policy = quantized("tiny_resnet", method, first_input="quantize", per_channel=method == "lsq")
    path = tmp_path / "q.safetensors"
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(path))
    fresh = build_model("tiny_resnet", 10)
    quantize_model(fresh, **{k: policy[k] for k in QUANT_ARGS})
    fresh.net.load_state_dict(load_file(str(path)))
    x = images(3, seed=4)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    assert same_state(snapshot(fresh), snapshot(model))


# the weight cache

def test_weight_cache_matches_recomputation_and_follows_weight_changes():
    model, _ = quantized("tiny_resnet", "lsq")
    x = images(3, seed=5)
    with torch.enable_grad():  # weights require grad: no cache
        uncached = model(x).detach()
    assert all(m._wq_cache is None for m in model.modules() if isinstance(m, QuantConv2d))
    with torch.no_grad():
        cached = model(x)
        assert torch.equal(cached, uncached) and torch.equal(model(x), cached)
    layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert all(m._wq_cache is not None for m in layers)
    assert not any("cache" in k for k in model.state_dict())
    conv = model.net.layers[1].conv1
    for change in (lambda: conv.weight.mul_(-1.5), lambda: conv.weight_quant.step.mul_(2)):
        with torch.no_grad():
            change()  # in place, on the weight, then on a quantizer parameter: the cache must notice
            changed = model(x)
            assert torch.equal(conv.quantized_weight(), conv.weight_quant(conv.weight))
        with torch.enable_grad():
            assert torch.equal(changed, model(x).detach()) and not torch.equal(changed, cached)
        cached = changed


def test_cache_filled_under_inference_mode_serves_a_later_attack():
    model, _ = quantized("tiny_cnn", "dorefa")
    for p in model.parameters():
        p.requires_grad_(False)
    x = images(2)
    with torch.inference_mode():
        out = model(x)
    adv = x.clone().requires_grad_(True)
    model(adv).sum().backward()  # would fail if the cached w_q were an inference tensor
    assert adv.grad is not None and torch.equal(model(x), out)


# errors

def test_uncalibrated_forward_raises():
    model = build_model("tiny_cnn", 10)
    quantize_model(model, "pact", 4, 4)
    with pytest.raises(QuantError, match=r"calibrate\(model, batches\) first"):
        model(images())
    with pytest.raises(QuantError, match="calibrate"):
        LSQ(4, signed=False)(torch.ones(3))
    assert isinstance(QuantError("x"), QrobustError) and isinstance(QuantError("x"), ValueError)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="dorefa", w_bits=3, a_bits=4), "w_bits must be one of 2, 4, 6, 8, not 3"),
    (dict(method="dorefa", w_bits=4, a_bits=4.0), "a_bits must be one of"),
    (dict(method="pact", w_bits=True, a_bits=4), "w_bits"),
    (dict(method="lsq", w_bits=4, a_bits=4, first_last_bits=16), "first_last_bits"),
    (dict(method="lsq", w_bits=4, a_bits=4, first_input="raw"), "first_input must be one of float, quantize"),
    (dict(method="pact", w_bits=4, a_bits=4, per_channel=True), "per_channel applies to lsq only"),
])
def test_bad_arguments_raise_one_line_errors(kwargs, match):
    model = build_model("tiny_cnn", 10)
    with pytest.raises(QuantError, match=match) as e:
        quantize_model(model, **kwargs)
    assert "\n" not in str(e.value)
    assert not any(isinstance(m, QuantConv2d) for m in model.modules())  # nothing swapped before validating


def test_unknown_method_suggests_and_requantizing_refuses():
    with pytest.raises(UnknownNameError, match="Did you mean lsq"):
        quantize_model(build_model("tiny_cnn", 10), "lsqq", 4, 4)
    model, _ = quantized("tiny_cnn", "lsq")
    with pytest.raises(QuantError, match="already quantized"):
        quantize_model(model, "lsq", 4, 4)
    with pytest.raises(QuantError, match="one of 2, 4, 6, 8"):
        DoReFaAct(5)


def test_autocast_does_not_break():
    model, _ = quantized("tiny_cnn", "lsq")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images())
    assert out.shape == (2, 10) and torch.isfinite(out.float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["dorefa", "pact", "lsq"])
def test_cuda_matches_cpu(method, monkeypatch):
    from qrobust.score.run import fp32_kernels

    for flags in (torch.backends.cudnn, torch.backends.cuda.matmul):  # restored after the test
        monkeypatch.setattr(flags, "allow_tf32", flags.allow_tf32)
    fp32_kernels("cuda")  # as the scorer runs: TF32 convolutions move quantized activations across levels
    model, policy = quantized("tiny_resnet", method)
    gpu = build_model("tiny_resnet", 10).cuda()
    quantize_model(gpu, **{k: policy[k] for k in QUANT_ARGS})
    gpu.net.load_state_dict(model.net.state_dict())
    x = images(4, seed=8)
    with torch.no_grad():
        on_gpu, on_cpu = gpu.eval()(x.cuda()).cpu(), model(x)
    # cuDNN and the CPU sum a convolution in other orders, and a quantizer turns a last-bit difference at a
    # rounding boundary into a whole step: on an H200 (TF32 off) LSQ logits differed by up to 2e-3
    assert torch.allclose(on_gpu, on_cpu, atol=1e-2) and torch.equal(on_gpu.argmax(1), on_cpu.argmax(1))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        assert torch.isfinite(gpu(x.cuda())).all()


# the implementation before layers kept their own class (a swap for QuantConv2d / QuantLinear modules whose
# forward replaced the layer's), kept here only, as the oracle of the tests below: its code unchanged

class OldQuantLayer:
    _wq_cache = None
    _calibrating = False

    @classmethod
    def from_float(cls, module: nn.Module, weight_quant: nn.Module, input_quant: nn.Module | None = None):
        kw = dict(bias=module.bias is not None, device="meta", dtype=module.weight.dtype)
        if isinstance(module, nn.Conv2d):
            q = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, padding_mode=module.padding_mode, **kw)
        else:
            q = cls(module.in_features, module.out_features, **kw)
        q.weight, q.bias = module.weight, module.bias
        q.weight_quant, q.input_quant = weight_quant, nn.Identity() if input_quant is None else input_quant
        return q.train(module.training)

    def quantized_weight(self) -> torch.Tensor:
        if self._calibrating:
            return self.weight
        wq = self.weight_quant
        if self.training or _needs_grad(self.weight, *wq.parameters()):
            self._wq_cache = None
            return wq(self.weight)
        key = (id(wq), getattr(wq, "bits", 0), *((t._version, t.data_ptr(), t.device, t.dtype)
                                  for t in (self.weight, *wq.parameters(), *wq.buffers())))
        if self._wq_cache is None or self._wq_cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                self._wq_cache = (key, wq(self.weight))
        return self._wq_cache[1]


class OldQuantConv2d(OldQuantLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), self.quantized_weight(), self.bias)


class OldQuantLinear(OldQuantLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.quantized_weight(), self.bias)


def old_quantize_model(model: nn.Module, method: str, w_bits: int, a_bits: int, *, first_last_bits: int | None = 8,
                       first_input: str = "float", per_channel: bool = False) -> dict:
    definition = METHODS.get(method)
    make_w, make_a = definition.weight, definition.activation
    w_name, a_name = definition.weight_name, definition.activation_name
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first = layers[0][0]
    last = ([n for n, m in layers if isinstance(m, nn.Linear)] or [layers[-1][0]])[-1]
    edge_w, edge_a = first_last_bits or w_bits, first_last_bits or a_bits
    swapped = {}
    for name, m in layers:
        wq = make_w(edge_w if name in (first, last) else w_bits, per_channel).to(m.weight.device).init_from(m.weight)
        if name == first:
            iq = None if first_input == "float" else make_a(edge_a, signed=True)
        else:
            iq = make_a(edge_a if name == last else a_bits)
        cls = OldQuantConv2d if isinstance(m, nn.Conv2d) else OldQuantLinear
        swapped[id(m)] = cls.from_float(m, wq, None if iq is None else iq.to(m.weight.device))
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in swapped:
                setattr(parent, child_name, swapped[id(child)])
    return {"method": method, "w_bits": w_bits, "a_bits": a_bits, "first_last_bits": first_last_bits,
            "first_input": first_input, "per_channel": bool(per_channel),
            "granularity": "per-channel" if per_channel else "per-tensor",
            "weight_quantizer": w_name, "act_quantizer": a_name,
            "first_layer": first, "last_layer": last, "quantized_layers": len(layers)}


def old_calibrate(model: nn.Module, batches) -> dict:
    acts = [(n, m) for n, m in model.named_modules() if isinstance(m, _Quantizer) and m.role == "act"]
    layers = [m for m in model.modules() if isinstance(m, OldQuantLayer)]
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
    finally:
        for layer in layers:
            layer._calibrating = False
        reached = {name: q._calib_end(commit) for name, q in acts}
        for m, training in modes:
            m.training = training
    return {"batches": count, "calibrated": sum(reached.values()),
            "signed_inputs": [n for n, q in acts if reached[n] and q._signed],
            "uncalibrated": [n for n, ok in reached.items() if not ok]}


# the oracle against today's layers

def depthwise_net(num_classes: int = 10) -> nn.Module:
    """Plain, depthwise (groups == channels) and reflect-padded convolutions, BatchNorm without ReLU before
    a layer (signed inputs), a Linear: what the oracle tests run besides the registered tiny architectures."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"), nn.BatchNorm2d(8),
                         nn.Conv2d(8, 12, 1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(12, num_classes))


def twin_models(arch: str, quantize_args: dict, size: int = 32):
    """The same float model quantized and calibrated by the old code and by today's, and their policies."""
    base = build_model(arch, 10) if arch != "depthwise_net" else depthwise_net()
    old, new = copy.deepcopy(base), copy.deepcopy(base)
    batches = [images(4, size, seed=1) - 0.25, images(4, size, seed=2)]
    old_policy, new_policy = old_quantize_model(old, **quantize_args), quantize_model(new, **quantize_args)
    assert old_calibrate(old, batches) == calibrate(new, batches)
    return old, new, old_policy, new_policy


def train_step(model: nn.Module, seed: int) -> None:
    """One SGD step in train mode: every weight, BatchNorm statistic, PACT alpha and LSQ step moves."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = nn.functional.cross_entropy(model(images(4, seed=seed)), torch.arange(4) % 10)
    loss.backward()
    optimizer.step()
    model.eval()


ORACLE_CASES = [("tiny_resnet", {}), ("tiny_cnn", dict(first_input="quantize")),
                ("depthwise_net", dict(first_last_bits=None))]


@pytest.mark.parametrize("method", ["dorefa", "pact", "lsq"])
def test_checkpoints_of_the_old_layers_load_with_the_same_keys_and_give_bit_identical_logits(method, tmp_path):
    from qrobust.shared.models import ModelSpec, load_model, save_checkpoint, state_digest

    for arch, extra in [("tiny_resnet", dict(per_channel=method == "lsq")), ("tiny_cnn", dict(first_input="quantize"))]:
        model = build_model(arch, 10)
        policy = old_quantize_model(model, method, 4, 2, **extra)
        old_calibrate(model, [images(4, seed=1), images(4, seed=2)])
        train_step(model, seed=3)  # quantizer state off its calibrated values, as after fine-tuning
        assert any(isinstance(m, OldQuantConv2d) for m in model.modules())
        path = save_checkpoint(model, ModelSpec(arch, 10, quant=policy), tmp_path / f"{arch}-{method}.safetensors")
        loaded, spec, _ = load_model(str(path))
        assert spec.quant == policy and any(type(m) is QuantConv2d for m in loaded.modules())
        assert list(loaded.state_dict()) == list(model.state_dict())  # the same keys, in the same order
        assert state_digest(loaded) == state_digest(model)
        x = images(5, seed=4)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        # and the other way: today's checkpoint loads into the old layers
        again = build_model(arch, 10)
        old_quantize_model(again, **{k: policy[k] for k in QUANT_ARGS})
        again.net.load_state_dict(loaded.net.state_dict())
        with torch.no_grad():
            assert torch.equal(again.eval()(x), loaded(x))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", ["dorefa", "pact", "lsq"])
def test_plain_layers_compute_what_the_old_layers_computed_bit_for_bit(method, bits):
    from qrobust.score.attacks import frozen

    for arch, extra in ORACLE_CASES + [("tiny_resnet", dict(per_channel=True))] * (method == "lsq"):
        old, new, old_policy, new_policy = twin_models(arch, dict(method=method, w_bits=bits, a_bits=bits, **extra))
        assert old_policy == new_policy and same_state(snapshot(old), snapshot(new))
        assert not any(isinstance(m, OldQuantLayer) for m in new.modules())
        x = images(3, seed=5)
        with torch.no_grad():  # eval: the cached w_q
            assert torch.equal(new.eval()(x), old.eval()(x)), (arch, extra)
        with torch.inference_mode():
            assert torch.equal(new(x), old(x))
        grads = []
        for model in (old, new):  # an attack step: parameters frozen, gradient wrt the input
            with frozen(model), torch.enable_grad():
                adv = x.clone().requires_grad_(True)
                out = model(adv)
                grads.append((out.detach(), torch.autograd.grad(out.logsumexp(1).sum(), adv)[0]))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
        assert grads[1][1].abs().sum() > 0
        for model in (old, new):  # training: gradients of the weights and of the quantizer parameters
            train_step(model, seed=6)
        assert same_state(snapshot(old), snapshot(new)), (arch, extra)
        with torch.no_grad():
            assert torch.equal(new(x), old(x))
