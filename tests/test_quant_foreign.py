"""Quantizing layers of other classes than nn.Conv2d / nn.Linear: timm's TensorFlow-"same" convolutions
(``Conv2dSame``) and its ``Linear``, EfficientNet-style padding layers, depthwise convolutions. Each layer
keeps its class and its own forward, which runs on the quantized input with the quantized weight
(offline, CPU, random init)."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qrobust.shared.models import ModelSpec, load_model, save_checkpoint, state_digest
from qrobust.shared.quant import (LSQ, QuantConv2d, QuantError, QuantLinear, calibrate, quantize_model,
                                  quantized_class, quantizers)

timm = pytest.importorskip("timm")
from timm.layers import Linear as TimmLinear  # noqa: E402
from timm.layers.conv2d_same import Conv2dSame  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# small timm models with TensorFlow "same" padding: Conv2dSame where a stride makes it asymmetric,
# depthwise convolutions, and (MobileNetV3) timm's own Linear as the classifier
SAME_PADDING = ("tf_efficientnet_lite0", "tf_mobilenetv3_small_minimal_100")
SIZE = 64


def make_model(num_classes: int = 10) -> nn.Module:
    """The callable of the checkpoint round trip (``test_quant_foreign:make_model``)."""
    return timm.create_model("tf_mobilenetv3_small_minimal_100", num_classes=num_classes)


def timm_model(name: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(name, num_classes=10).eval()


def images(n=2, size=SIZE, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def layers_of(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def quantized(name: str, method="lsq", w_bits=4, a_bits=4, **kw):
    """(float model, its quantized and calibrated copy, policy)."""
    float_model = timm_model(name)
    model = copy.deepcopy(float_model)
    policy = quantize_model(model, method, w_bits, a_bits, **kw)
    calibrate(model, [images(4, seed=1), images(4, seed=2)])
    return float_model, model.eval(), policy


def hand_reference(float_model: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The float model with each layer's weight overwritten by w_q and its input quantized by a pre-hook:
    each layer's own forward on what the quantized layer is meant to see, without the quantized classes."""
    ref = copy.deepcopy(float_model).eval()
    quant = layers_of(model)
    for name, layer in layers_of(ref).items():
        q = quant[name]
        with torch.no_grad():
            layer.weight.copy_(q.weight_quant(q.weight))  # outside its forward, q.weight is the float weight
        layer.register_forward_pre_hook(lambda _, args, iq=q.input_quant: (iq(args[0]), *args[1:]))
    with torch.no_grad():
        return ref(x)


def tf_same_pad(x: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
    """TensorFlow's SAME padding by its formula: the output has ceil(input / stride) positions, the odd
    pixel of padding goes to the bottom / right."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], layer.kernel_size, layer.stride, layer.dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom))


# the layers keep their class and their forward

@pytest.mark.parametrize("name", SAME_PADDING)
@pytest.mark.parametrize("method", ["dorefa", "pact", "lsq"])
def test_same_padding_layers_keep_their_class_and_compute_their_forward_quantized(name, method):
    float_model, model, policy = quantized(name, method, per_channel=method == "lsq")
    before, after = layers_of(float_model), layers_of(model)
    assert before.keys() == after.keys() and policy["quantized_layers"] == len(after)
    for n, layer in after.items():
        float_class = type(before[n])
        assert isinstance(layer, float_class) and type(layer) is quantized_class(float_class), n
        assert isinstance(layer, QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear)
    same = [n for n, m in after.items() if isinstance(m, Conv2dSame)]
    assert same and len(same) == sum(isinstance(m, Conv2dSame) for m in before.values())
    assert type(after[same[0]]).__name__ == "QuantConv2dSame" and type(after[same[0]]).__mro__[3] is Conv2dSame

    x = images(3, seed=3)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, hand_reference(float_model, model, x))

    # each Conv2dSame by hand: TensorFlow's padding of the quantized input, a convolution with w_q
    seen = {}
    hooks = [after[n].register_forward_hook(lambda m, args, y, n=n: seen.update({n: (args[0], y)}))
             for n in same]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for n in same:
        layer, (raw, y) = after[n], seen[n]
        assert layer.stride != (1, 1) and y.shape[-1] == math.ceil(raw.shape[-1] / layer.stride[1])
        with torch.no_grad():
            wq = layer.weight_quant(layer.weight)
            expected = F.conv2d(tf_same_pad(layer.input_quant(raw), layer), wq, layer.bias, layer.stride, 0,
                                layer.dilation, layer.groups)
        assert torch.equal(y, expected), n
    assert not torch.equal(out, float_model(x))  # it is quantized


def test_timm_linear_keeps_its_class_and_the_policy_finds_the_first_and_last_layer():
    float_model, model, policy = quantized("tf_mobilenetv3_small_minimal_100", "pact", 2, 4)
    assert (policy["first_layer"], policy["last_layer"]) == ("conv_stem", "classifier")
    first, last = model.conv_stem, model.classifier
    assert isinstance(first, Conv2dSame) and isinstance(last, TimmLinear) and isinstance(last, QuantLinear)
    assert first.weight_quant.bits == last.weight_quant.bits == last.input_quant.bits == 8
    assert isinstance(first.input_quant, nn.Identity)
    inner = [m for n, m in layers_of(model).items() if n not in ("conv_stem", "classifier")]
    assert inner and all(m.weight_quant.bits == 2 and m.input_quant.bits == 4 for m in inner)
    # the state dict: the float keys, plus the quantizers'
    keys, float_keys = set(model.state_dict()), set(float_model.state_dict())
    assert float_keys < keys and all(".weight_quant." in k or ".input_quant." in k for k in keys - float_keys)
    assert not any("parametrizations" in k or "cache" in k for k in keys)
    assert all(model.get_parameter(n + ".weight") is m.weight and isinstance(m.weight, nn.Parameter)
               for n, m in layers_of(model).items())


@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_depthwise_convolutions_quantize_and_run(source):
    from qrobust.shared.models import build_model

    base = timm_model("tf_efficientnet_lite0") if source == "timm" else build_model("mobilenet_v2", 10).eval()
    for method, kw in [("lsq", dict(per_channel=True)), ("dorefa", {})]:
        model = copy.deepcopy(base)
        quantize_model(model, method, 2, 4, **kw)
        depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert len(depthwise) > 10
        assert all(m.groups == m.in_channels == m.out_channels and isinstance(m, QuantConv2d) for m in depthwise)
        calibrate(model, [images(4, seed=1)])
        x = images(2, seed=4)
        with torch.no_grad():
            out = model.eval()(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        for m in depthwise:
            wq = m.quantized_weight()
            assert torch.unique(wq).numel() <= (4 * m.out_channels if kw else 4)  # 2 bit: 4 levels (per channel)
            if kw:
                assert m.weight_quant.step.shape == (m.out_channels, 1, 1, 1)


def test_calibrate_sees_the_float_model_then_training_and_attacks_get_gradients():
    from qrobust.score.attacks import frozen

    float_model = timm_model("tf_efficientnet_lite0")
    model = copy.deepcopy(float_model)
    quantize_model(model, "lsq", 4, 4)
    first, second = images(4, seed=1), images(4, seed=2)
    inputs = {}  # every layer's input in the float model, first batch
    hooks = [m.register_forward_pre_hook(lambda _, args, n=n: inputs.update({n: args[0]}))
             for n, m in layers_of(float_model).items()]
    with torch.no_grad():
        float_model(first)
    for hook in hooks:
        hook.remove()
    report = calibrate(model, [first, second])
    assert report["uncalibrated"] == [] and report["calibrated"] == len(layers_of(model)) - 1
    for n, layer in layers_of(model).items():  # LSQ's steps start from the float model's activations
        if isinstance(layer.input_quant, LSQ):
            expected = 2 * inputs[n].abs().mean() / math.sqrt(layer.input_quant.q_range()[1])
            assert layer.input_quant.step.item() == pytest.approx(expected.item(), rel=1e-5), n

    model.train()
    x = images(4, seed=5).requires_grad_(True)
    F.cross_entropy(model(x), torch.arange(4)).backward()
    assert x.grad.abs().sum() > 0
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers_of(model).values())
    steps = [q.step for q in quantizers(model)]
    assert steps and all(s.grad is not None for s in steps)

    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen(model), torch.enable_grad():  # as the attacks run
        adv = images(2, seed=6).requires_grad_(True)
        grad, = torch.autograd.grad(model(adv).logsumexp(1).sum(), adv)
    assert grad.abs().sum() > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_weights_are_quantized_once_per_forward_and_not_again_in_eval():
    _, model, _ = quantized("tf_mobilenetv3_small_minimal_100", "dorefa")
    calls = []
    for layer in layers_of(model).values():
        layer.weight_quant.register_forward_hook(lambda m, *_: calls.append(m))
    n, x = len(layers_of(model)), images(2, seed=7)
    with torch.no_grad():
        cached = model(x)  # the first eval forward fills the cache
    assert len(calls) == n
    calls.clear()
    with torch.no_grad():
        assert torch.equal(model(x), cached)
    with torch.inference_mode():
        model(x)
    assert calls == []
    conv = model.conv_stem
    with torch.no_grad():
        conv.weight.mul_(0.5)  # a changed weight: its layer alone re-quantizes
        assert not torch.equal(model(x), cached)
    assert calls == [conv.weight_quant]
    calls.clear()
    model.train()
    model(x).sum().backward()  # training: every layer, once
    assert len(calls) == n


def test_checkpoint_round_trip_of_a_timm_model(tmp_path):
    float_model = make_model()
    model = copy.deepcopy(float_model)
    policy = quantize_model(model, "pact", 4, 4)
    calibrate(model, [images(4, seed=1)])
    spec = ModelSpec("test_quant_foreign:make_model", 10, quant=policy, source="callable", normalize="none")
    path = save_checkpoint(model, spec, tmp_path / "mnv3-pact-w4a4.safetensors")
    loaded, loaded_spec, sha = load_model("test_quant_foreign:make_model", weights=path)
    assert loaded_spec.quant == policy and sha is not None
    assert state_digest(loaded) == state_digest(model)
    assert sum(isinstance(m, Conv2dSame) and isinstance(m, QuantConv2d) for m in loaded.modules()) == 5
    x = images(3, seed=8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_pickle_and_deepcopy_keep_the_made_classes():
    _, model, _ = quantized("tf_mobilenetv3_small_minimal_100", "lsq")
    x = images(2, seed=9)
    with torch.no_grad():
        out = model(x)
        for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert type(other.conv_stem) is type(model.conv_stem) and torch.equal(other(x), out)
            assert other.conv_stem.weight_quant is not model.conv_stem.weight_quant


# layers that implement padding their own way, as efficientnet_pytorch does

class StaticSamePadding(nn.Conv2d):
    """efficientnet_pytorch's Conv2dStaticSamePadding: a ZeroPad2d submodule, then the convolution."""

    def __init__(self, cin, cout, k, stride=1, groups=1, image_size=SIZE):
        super().__init__(cin, cout, k, stride, groups=groups, bias=False)
        out = math.ceil(image_size / stride)
        total = max((out - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((total // 2, total - total // 2) * 2)

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class DynamicSamePadding(nn.Conv2d):
    """efficientnet_pytorch's Conv2dDynamicSamePadding: reads self.weight twice (its shape, then the conv)."""

    def forward(self, x):
        kh, kw = self.weight.size()[-2:]
        pads = [max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
                for i, k, s, d in zip(x.shape[-2:], (kh, kw), self.stride, self.dilation)]
        x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def padding_net() -> nn.Module:
    return nn.Sequential(StaticSamePadding(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         DynamicSamePadding(8, 8, 3, stride=2, groups=8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


@pytest.mark.parametrize("method", ["dorefa", "pact", "lsq"])
def test_efficientnet_pytorch_style_padding_layers(method):
    float_model = padding_net().eval()
    model = copy.deepcopy(float_model)
    quantize_model(model, method, 4, 4, first_input="quantize")
    calibrate(model, [images(4, seed=1)])
    assert isinstance(model[0], StaticSamePadding) and isinstance(model[3], DynamicSamePadding)
    keys = [k for k in model.state_dict() if k.startswith("0.")]  # its own key, then the quantizers'
    assert keys[0] == "0.weight" and all(k.startswith(("0.weight_quant.", "0.input_quant.")) for k in keys[1:])
    assert {"0.weight_quant.step", "0.input_quant.step"} <= set(keys) or method != "lsq"
    x = images(3, seed=2)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), hand_reference(float_model, model, x))
    calls = []
    model[3].weight_quant.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    model(x).sum().backward()
    assert calls == [1] and model[3].weight.grad is not None  # two reads of self.weight, one quantization


# what quantize_model refuses, in one line, before it changes anything

class NoWeightRead(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self._parameters["weight"], self.bias, self.stride, self.padding)


def refused(model: nn.Module, match: str, **kw) -> None:
    before = copy.deepcopy(model)
    with pytest.raises(QuantError, match=match) as e:
        quantize_model(model, "lsq", 4, 4, **kw)
    assert "\n" not in str(e.value)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]


def test_refusals_are_one_line():
    from torch.nn.utils.parametrizations import weight_norm

    refused(nn.Sequential(nn.ReLU(), nn.Flatten()), "model has no nn.Conv2d or nn.Linear layer to quantize")
    refused(nn.Sequential(nn.Conv2d(3, 4, 3), weight_norm(nn.Conv2d(4, 4, 3))),
            "cannot quantize 1: its weight is not an initialized Parameter")
    refused(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyConv2d(4, 3)), "cannot quantize 1: .* lazy")
    qat = torch.ao.nn.qat.Conv2d(3, 4, 3, qconfig=torch.ao.quantization.get_default_qat_qconfig("x86"))
    refused(nn.Sequential(nn.Linear(3, 3), qat), "cannot quantize 1: already quantized")
    model = quantized("tf_mobilenetv3_small_minimal_100")[1]
    refused(model, "cannot quantize conv_stem: already quantized")
    # a layer whose forward never reads self.weight cannot be quantized: its forward says so
    net = nn.Sequential(NoWeightRead(3, 4, 3), nn.Flatten(), nn.Linear(4 * 62 * 62, 2))
    quantize_model(net, "dorefa", 4, 4)
    with pytest.raises(QuantError, match="QuantNoWeightRead: the forward of NoWeightRead never reads self.weight") as e:
        calibrate(net, [images(1)])
    assert "\n" not in str(e.value)


def test_a_layer_alone_and_a_layer_under_two_names():
    layer = Conv2dSame(3, 4, 3, stride=2)
    policy = quantize_model(layer, "pact", 4, 4)
    assert policy["first_layer"] == policy["last_layer"] == "" and isinstance(layer, QuantConv2d)
    shared = nn.Linear(6, 6)
    net = nn.Sequential(nn.Linear(4, 6), shared, nn.ReLU(), shared)
    assert quantize_model(net, "lsq", 4, 4)["quantized_layers"] == 2
    assert net[1] is net[3] and isinstance(net[3], QuantLinear)


def replica_of(model: nn.Module) -> nn.Module:
    """What nn.parallel.replicate makes of a model for another GPU (here on the same device): every module
    copied by ``_replicate_for_data_parallel``, its parameters set as plain attributes (not leaves)."""
    copies = {id(m): m._replicate_for_data_parallel() for m in model.modules()}
    for m in model.modules():
        replica = copies[id(m)]
        for name, child in m._modules.items():
            setattr(replica, name, None if child is None else copies[id(child)])
        for name, p in m._parameters.items():
            if p is None:
                replica._parameters[name] = None
            else:
                setattr(replica, name, p * 1)
    return copies[id(model)]


def test_data_parallel_replicas_compute_what_the_model_computes():
    _, model, _ = quantized("tf_mobilenetv3_small_minimal_100", "pact")
    replica = replica_of(model)
    assert "weight" not in replica.conv_stem._parameters and "weight" in replica.conv_stem.__dict__
    x = images(2, seed=10)
    with torch.no_grad():
        assert torch.equal(replica(x), model(x))
    grads = []
    for m in (model, replica):
        adv = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(m(adv).logsumexp(1).sum(), adv)[0])
    assert torch.equal(grads[0], grads[1])
