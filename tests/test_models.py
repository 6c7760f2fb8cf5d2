"""Models: registry, the in-model normalization, checkpoints and every way of loading (offline, CPU)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from qrobust.shared.errors import QrobustError
from qrobust.shared.architectures import ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, Normalized
from qrobust.shared.checkpoints import read_checkpoint_metadata, write_safetensors
from qrobust.shared.models import ModelError, ModelSpec, build_model, load_model, save_checkpoint
from qrobust.shared.registry import UnknownNameError

SMALL = ("tiny_cnn", "tiny_resnet")


def make_net(num_classes: int = 7) -> nn.Module:
    """Loaded by the tests as ``test_models:make_net`` (pytest puts tests/ on sys.path)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def make_self_normalizing_net() -> nn.Module:
    """A callable's model that takes [0, 1] RGB and normalizes itself, as the README asks user models to."""
    return Normalized(make_net(5))


def make_legacy_net() -> nn.Module:
    """Says it normalizes itself in the way checkpoints from before ``normalize`` was recorded relied on."""
    net = make_net(5)
    net.qrobust_normalizes_input = True
    return net


class Payload:
    """Unpickling this writes a marker file: what a malicious .pt file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def images(n=2, h=64, w=64, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def trained(arch: str, num_classes: int = 10) -> Normalized:
    """A model whose weights and BN statistics differ from the seed-0 init, so loading is observable."""
    model = build_model(arch, num_classes)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.net.state_dict().items():
            if t.is_floating_point():
                t.copy_(t + 0.1 * torch.randn(t.shape, generator=g).abs() if "var" in name
                        else t + 0.1 * torch.randn(t.shape, generator=g))
    return model.eval()


def same_outputs(a: nn.Module, b: nn.Module, x=None) -> bool:
    x = images() if x is None else x
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_registry_lists_architectures_and_suggests_on_typo():
    assert ARCHITECTURES.names() == sorted(["resnet18", "resnet50", "mobilenet_v2", "regnetx_600mf",
                                            "tiny_cnn", "tiny_resnet"])
    assert ARCHITECTURES.names("tiny*") == list(SMALL)
    with pytest.raises(UnknownNameError, match="Did you mean resnet18") as e:
        load_model("resnt18")
    assert isinstance(e.value, QrobustError)


def test_regnetx_600mf_matches_pycls_parameter_count():
    assert sum(p.numel() for p in ARCHITECTURES.get("regnetx_600mf").build(1000).parameters()) == 6_196_040


def test_resnet18_builds_and_runs():
    model = build_model(ModelSpec("resnet18", 10)).eval()
    assert isinstance(model, Normalized) and same_outputs(model, build_model("resnet18", 10))  # seeded init
    with torch.no_grad():
        assert model(images()).shape == (2, 10)


@pytest.mark.parametrize("arch", SMALL)
@pytest.mark.parametrize("size", [(64, 64), (32, 45), (224, 224)])
def test_small_models_forward_any_size(arch, size):
    model = build_model(arch, 10).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 20_000 <= n_params <= 100_000
    with torch.no_grad():
        out = model(images(2, *size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", SMALL)
def test_normalization_happens_inside(arch):
    model = trained(arch)
    x = images()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.net((x - mean) / std), atol=1e-6)
        assert not torch.allclose(model(x), model.net(x), atol=1e-3)
    # mean/std are buffers outside the state dict, which is the inner net's alone
    assert all(k.startswith("net.") for k in model.state_dict())
    assert {n for n, _ in model.named_buffers()} >= {"mean", "std"}
    assert not any(n in ("mean", "std") for n, _ in model.named_parameters())


def test_bare_architecture_is_seeded_random_init_with_warning(caplog):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING, logger="qrobust.models"):
        a, spec, sha = load_model("tiny_cnn", num_classes=10)
    assert "randomly initialised" in caplog.text
    assert torch.equal(torch.rand(1), before)  # the caller's RNG is untouched
    b, _, _ = load_model("tiny_cnn", num_classes=10)
    assert same_outputs(a, b) and not a.training
    assert (spec, sha) == (ModelSpec("tiny_cnn", 10, source="init"), None)


def test_checkpoint_round_trip_needs_no_arguments(tmp_path):
    model = trained("tiny_resnet")
    spec = ModelSpec("tiny_resnet", 10)
    path = save_checkpoint(model, spec, tmp_path / "m.safetensors", extra_metadata={"qrobust.trained": {"epochs": 3}})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind
    meta = read_checkpoint_metadata(path)
    assert json.loads(meta["qrobust.model"])["arch"] == "tiny_resnet" and "qrobust.version" in meta
    assert json.loads(meta["qrobust.trained"]) == {"epochs": 3}
    loaded, loaded_spec, sha = load_model(str(path))
    assert same_outputs(model, loaded) and not loaded.training
    assert loaded_spec.name == spec.name == "tiny_resnet"
    assert (loaded_spec.source, loaded_spec.weights) == ("checkpoint", str(path))
    assert ModelSpec.from_dict({**loaded_spec.to_dict(), "source": "init", "weights": None}) == spec
    assert len(sha) == 64


def test_checkpoint_of_a_callable_model_round_trips(tmp_path):
    for normalize in ("none", "imagenet"):
        model, spec, _ = load_model("test_models:make_net", num_classes=3, normalize=normalize)
        assert isinstance(model, Normalized) == (normalize == "imagenet") and spec.normalize == normalize
        with torch.no_grad():
            inner = model.net if isinstance(model, Normalized) else model
            inner[0].weight.mul_(2)
        path = save_checkpoint(model, spec, tmp_path / f"c-{normalize}.safetensors")
        with pytest.raises(ModelError, match="may not choose code to run"):  # the file alone may not name code
            load_model(path)
        loaded, loaded_spec, _ = load_model("test_models:make_net", weights=path)  # the user names it
        assert same_outputs(model, loaded) and loaded_spec.arch == "test_models:make_net"
        assert loaded_spec.source == "checkpoint" and loaded_spec.normalize == normalize  # recorded, not guessed
        again_path = save_checkpoint(loaded, loaded_spec, tmp_path / f"again-{normalize}.safetensors")
        again, _, _ = load_model("test_models:make_net", weights=again_path)
        assert same_outputs(model, again)
        other = "imagenet" if normalize == "none" else "none"
        with pytest.raises(ModelError, match="contradicts it"):
            load_model("test_models:make_net", weights=path, normalize=other)
    # a callable that normalizes by itself (no num_classes argument) round trips too
    model, spec, _ = load_model("test_models:make_self_normalizing_net")
    with torch.no_grad():
        model.net[0].weight.mul_(2)
    loaded, _, _ = load_model("test_models:make_self_normalizing_net",
                              weights=save_checkpoint(model, spec, tmp_path / "s.safetensors"))
    assert same_outputs(model, loaded)


def test_callable_checkpoints_from_before_normalize_was_recorded_load_as_they_were_written(tmp_path):
    """Such a checkpoint's spec has no normalize: a callable was wrapped unless it said it normalizes itself."""
    for target, wrapped in (("test_models:make_net", True), ("test_models:make_legacy_net", False)):
        model, spec, _ = load_model(target, num_classes=5, normalize="imagenet" if wrapped else "none")
        old = {k: v for k, v in spec.to_dict().items() if k != "normalize"}
        path = write_safetensors({k: v.contiguous() for k, v in (model.net if wrapped else model).state_dict().items()},
                                 tmp_path / "old.safetensors", {"qrobust.model": json.dumps(old)})
        loaded, loaded_spec, _ = load_model(target, weights=path)
        assert loaded_spec.normalize is None and isinstance(loaded, Normalized) == wrapped
        assert same_outputs(model, loaded)
        chosen, chosen_spec, _ = load_model(target, weights=path, normalize="none")  # the user may say it now
        assert chosen_spec.normalize == "none" and not isinstance(chosen, Normalized)


def test_registered_architectures_keep_their_imagenet_normalization():
    model, spec, _ = load_model("tiny_cnn", num_classes=4, normalize="imagenet")
    assert isinstance(model, Normalized) and spec.normalize == "imagenet"
    assert ModelSpec("resnet18").normalize == "imagenet"
    assert ModelSpec.from_dict({"arch": "tiny_cnn", "num_classes": 4}).normalize == "imagenet"  # older specs
    with pytest.raises(ModelError, match="applies to module:callable models"):
        load_model("tiny_cnn", num_classes=4, normalize="none")
    with pytest.raises(ModelError, match="registered architecture"):
        ModelSpec("tiny_cnn", normalize="none")
    with pytest.raises(ModelError, match="normalize must be one of imagenet, none"):
        load_model("test_models:make_net", normalize="cifar")


def test_spec_dict_round_trip_name_and_errors(tmp_path):
    spec = ModelSpec("resnet18", quant={"method": "lsq", "w_bits": 4, "a_bits": 4})
    assert spec.name == "resnet18-lsq-w4a4"
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ModelError, match="unknown keys"):
        ModelSpec.from_dict({"arch": "resnet18", "pruning": 0.5})
    with pytest.raises(ModelError, match="source"):
        ModelSpec("resnet18", source="web")
    with pytest.raises(ModelError, match="lacks a_bits"):
        build_model(ModelSpec("tiny_cnn", 10, quant={"method": "lsq", "w_bits": 4}))


def test_quantized_checkpoint_loads_quantized_and_exact(tmp_path):
    """A quantized checkpoint rebuilds its quantizers from the spec alone: same outputs, never run as float."""
    from qrobust.shared.quant import QuantConv2d, calibrate, quantize_model

    model = trained("tiny_cnn")
    policy = quantize_model(model, "lsq", 4, 4)
    calibrate(model, [torch.rand(8, 3, 32, 32)])
    spec = ModelSpec("tiny_cnn", 10, quant=policy)
    loaded, loaded_spec, _ = load_model(save_checkpoint(model, spec, tmp_path / "q.safetensors"))
    assert loaded_spec.name == "tiny_cnn-lsq-w4a4" and loaded_spec.quant == policy
    assert any(isinstance(m, QuantConv2d) for m in loaded.modules())
    assert same_outputs(model.eval(), loaded)


@pytest.mark.parametrize("prefix", ["", "module.", "net.", "module.net."])
def test_state_dict_file_with_prefixes(tmp_path, prefix):
    model = trained("tiny_cnn")
    path = tmp_path / "w.pth"
    torch.save({prefix + k: v for k, v in model.net.state_dict().items()}, path)
    loaded, spec, sha = load_model("tiny_cnn", weights=path, num_classes=10)
    assert same_outputs(model, loaded)
    assert (spec.source, spec.weights, len(sha)) == ("state_dict", str(path), 64)


def test_plain_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file

    model = trained("tiny_cnn")
    path = tmp_path / "w.safetensors"
    save_file(model.net.state_dict(), str(path))
    assert same_outputs(model, load_model("tiny_cnn", weights=str(path), num_classes=10)[0])
    with pytest.raises(ModelError, match="not a qrobust checkpoint.*architecture"):
        load_model(str(path))


def test_mismatched_state_dict_names_keys_and_architecture(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build_model("tiny_resnet", 10).net.state_dict(), path)
    with pytest.raises(ModelError) as e:
        load_model("tiny_cnn", weights=path, num_classes=10)
    msg = str(e.value)
    assert "tiny_cnn" in msg and "missing" in msg and "unexpected" in msg and "\n" not in msg
    assert "0.0.weight" in msg and "stem.0.weight" in msg
    with pytest.raises(ModelError, match=r"shape mismatch.*5\.weight.*num_classes"):
        load_model("tiny_cnn", weights=_saved(tmp_path, "tiny_cnn", 10), num_classes=4)


def _saved(tmp_path: Path, arch: str, n: int) -> Path:
    path = tmp_path / f"{arch}-{n}.pt"
    torch.save(build_model(arch, n).net.state_dict(), path)
    return path


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    path, marker, witness = tmp_path / "evil.pt", tmp_path / "pwned", tmp_path / "witness"
    torch.save({"conv.weight": torch.zeros(1), "x": Payload(marker)}, path)
    # the payload is live: a plain (unsafe) load writes its marker ...
    torch.save({"x": Payload(witness)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert witness.exists()
    # ... but load_model refuses the file and never runs it
    with pytest.raises(ModelError, match="refused"):
        load_model("tiny_cnn", weights=path)
    assert not marker.exists()


def test_callable_models(tmp_path):
    """A callable's model gets [0, 1] RGB as it is unless --normalize imagenet is asked for."""
    model, spec, sha = load_model("test_models:make_net", num_classes=3)
    assert not isinstance(model, Normalized) and model(images()).shape == (2, 3)
    assert (spec.arch, spec.num_classes, spec.source, spec.normalize, sha) == \
        ("test_models:make_net", 3, "callable", "none", None)
    wrapped, spec, _ = load_model("test_models:make_net", num_classes=3, normalize="imagenet")
    assert isinstance(wrapped, Normalized) and spec.normalize == "imagenet"
    x = images()
    assert torch.equal(wrapped(x), model((x - wrapped.mean) / wrapped.std))  # the same net, normalized inputs
    model, spec, _ = load_model("test_models:make_self_normalizing_net")
    assert spec.num_classes == 5 and spec.normalize == "none"
    with pytest.raises(ModelError, match="5 classes, not 3"):
        load_model("test_models:make_self_normalizing_net", num_classes=3)
    with pytest.raises(ModelError, match="cannot load model callable"):
        load_model("test_models:no_such_function")


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelError, match="not found"):
        load_model("tiny_cnn", weights=tmp_path / "nope.pth")


def patch_torchvision_loader(monkeypatch, fn):
    """Replace torchvision's weights loader (``WeightsEnum.get_state_dict``): these tests never download."""
    import torchvision.models._api as api

    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", fn)


def test_unknown_torchvision_weights_are_clear_errors(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("tried to download weights")

    patch_torchvision_loader(monkeypatch, refuse)
    with pytest.raises(ModelError, match="unknown torchvision weights.*Did you mean IMAGENET1K_V1"):
        load_model("resnet18:IMAGENET1K_V9")
    with pytest.raises(ModelError, match="no weights for 'regnetx_600mf'"):
        load_model("regnetx_600mf:IMAGENET1K_V1")
    with pytest.raises(ModelError, match="1000 classes, not 10"):
        load_model("resnet18:IMAGENET1K_V1", num_classes=10)


def test_torchvision_weights_load_through_get_state_dict(monkeypatch):
    """The ``arch:NAME`` path without network: torchvision's loader returns a local state dict."""
    source = trained("resnet18", 1000)
    calls = []

    def fake(self, *args, **kwargs):
        calls.append((self, kwargs))
        return source.net.state_dict()

    patch_torchvision_loader(monkeypatch, fake)
    model, spec, _ = load_model("resnet18:DEFAULT")
    assert same_outputs(source, model)
    assert (spec.weights, spec.source) == ("ResNet18_Weights.IMAGENET1K_V1", "torchvision")
    assert calls[0][1]["weights_only"] is True and calls[0][1]["check_hash"] is True


def test_timm_regnetx_600mf_weights_load_with_identical_outputs(tmp_path):
    """timm's regnetx_006 (= pycls) state dict loads into our RegNetX-600MF by key renaming: same function."""
    timm = pytest.importorskip("timm")
    reference = timm.create_model("regnetx_006", pretrained=False, num_classes=10).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move off the init so that a wrong mapping shows
        for t in reference.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.02)
    path = tmp_path / "regnetx_006.pth"
    torch.save(reference.state_dict(), path)
    model, spec, _ = load_model("regnetx_600mf", weights=path, num_classes=10)
    x = images(2, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference((x - mean) / std), rtol=0, atol=1e-5)
