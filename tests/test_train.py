"""Training: data (folders, shards), the loop (resume, refusal, DDP) and QAT checkpoints (offline, CPU)."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from qrobust.shared.demo_data import build_demo_dataset
from qrobust.shared.files import file_sha256
from qrobust.shared.checkpoints import read_checkpoint_metadata
from qrobust.shared.models import ModelSpec, build_model, load_model, save_checkpoint
from qrobust.train.data import Loader, open_data, open_splits
from qrobust.train.loop import evaluate, param_groups, train
from qrobust.train.qat import META_TRAINING, list_checkpoints, quantize, quantize_grid, state_dir, train_fp
from qrobust.train.recipes import Recipe, TrainError, lr_at, qat_recipe

SIZE = 32
CLASSES = 12
FP_RECIPE = Recipe(epochs=8, batch_size=32, lr=3e-3, warmup_epochs=0.5, optimizer="adam", weight_decay=5e-4,
                   image_size=SIZE, workers=0)
QAT_RECIPE = dataclasses.replace(FP_RECIPE, epochs=3, lr=1e-3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 classes of real photo crops: 24 train + 8 val per class, short side ~48 px."""
    return build_demo_dataset(tmp_path_factory.mktemp("demo"), train_per_class=24, val_per_class=8, short_side=48)


@pytest.fixture(scope="module")
def fp_ckpt(data, tmp_path_factory, one_torch_thread) -> Path:
    return train_fp("tiny_cnn", data / "train", tmp_path_factory.mktemp("models") / "tiny_cnn.safetensors",
                    val_root=data / "val", recipe=FP_RECIPE, progress=False)


@pytest.fixture(scope="module")
def qat_ckpts(fp_ckpt, data) -> dict:
    return {m: quantize(str(fp_ckpt), m, 4, data / "train", fp_ckpt.parent, val_root=data / "val",
                        recipe=QAT_RECIPE, progress=False) for m in ("dorefa", "lsq")}


def dropout_net(num_classes: int = CLASSES) -> torch.nn.Module:
    """Built as ``test_train:dropout_net``: dropout draws from the global RNG, which a resume must replay."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Dropout(0.3), nn.Linear(32, num_classes))


def training_meta(path: Path) -> dict:
    return json.loads(read_checkpoint_metadata(path)[META_TRAINING])


# --------------------------------------------------------------------------- schedule and recipes

def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    r = Recipe(epochs=10, batch_size=8, lr=0.1, warmup_epochs=1, warmup_lr=1e-4)
    lrs = [lr_at(s, 100, 10, r) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[5] == pytest.approx(1e-4 + (0.1 - 1e-4) / 2)
    assert lrs[10] == pytest.approx(0.1) and lrs[55] == pytest.approx(0.05)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a > b for a, b in zip(lrs[10:], lrs[11:]))


def test_qat_recipes_follow_mqbench_academic_settings():
    r18, r50, mbv2, reg = (qat_recipe(a, 4) for a in ("resnet18", "resnet50", "mobilenet_v2", "regnetx_600mf"))
    assert (r18.lr, r18.batch_size, r18.weight_decay, r18.optimizer, r18.nesterov) == (0.004, 512, 1e-4, "sgd", True)
    assert (r50.lr, r50.batch_size) == (0.004, 256) and (reg.lr, reg.batch_size) == (0.004, 512)
    assert (mbv2.lr, mbv2.weight_decay) == (0.01, 1e-5)
    assert r18.bn_weight_decay == 0 and r18.label_smoothing == 0.1 and r18.warmup_lr == 1e-4 and r18.epochs == 100
    assert qat_recipe("resnet18", 2) == qat_recipe("resnet18", 6) == r18  # documented choice: 4-bit recipe
    with pytest.raises(TrainError, match="optimizer"):
        Recipe(epochs=1, batch_size=8, lr=0.1, warmup_epochs=0, optimizer="rmsprop")


# --------------------------------------------------------------------------- data

def test_folder_data_are_float_images_in_unit_range_and_augmentation_is_seeded(data):
    train_ds, val_ds = open_splits(data / "train", data / "val", image_size=SIZE, seed=3)
    assert (len(train_ds), len(val_ds), train_ds.num_classes) == (24 * CLASSES, 8 * CLASSES, CLASSES)
    x, y = val_ds[0]
    assert x.dtype == torch.float32 and x.shape == (3, SIZE, SIZE) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(val_ds[0][0], x)  # validation: no randomness
    a, b = train_ds[5][0], train_ds[5][0]
    train_ds.set_epoch(1)
    c = train_ds[5][0]
    assert torch.equal(a, b) and not torch.equal(a, c)  # same (seed, epoch, key) -> same crop; next epoch differs
    rng = torch.get_rng_state()
    train_ds[7]
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is left alone


def test_validation_data_are_found_beside_the_training_data(data, tmp_path, caplog):
    given = open_splits(data / "train", data / "val", image_size=SIZE)[1]
    for train_root in (data / "train", data):  # `--train data/train` (sibling val/), `--train data` (train/, val/)
        train_ds, val_ds = open_splits(train_root, image_size=SIZE)
        assert [it.key for it in val_ds.items] == [it.key for it in given.items] and len(train_ds) == 24 * CLASSES
    lone = tmp_path / "train"  # a folder named train with no val beside it: a held-out tenth, logged
    shutil.copytree(data / "train", lone)
    with caplog.at_level("WARNING", logger="qrobust"):
        train_ds, val_ds = open_splits(lone, image_size=SIZE)
    assert len(val_ds) == 2 * CLASSES and len(train_ds) == 22 * CLASSES  # the 10th and 20th of each class
    assert "holding out" in caplog.text


def test_loader_order_and_crops_do_not_depend_on_worker_count(data):
    train_ds, _ = open_splits(data / "train", data / "val", image_size=SIZE)
    small = train_ds.subset(range(0, len(train_ds), 6))
    batches = {}
    for workers in (0, 2):
        loader = Loader(small, 8, train=True, seed=1, workers=workers)
        loader.set_epoch(2)
        batches[workers] = [(x, y) for x, y in loader]
    assert len(batches[0]) == len(small) // 8
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    loader = Loader(small, 8, train=True, seed=1)
    loader.set_epoch(3)
    assert not torch.equal(next(iter(loader))[1], batches[0][0][1])  # a new epoch reshuffles


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_webdataset_shards_yield_good_samples_and_report_bad_ones(data, tmp_path, caplog):
    import webdataset as wds

    files = sorted((data / "val").glob("*/*.jpg"))[::8][:6]  # one image of each of 6 classes
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = []
    for s in range(2):
        with wds.TarWriter(str(shards / f"part-{s:06d}.tar")) as sink:
            for i, f in enumerate(files[s * 3:(s + 1) * 3]):
                label = 3 * s + i
                sink.write({"__key__": f"s{s}_{i:03d}", "jpg": f.read_bytes(), "cls": label,
                            "json": {"note": "ignored"}})
                expected.append(label)
            if s == 1:
                sink.write({"__key__": "s1_bad", "jpg": b"\xff\xd8not really a jpeg", "cls": 1})
                sink.write({"__key__": "s1_nolabel", "png": f.read_bytes()})
                sink.write({"__key__": "s1_pickle", "pyd": b"\x80\x04K\x01.", "cls": 2})  # never unpickled
    ds = open_data(shards, image_size=SIZE)
    assert ds.layout == "shards" and ds.num_classes == 6
    assert [k for k, _ in ds.rejected] == ["part-000001.tar:s1_nolabel", "part-000001.tar:s1_pickle"]
    with caplog.at_level(logging.WARNING, logger="qrobust.train.data"):
        loader = Loader(ds, 4, train=False)
        got = [(x, y) for x, y in loader]
    labels = torch.cat([y for _, y in got]).tolist()
    assert labels == expected and all(x.shape[1:] == (3, SIZE, SIZE) for x, _ in got)
    assert list(loader.bad) == ["part-000001.tar:s1_bad"]
    assert "s1_bad" in caplog.text
    assert len(open_data(str(shards / "*.tar"), image_size=SIZE)) == len(ds)  # a glob names the same shards
    # the same image decoded from the shard and from its file
    folder_x = open_data(data / "val", image_size=SIZE)
    first = next(i for i, it in enumerate(folder_x.items) if Path(it.path) == files[0])
    assert torch.equal(ds[0][0], folder_x[first][0])


# --------------------------------------------------------------------------- the loop

def _small_splits(data):
    train_ds, val_ds = open_splits(data / "train", data / "val", image_size=SIZE)
    return train_ds.subset(range(0, len(train_ds), 3)), val_ds.subset(range(0, len(val_ds), 2))


def test_resume_is_bit_exact_and_a_different_recipe_is_refused(data, tmp_path):
    train_ds, val_ds = _small_splits(data)
    recipe = dataclasses.replace(FP_RECIPE, epochs=2, optimizer="sgd", lr=0.05)  # SGD: momentum state resumes
    spec = ModelSpec("test_train:dropout_net", CLASSES, source="callable")
    rng = torch.get_rng_state()
    straight = build_model(spec)
    result = train(straight, train_ds, val_ds, recipe, tmp_path / "straight", spec=spec, progress=False)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is untouched
    assert result["epochs"] == 2 and result["finished"] and not straight.training

    first = train(build_model(spec), train_ds, val_ds, recipe, tmp_path / "resumed", spec=spec, progress=False,
                  stop_after=1)
    assert first["epochs"] == 1 and not first["finished"]
    resumed = build_model(spec)
    second = train(resumed, train_ds, val_ds, recipe, tmp_path / "resumed", spec=spec, progress=False)
    assert second["epochs"] == 2 and second["val_acc"] == result["val_acc"]
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and {"step", "lr", "train_loss", "train_acc", "val_acc",
                                                    "seconds"} <= set(log[0])

    other = dataclasses.replace(recipe, lr=0.01)
    with pytest.raises(TrainError, match=r"recipe\.lr") as e:
        train(build_model(spec), train_ds, val_ds, other, tmp_path / "resumed", spec=spec, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(TrainError, match="spec"):
        train(build_model("tiny_cnn", CLASSES), train_ds, val_ds, recipe, tmp_path / "resumed",
              spec=ModelSpec("tiny_resnet", CLASSES), progress=False)
    fresh = train(build_model(spec), train_ds, val_ds, dataclasses.replace(other, epochs=1), tmp_path / "resumed",
                  spec=spec, progress=False, resume=False)
    assert fresh["epochs"] == 1  # started over

    # the checkpoint of the in-memory model loads alone and computes the same thing
    path = save_checkpoint(straight, spec, tmp_path / "straight.safetensors")
    loaded, _, _ = load_model("test_train:dropout_net", weights=str(path))  # a callable is named by the user
    x = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), straight(x))


def test_state_file_holds_no_pickle_and_optimizer_tensors(data, tmp_path):
    train_ds, val_ds = _small_splits(data)
    spec = ModelSpec("tiny_cnn", CLASSES)
    recipe = dataclasses.replace(FP_RECIPE, epochs=1)
    train(build_model(spec), train_ds, val_ds, recipe, tmp_path, spec=spec, progress=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "state.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["qrobust.train_state"])
    assert any(k.startswith("optim/") and k.endswith("/exp_avg") for k in keys)  # Adam moments, as tensors
    assert any(k.startswith("model/") for k in keys)
    assert meta["epoch"] == 1 and meta["recipe"] == recipe.to_dict()
    groups = {g["name"]: g["weight_decay"] for g in meta["optimizer"]["param_groups"]}
    assert groups == {"weights": 5e-4, "norm": 0.0, "bias": 0.0}


# --------------------------------------------------------------------------- float and QAT checkpoints

def test_train_fp_learns_the_photos_and_records_how(fp_ckpt, data):
    meta = training_meta(fp_ckpt)
    assert meta["val_acc"] > 3 / CLASSES  # far above chance (1/12)
    assert meta["recipe"] == FP_RECIPE.to_dict() and meta["epochs"] == FP_RECIPE.epochs
    assert meta["data"]["train"]["samples"] == 24 * CLASSES and meta["classes"] == sorted(meta["classes"])
    model, spec, _ = load_model(str(fp_ckpt))
    _, val_ds = open_splits(data / "train", data / "val", image_size=SIZE)
    assert spec.arch == "tiny_cnn" and not spec.quant
    assert evaluate(model, val_ds) == pytest.approx(meta["val_acc"], abs=1 / len(val_ds))  # the weights validated
    assert (state_dir(fp_ckpt) / "log.jsonl").is_file()


@pytest.mark.parametrize("method", ["dorefa", "lsq"])
def test_qat_recovers_the_float_accuracy(qat_ckpts, fp_ckpt, data, method):
    path = qat_ckpts[method]
    assert path.name == f"tiny_cnn-{method}-w4a4.safetensors"
    meta, fp = training_meta(path), training_meta(fp_ckpt)
    assert meta["fp_source_sha256"] == file_sha256(fp_ckpt) and meta["recipe"] == QAT_RECIPE.to_dict()
    assert meta["val_acc"] >= 0.8 * fp["val_acc"]  # recovers most of the float accuracy
    if method == "dorefa":  # DoReFa's clip to [0, 1] costs accuracy even with re-estimated BatchNorm: QAT repairs it
        assert meta["val_acc"] > meta["val_acc_before"]
    else:  # LSQ's calibrated steps are good already: fine-tuning must not lose much
        assert meta["val_acc"] >= meta["val_acc_before"] - 0.1
    model, spec, _ = load_model(str(path))  # the checkpoint alone rebuilds the quantized model
    assert spec.quant["method"] == method and spec.quant["w_bits"] == spec.quant["a_bits"] == 4
    assert spec.quant["first_last_bits"] == 8 and spec.quant["calibration"]["bn_reestimated"] > 0
    assert any(type(m).__name__ == "QuantConv2d" for m in model.modules())
    _, val_ds = open_splits(data / "train", data / "val", image_size=SIZE)
    assert evaluate(model, val_ds) == pytest.approx(meta["val_acc"], abs=1 / len(val_ds))


def test_quantized_checkpoint_gives_the_in_memory_outputs(fp_ckpt, data, tmp_path):
    from qrobust.shared.quant import calibrate, quantize_model

    train_ds, val_ds = _small_splits(data)
    model, fp_spec, _ = load_model(str(fp_ckpt))
    policy = quantize_model(model, "pact", 4, 4)
    calibrate(model, [torch.stack([val_ds[i][0] for i in range(8)])])
    spec = dataclasses.replace(fp_spec, quant=policy, weights=None, source="init")
    train(model, train_ds, val_ds, dataclasses.replace(QAT_RECIPE, epochs=1), tmp_path / "run", spec=spec,
          progress=False)
    decay = {g["name"]: (len(g["params"]), g["weight_decay"]) for g in param_groups(model, QAT_RECIPE)}
    assert decay["pact_alpha"] == (3, QAT_RECIPE.pact_alpha_decay) and decay["norm"][1] == 0  # 3 quantized inputs
    alpha = [m.alpha.item() for m in model.modules() if hasattr(m, "alpha")]
    assert alpha and any(a != 10.0 for a in alpha)  # PACT's clipping levels were trained
    path = save_checkpoint(model, spec, tmp_path / "pact.safetensors")
    loaded, _, _ = load_model(str(path))
    x = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_grid_skips_finished_checkpoints_and_ls_lists_them(qat_ckpts, fp_ckpt, data):
    before = qat_ckpts["lsq"].stat().st_mtime_ns
    paths = quantize_grid(str(fp_ckpt), ["lsq"], [4], data / "train", fp_ckpt.parent, val_root=data / "val",
                          recipe=QAT_RECIPE, progress=False)
    assert paths == [qat_ckpts["lsq"]] and qat_ckpts["lsq"].stat().st_mtime_ns == before

    from safetensors.torch import save_file

    folder = fp_ckpt.parent
    save_file({"w": torch.zeros(2)}, str(folder / "plain.safetensors"))
    (folder / "junk.safetensors").write_bytes(b"not a safetensors file")
    rows = {Path(r["file"]).name: r for r in list_checkpoints(folder)}
    assert set(rows) == {"tiny_cnn.safetensors", "tiny_cnn-dorefa-w4a4.safetensors",
                         "tiny_cnn-lsq-w4a4.safetensors", "plain.safetensors", "junk.safetensors"}
    lsq = rows["tiny_cnn-lsq-w4a4.safetensors"]
    assert (lsq["name"], lsq["arch"], lsq["method"], lsq["bits"], lsq["classes"]) == \
        ("tiny_cnn-lsq-w4a4", "tiny_cnn", "lsq", 4, CLASSES)
    assert lsq["val_acc"] == training_meta(qat_ckpts["lsq"])["val_acc"] and lsq["reason"] is None
    fp = rows["tiny_cnn.safetensors"]
    assert fp["method"] is None and fp["bits"] is None and fp["version"]
    assert "not a qrobust checkpoint" in rows["plain.safetensors"]["reason"]
    assert rows["junk.safetensors"]["reason"] and rows["junk.safetensors"]["name"] is None


# --------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import sys, json
import torch.distributed as dist
from qrobust.train.qat import train_fp
from qrobust.train.recipes import Recipe
data, out = sys.argv[1], sys.argv[2]
r = Recipe(epochs=2, batch_size=32, lr=3e-3, warmup_epochs=0.5, optimizer="adam", image_size=32, workers=0)
path = train_fp("tiny_cnn", data + "/train", out, val_root=data + "/val", recipe=r, progress=False)
print(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "path": str(path)}))
"""


def test_ddp_with_torchrun_on_cpu_writes_one_loadable_checkpoint(data, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out = tmp_path / "ddp" / "tiny_cnn.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(data), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the two ranks print at the same time, so their lines can run together: take each {...} object
    reports = sorted((json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", proc.stdout)), key=lambda r: r["rank"])
    assert [(r["rank"], r["world"]) for r in reports] == [(0, 2), (1, 2)]
    model, spec, _ = load_model(str(out))
    assert spec.arch == "tiny_cnn"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".train"]  # rank 0 alone wrote
    meta = training_meta(out)
    log = [json.loads(line) for line in (state_dir(out) / "log.jsonl").read_text().splitlines()]
    # the recipe's batch is global: 288 samples / 32 = 9 steps per epoch on 2 ranks as on one
    assert [r["step"] for r in log] == [9, 18] and meta["epochs"] == 2 and 0 <= meta["val_acc"] <= 1


def test_batchnorm_reestimation_fits_the_quantized_model():
    """DoReFa weights live in [-1, 1]: the float statistics are stale; re-estimated ones match the new activations."""
    from qrobust.shared.models import build_model
    from qrobust.shared.quant import calibrate, quantize_model
    from qrobust.train.qat import reestimate_batchnorm

    model = build_model("tiny_cnn", 4).eval()
    batches = [torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    quantize_model(model, "dorefa", 4, 4)
    calibrate(model, batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn = model.net[0][1]
    captured = []
    hook = bn.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
    assert reestimate_batchnorm(model, batches) == 3
    hook.remove()
    x = torch.cat(captured)
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)), rtol=1e-3, atol=1e-4)
    assert bn.momentum == 0.1 and not model.training  # restored
    after = model.state_dict()
    quant_keys = [k for k in before if "quant" in k]
    assert quant_keys and all(torch.equal(before[k], after[k]) for k in quant_keys)  # quantizer state untouched


def test_rerun_of_a_finished_training_keeps_the_checkpoint_bytes(fp_ckpt, qat_ckpts, data):
    """A second `qrobust train` / `quantize` with the same recipe returns the checkpoint untouched (its sha256
    is the QAT children's fp_source_sha256, so rewriting it would orphan them)."""
    from qrobust.train.qat import quantize, train_fp

    before = {p: p.read_bytes() for p in (fp_ckpt, qat_ckpts["lsq"])}
    assert train_fp("tiny_cnn", data / "train", fp_ckpt, val_root=data / "val", recipe=FP_RECIPE,
                    progress=False) == fp_ckpt
    assert quantize(str(fp_ckpt), "lsq", 4, data / "train", qat_ckpts["lsq"], val_root=data / "val",
                    recipe=QAT_RECIPE, progress=False) == qat_ckpts["lsq"]
    assert {p: p.read_bytes() for p in before} == before
