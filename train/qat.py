"""Float training and quantization-aware fine-tuning, writing self-describing checkpoints.

* :func:`train_fp` trains a float model from scratch (the demo's tiny model, tests);
* :func:`quantize` turns a float model into a DoReFa / PACT / LSQ one and fine-tunes it;
* :func:`quantize_grid` does that for method x bits, skipping finished ones;
* :func:`list_checkpoints` describes the checkpoints of a folder (``qrobust ls checkpoints``).

Every checkpoint is written by :func:`~qrobust.shared.models.save_checkpoint`
(a partial file renamed into place) and loads with ``load_model(path)`` alone:
its ``qrobust.model`` metadata holds the spec, quantization policy included,
and ``qrobust.training`` (JSON) how it was made: the recipe, the final metrics,
the data fingerprints, the class names and, for quantized models, the sha256 of
the float weights and the accuracy before fine-tuning. The training state lives
next to the checkpoint in ``<out>.train/`` (``state.safetensors``, ``log.jsonl``),
so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from qrobust.shared.checkpoints import read_checkpoint_metadata
from qrobust.shared.models import META_MODEL, META_VERSION, ModelError, ModelSpec, build_model, load_model, \
    read_checkpoint_spec, save_checkpoint
from qrobust.train.data import DataError, Loader, open_splits
from qrobust.train.loop import barrier, evaluate, is_main_process, setup_distributed, train
from qrobust.train.recipes import Recipe, TrainError, fp_recipe, qat_recipe

log = logging.getLogger("qrobust.train")

META_TRAINING = "qrobust.training"


def state_dir(out: str | os.PathLike) -> Path:
    """Where the training state of checkpoint ``out`` lives: ``<out>.train/``."""
    out = Path(out)
    return out.with_name(out.name + ".train")


def _out_path(out: str | os.PathLike, name: str) -> Path:
    """``out`` itself, or ``out/<name>.safetensors`` when ``out`` is a folder (existing, or ending in a slash)."""
    text = str(out)
    path = Path(os.path.expanduser(text))
    if path.is_dir() or text.endswith(("/", os.sep)):
        path = path / f"{name}.safetensors"
    if path.suffix != ".safetensors":
        raise TrainError(f"checkpoint path {path} must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _training_meta(kind: str, recipe: Recipe, result: dict, train_ds, val_ds, **extra) -> dict:
    return {"kind": kind, "recipe": recipe.to_dict(), "val_acc": result["val_acc"], "train_acc": result["train_acc"],
            "epochs": result["epochs"], "seconds": result["seconds"],
            "data": {"train": train_ds.fingerprint(), "val": val_ds.fingerprint()},
            "classes": list(train_ds.classes), "history": result["history"], **extra}


def _save(model, spec: ModelSpec, out: Path, meta: dict) -> Path:
    if is_main_process():
        save_checkpoint(model, spec, out, extra_metadata={META_TRAINING: json.dumps(meta, sort_keys=True)})
        log.info("wrote %s (val acc %.4f)", out, meta["val_acc"])
    barrier()
    return out


def train_fp(arch: str, train_root: str | os.PathLike, out: str | os.PathLike, *,
             val_root: str | os.PathLike | None = None, num_classes: int | None = None, recipe: Recipe | None = None,
             device: str | torch.device = "cpu", progress: bool = True, resume: bool = True) -> Path:
    """Train a float ``arch`` from scratch on an image folder or shards; return the checkpoint path.

    ``out`` is a ``.safetensors`` path, or a folder (then ``<arch>.safetensors`` in it).
    Without ``val_root``, a folder with ``train/`` and ``val/`` uses them, else a
    tenth of the training samples is held out. ``recipe`` defaults to
    :func:`~qrobust.train.recipes.fp_recipe`. Rerunning resumes from ``<out>.train/``
    (``resume=False``: start over).

    >>> train_fp("tiny_cnn", "data/train", "models/", val_root="data/val")  # doctest: +SKIP
    PosixPath('models/tiny_cnn.safetensors')
    """
    recipe = recipe or fp_recipe(arch)
    _, _, device = setup_distributed(device)
    train_ds, val_ds = open_splits(train_root, val_root, image_size=recipe.image_size, seed=recipe.seed,
                                   num_classes=num_classes)
    spec = ModelSpec(arch, num_classes or train_ds.num_classes)
    out = _out_path(out, spec.name)
    if resume and _finished(out, recipe, train_ds=train_ds, kind="fp"):
        return out  # rewriting it would change its bytes (timings), and with them every QAT child's source hash
    model = build_model(spec)
    result = train(model, train_ds, val_ds, recipe, state_dir(out), spec=spec, device=device, progress=progress,
                   context={"kind": "fp"}, resume=resume)
    return _save(model, spec, out, _training_meta("fp", recipe, result, train_ds, val_ds))


def _calibration_batches(train_ds, recipe: Recipe, count: int) -> list[torch.Tensor]:
    """``count`` batches of training images in a seeded order, center-cropped (no random augmentation)."""
    plain = train_ds.with_mode("val")
    order = torch.randperm(len(plain), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    batch = min(recipe.batch_size, 256)
    subset = plain.subset(order[:count * batch])
    return [x for x, _ in Loader(subset, batch, train=False, workers=0)][:count]


def reestimate_batchnorm(model: torch.nn.Module, batches: list[torch.Tensor]) -> int:
    """Recompute every BatchNorm's running statistics on ``batches`` through the quantized model.

    DoReFa/PACT weights live in [-1, 1], far from the float weights' scale, so the
    float model's BatchNorm statistics no longer fit; without this, the first
    epochs of fine-tuning are evaluated with stale statistics. Quantizer state
    does not change (no observers). Returns the number of BatchNorm layers.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return 0
    device = next(model.parameters()).device
    was_training = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches
        model.train()
        with torch.no_grad():
            for x in batches:
                model(x.to(device))
    finally:
        for m, training in was_training.items():
            m.train(training)
        for m, momentum in momenta.items():
            m.momentum = momentum
    return len(norms)


def quantize(fp_model: str, method: str, bits: int, train_root: str | os.PathLike, out: str | os.PathLike, *,
             weights: str | os.PathLike | None = None, val_root: str | os.PathLike | None = None,
             recipe: Recipe | None = None, first_last_bits: int | None = 8, calib_batches: int = 4,
             device: str | torch.device = "cpu", progress: bool = True, resume: bool = True) -> Path:
    """Quantize a float model (``bits`` for weights and activations) and fine-tune it; return the checkpoint.

    ``fp_model`` is a qrobust checkpoint, an architecture name with
    ``weights=FILE`` (a torchvision-style state dict; the classes come from the
    data), or ``arch:TORCHVISION_WEIGHTS`` (e.g. ``resnet18:IMAGENET1K_V1``). Steps: swap in the
    quantizers (first and last layer at ``first_last_bits``), calibrate on
    ``calib_batches`` seeded training batches (center crops), measure the
    validation accuracy before fine-tuning, fine-tune with
    :func:`~qrobust.train.loop.train` (``recipe`` defaults to
    :func:`~qrobust.train.recipes.qat_recipe`), save. ``out`` is a path or a folder
    (then ``<arch>-<method>-w<b>a<b>.safetensors``). Rerunning resumes from
    ``<out>.train/`` (``resume=False``: start over).

    >>> quantize("models/resnet18.safetensors", "lsq", 4, "imagenet/train", "models/")  # doctest: +SKIP
    PosixPath('models/resnet18-lsq-w4a4.safetensors')
    """
    from qrobust.shared.quant import calibrate, quantize_model

    _, _, device = setup_distributed(device)
    if calib_batches < 1:
        raise TrainError(f"calib_batches must be at least 1, not {calib_batches}")
    arch, n_classes, fp_sha = _fp_identity(fp_model, weights)
    recipe = recipe or qat_recipe(arch, bits)
    done = _out_path(out, ModelSpec(arch, quant={"method": method, "w_bits": bits, "a_bits": bits}).name)
    if resume and _finished(done, recipe, kind="qat", fp_source_sha256=fp_sha):
        return done
    train_ds, val_ds = open_splits(train_root, val_root, image_size=recipe.image_size, seed=recipe.seed,
                                   num_classes=n_classes)
    model, fp_spec, sha = load_model(fp_model, weights=weights,
                                     num_classes=train_ds.num_classes if n_classes is None else None)
    if fp_spec.quant:
        raise TrainError(f"{fp_model} is already quantized ({fp_spec.name}); start from a float model")
    if sha is None:
        raise TrainError(f"{fp_model}: no weights file to record (fp_source_sha256); pass weights=FILE")
    if train_ds.num_classes != fp_spec.num_classes:
        raise DataError(f"{train_root} has {train_ds.num_classes} classes, the model {fp_spec.num_classes}")
    fp_meta = _read_training_meta(fp_model) if Path(str(fp_model)).is_file() else {}
    fp_layout = fp_meta.get("data", {}).get("train", {}).get("layout")
    named = train_ds.layout != "shards" and fp_layout not in (None, "shards")  # shards' classes are numbers
    if named and fp_meta.get("classes") and fp_meta["classes"] != train_ds.classes:
        raise DataError(f"{train_root}: classes differ from those {fp_model} was trained on")
    policy = quantize_model(model, method, bits, bits, first_last_bits=first_last_bits)
    model.to(device)
    batches = _calibration_batches(train_ds, recipe, calib_batches)
    info = calibrate(model, batches)
    if info["uncalibrated"]:
        raise TrainError(f"calibration did not reach quantizers {', '.join(info['uncalibrated'][:3])}")
    info["bn_reestimated"] = reestimate_batchnorm(model, batches)
    spec = ModelSpec(fp_spec.arch, fp_spec.num_classes, quant=dict(policy, calibration=info),
                     normalize=fp_spec.normalize)
    out = _out_path(out, spec.name)
    val_before = evaluate(model, val_ds, batch_size=min(recipe.batch_size, 256), workers=recipe.workers,
                          device=device)
    log.info("%s: val acc %.4f after calibration, before fine-tuning", spec.name, val_before)
    result = train(model, train_ds, val_ds, recipe, state_dir(out), spec=spec, device=device, progress=progress,
                   context={"kind": "qat", "fp_source_sha256": sha, "calib_batches": calib_batches}, resume=resume)
    meta = _training_meta("qat", recipe, result, train_ds, val_ds, fp_source=str(fp_model),
                          fp_source_sha256=sha, fp_val_acc=fp_meta.get("val_acc"), val_acc_before=val_before,
                          calib_batches=calib_batches)
    return _save(model, spec, out, meta)


def _finished(out: Path, recipe: Recipe, *, train_ds=None, kind: str, **same) -> bool:
    """Whether ``out`` is a checkpoint this very training already wrote (same kind, recipe, data, sources)."""
    if not out.is_file():
        return False
    meta = _read_training_meta(out)
    if meta.get("kind") != kind or meta.get("recipe") != recipe.to_dict():
        return False
    if train_ds is not None and meta.get("data", {}).get("train") != json.loads(json.dumps(train_ds.fingerprint())):
        return False
    if any(meta.get(k) != v for k, v in same.items()):
        return False
    log.info("%s: finished already, kept", out)
    return True


def _read_training_meta(path) -> dict:
    try:
        meta = json.loads(read_checkpoint_metadata(path).get(META_TRAINING, "{}"))
    except (ModelError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return {}
    return meta if isinstance(meta, dict) else {}


def _fp_identity(fp_model: str, weights) -> tuple[str, int | None, str]:
    """The float model's architecture, classes (None: not recorded) and weights sha256, without building it."""
    from qrobust.shared.files import file_sha256

    path = Path(str(fp_model))
    if path.is_file() or path.suffix == ".safetensors":
        if path.suffix != ".safetensors":
            raise ModelError(f"{path} is not a qrobust checkpoint: name the architecture and pass weights=FILE")
        spec = read_checkpoint_spec(path)  # one-line ModelError naming the file for anything malformed
        if spec.quant:
            raise TrainError(f"{fp_model} is already quantized ({spec.name}); start from a float model")
        return spec.arch, spec.num_classes, file_sha256(path)
    if weights is not None:
        if not Path(weights).is_file():
            raise ModelError(f"weights file {weights} not found")
        return str(fp_model), None, file_sha256(weights)
    if ":" in str(fp_model):  # torchvision's weights, e.g. resnet18:IMAGENET1K_V1 (downloaded once, then cached)
        _, spec, sha = load_model(str(fp_model))
        if sha is not None:
            return spec.arch, spec.num_classes, sha
    raise TrainError(f"{fp_model} has no weights: quantizing a randomly initialised model means nothing; "
                     "pass a float checkpoint, an architecture with weights=FILE, or arch:TORCHVISION_WEIGHTS")


def quantize_grid(fp_model: str, methods, bits_list, train_root: str | os.PathLike, out_dir: str | os.PathLike,
                  **kw) -> list[Path]:
    """:func:`quantize` for every method x bits into ``out_dir/<arch>-<method>-w<b>a<b>.safetensors``.

    A checkpoint already there from the same float weights is kept (finished);
    one from other float weights is an error. ``kw`` goes to :func:`quantize`
    (``recipe``: one for all; default :func:`~qrobust.train.recipes.qat_recipe` per bits).

    >>> quantize_grid("models/resnet18.safetensors", ["lsq", "pact"], [2, 4], "train/", "models/")  # doctest: +SKIP
    """
    arch, _, sha = _fp_identity(fp_model, kw.get("weights"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for method in methods:
        for bits in bits_list:
            name = ModelSpec(arch, quant={"method": method, "w_bits": bits, "a_bits": bits}).name
            out = out_dir / f"{name}.safetensors"
            if out.is_file():
                meta = _read_training_meta(out)
                if meta.get("fp_source_sha256") == sha:
                    log.info("%s: finished already, kept", out)
                    wanted = kw.get("recipe")
                    if wanted is not None and meta.get("recipe") != wanted.to_dict():
                        log.warning("%s was made with another recipe; kept (delete it to retrain)", out)
                    paths.append(out)
                    continue
                raise TrainError(f"{out} exists but was not fine-tuned from {fp_model} "
                                 f"(fp_source_sha256 differs); move it away or choose another folder")
            paths.append(quantize(fp_model, method, bits, train_root, out, **kw))
    return paths


def list_checkpoints(directory: str | os.PathLike) -> list[dict]:
    """One dict per ``*.safetensors`` file of ``directory`` (sorted by name).

    A qrobust checkpoint gives ``file, name, arch, method, bits, w_bits, a_bits,
    classes, val_acc, version`` (method and bits are None for float models;
    ``val_acc`` None when unknown); any other file gives ``file`` and ``reason``
    (why it is not a usable qrobust checkpoint), with the other keys None.

    >>> [c["name"] for c in list_checkpoints("models")]  # doctest: +SKIP
    ['tiny_resnet', 'tiny_resnet-lsq-w4a4']
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TrainError(f"{directory} is not a folder")
    rows = []
    empty = dict.fromkeys(("name", "arch", "method", "bits", "w_bits", "a_bits", "classes", "val_acc", "version"))
    for path in sorted(directory.glob("*.safetensors")):
        row = {"file": str(path), **empty, "reason": None}
        try:
            meta = read_checkpoint_metadata(path)
        except ModelError as e:
            rows.append(dict(row, reason=str(e).removeprefix(f"{path}: ")))
            continue
        if META_MODEL not in meta:
            rows.append(dict(row, reason=f"no {META_MODEL!r} metadata: not a qrobust checkpoint "
                                         "(a plain state dict? load it with an architecture and weights=FILE)"))
            continue
        try:
            spec = read_checkpoint_spec(path)
        except ModelError as e:  # bad JSON (nested too deep too), not a spec, bad field types
            rows.append(dict(row, reason=str(e).removeprefix(f"{path}: ")))
            continue
        q = spec.quant or {}
        training = _read_training_meta(path)
        w, a = q.get("w_bits"), q.get("a_bits")
        rows.append(dict(row, name=spec.name, arch=spec.arch, method=q.get("method"),
                         bits=None if not q else (w if w == a else f"w{w}a{a}"), w_bits=w, a_bits=a,
                         classes=spec.num_classes, val_acc=training.get("val_acc"), version=meta.get(META_VERSION)))
    return rows



def fp_arch(fp_model: str) -> str:
    """The architecture of a float model named as :func:`quantize` takes it (checkpoint or ARCH:WEIGHTS)."""
    if ":" in str(fp_model) and not Path(str(fp_model)).is_file():
        return str(fp_model).partition(":")[0]
    return _fp_identity(fp_model, None)[0]
