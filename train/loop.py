"""The training loop: float training from scratch and quantization-aware fine-tuning share it.

It runs a :class:`~qrobust.train.recipes.Recipe` (the settings, their defaults per
architecture and the learning-rate schedule live in :mod:`qrobust.train.recipes`):

* cosine learning rate with linear warmup from ``warmup_lr``, set every step;
* SGD with Nesterov momentum, or Adam (tiny models trained from scratch);
* weight decay on conv/linear weights only: none on BatchNorm parameters
  (``bn_weight_decay``, 0 by default) and biases, none on quantizer parameters
  except PACT's clipping level alpha, which gets the L2 penalty of the PACT
  paper (``pact_alpha_decay``);
* cross entropy with label smoothing;
* per-epoch validation top-1, appended to ``out_dir/log.jsonl`` and shown on a
  tqdm bar;
* resumable: after every epoch ``out_dir/state.safetensors`` is replaced
  atomically. It holds the model state dict (``model/<name>``), the optimizer
  state tensors (``optim/<param>/<name>``, the rest of the optimizer state as a
  JSON index in the metadata), the epoch, step, recipe, model spec and data
  fingerprints. No pickle anywhere. Randomness is derived, not stored: the
  global torch RNG is reseeded from (seed, epoch, rank) at every epoch start
  and every training sample's augmentation from (seed, epoch, key), so a
  resumed run ends with the same weights, bit for bit on CPU, as an
  uninterrupted one. A state file made with another recipe, spec or data is
  refused with a one-line message (``resume=False`` starts over);
* DDP when started by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on CUDA, Gloo
  on CPU, a ``DistributedSampler``, ``recipe.batch_size`` is the global batch,
  only rank 0 writes.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qrobust.shared.files import write_atomic
from qrobust.shared.seeding import sample_seed
from qrobust.train.recipes import Recipe, TrainError, lr_at
from qrobust.train.state import (STATE_NAME, STATE_SCHEMA, first_difference, jsonable, optimizer_state, read_state,
                                 save_state)

log = logging.getLogger("qrobust.train")

LOG_NAME = "log.jsonl"
# recipe fields that may change between a run and its resumption (they do not change the result)
RESUME_FREE = ("workers",)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
WEIGHT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# --------------------------------------------------------------------------- distributed

def setup_distributed(device: str | torch.device = "cpu") -> tuple[int, int, torch.device]:
    """``(rank, world size, device)``; joins the process group when started by torchrun.

    Idempotent. On CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        from qrobust.shared.distributed import init_process_group

        init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_teardown)
    return dist.get_rank(), dist.get_world_size(), device


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def is_main_process() -> bool:
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    dist = _dist()
    if dist is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int = 256, workers: int = 0,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on a dataset or a :class:`~qrobust.train.data.Loader`.

    Under DDP each rank scores its strided share and the counts are summed.
    """
    from qrobust.train.data import Loader

    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    loader = data if isinstance(data, Loader) else Loader(data, batch_size, train=False, workers=workers,
                                                           rank=rank, world=world)
    device = torch.device(device)
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    correct, total = _all_sum([correct, total], device)
    return correct / total if total else float("nan")


# --------------------------------------------------------------------------- optimizer

def _quantizer_like(module: nn.Module) -> bool:
    return type(module).__module__.startswith("qrobust.shared.quant")


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """Parameters split by weight decay: conv/linear weights, norm layers, biases, quantizers, PACT alpha."""
    groups = {"weights": [], "norm": [], "bias": [], "quantizer": [], "pact_alpha": []}
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, WEIGHT_TYPES) and name == "weight":
                groups["weights"].append(p)
            elif isinstance(module, NORM_TYPES):
                groups["norm"].append(p)
            elif name == "bias" and isinstance(module, WEIGHT_TYPES):
                groups["bias"].append(p)
            elif _quantizer_like(module) or isinstance(module, WEIGHT_TYPES):
                groups["pact_alpha" if "alpha" in name else "quantizer"].append(p)
            else:  # parameters of other layers: decay matrices, not vectors
                groups["weights" if p.ndim > 1 else "bias"].append(p)
    decay = {"weights": recipe.weight_decay, "norm": recipe.bn_weight_decay, "bias": 0.0, "quantizer": 0.0,
             "pact_alpha": recipe.pact_alpha_decay}
    return [{"params": ps, "weight_decay": decay[g], "name": g} for g, ps in groups.items() if ps]


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    groups = param_groups(model, recipe)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr, betas=(0.9, 0.999))
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov and recipe.momentum > 0)


# --------------------------------------------------------------------------- training

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train(model: nn.Module, train_data, val_data, recipe: Recipe, out_dir: str | os.PathLike, *, spec,
          device: str | torch.device = "cpu", resume: bool = True, progress: bool = True,
          log: Callable[[dict], None] | None = None, context: dict | None = None,
          stop_after: int | None = None) -> dict:
    """Train ``model`` in place by ``recipe``; return ``{"val_acc", "train_acc", "epochs", "seconds", ...}``.

    ``train_data`` / ``val_data`` are map-style datasets of ``(image in [0, 1], label)``
    (:class:`~qrobust.train.data.ImageData`); the loaders are made here from
    the recipe. ``spec`` (the :class:`~qrobust.shared.models.ModelSpec`),
    ``context`` (any JSON facts that must not change, e.g. the source weights'
    hash) and the data fingerprints identify the run: a state file in
    ``out_dir`` made by another run is refused unless ``resume=False``.
    ``log`` is called with each epoch's record (rank 0). ``stop_after=N`` stops
    once N epochs are finished, as an interruption would (the state stays for
    a later call). The model is left in eval mode on ``device``; its
    parameters hold the final weights.
    """
    rank, world, device = setup_distributed(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the caller's RNG comes back as it was
        return _train(model, train_data, val_data, recipe, Path(out_dir), spec=spec, device=device, rank=rank,
                      world=world, resume=resume, progress=progress, callback=log, context=context or {},
                      stop_after=stop_after)


def _train(model, train_data, val_data, recipe: Recipe, out_dir: Path, *, spec, device, rank, world, resume,
           progress, callback, context, stop_after) -> dict:
    from qrobust.shared.progress import bar as progress_bar
    from qrobust.train.data import Loader

    if getattr(train_data, "image_size", recipe.image_size) != recipe.image_size:
        raise TrainError(f"training data made for {train_data.image_size} px, the recipe says {recipe.image_size}")
    if recipe.batch_size % world:
        raise TrainError(f"global batch {recipe.batch_size} does not split over {world} ranks")
    per_rank = recipe.batch_size // world
    main = rank == 0
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    pin = device.type == "cuda"
    train_loader = Loader(train_data, per_rank, train=True, seed=recipe.seed, workers=recipe.workers, rank=rank,
                          world=world, pin_memory=pin)
    val_loader = Loader(val_data, per_rank, train=False, workers=recipe.workers, rank=rank, world=world,
                        pin_memory=pin)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0 and recipe.epochs:
        raise TrainError(f"no training batches: {len(train_data)} samples over {world} ranks")
    total_steps = recipe.epochs * steps_per_epoch
    warmup_steps = int(round(recipe.warmup_epochs * steps_per_epoch))

    fingerprint = lambda d: d.fingerprint() if hasattr(d, "fingerprint") else {"samples": len(d)}  # noqa: E731
    identity = jsonable({
        "recipe": {k: v for k, v in recipe.to_dict().items() if k not in RESUME_FREE},
        "spec": spec.to_dict() if hasattr(spec, "to_dict") else spec,
        "data": {"train": fingerprint(train_data), "val": fingerprint(val_data)},
        "context": context,
    })
    net = _unwrap(model).to(device)
    optimizer = make_optimizer(net, recipe)
    state_path, log_path = out_dir / STATE_NAME, out_dir / LOG_NAME
    start_epoch, history = 0, []
    if state_path.is_file() and resume:
        meta, tensors = read_state(state_path)
        diff = first_difference(meta.get("identity"), identity)
        if diff:
            raise TrainError(f"{state_path} is from a different training run ({diff}); "
                             f"delete {out_dir} or start over with resume=False")
        model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        try:
            net.load_state_dict(model_sd, strict=True)
            optimizer.load_state_dict(optimizer_state(meta, tensors))
            start_epoch, history = int(meta["epoch"]), list(meta.get("history", []))
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TrainError(f"{state_path} does not fit this model: {first}; delete it or pass resume=False") \
                from None
        if meta.get("world_size", 1) != world:
            log.warning("resuming a %d-rank run on %d ranks: same recipe, not bit-identical",
                        meta.get("world_size", 1), world)
        if main:
            log.info("resuming %s from epoch %d of %d", out_dir, start_epoch, recipe.epochs)
    elif state_path.is_file() and main:
        log.info("resume=False: starting over, replacing %s", state_path)
        state_path.unlink()
        log_path.unlink(missing_ok=True)
    barrier()

    ddp = net
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=False)  # quantizers take part too
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    end_epoch = recipe.epochs if stop_after is None else min(recipe.epochs, max(stop_after, start_epoch))
    bar = progress_bar(total_steps, f"train {getattr(spec, 'name', '')}".strip(), "step", enabled=progress and main,
                       initial=start_epoch * steps_per_epoch, leave=False)
    try:
        for epoch in range(start_epoch, end_epoch):
            t0 = time.perf_counter()
            torch.manual_seed(sample_seed(recipe.seed, f"train/epoch-{epoch}", f"rank-{rank}"))
            train_loader.set_epoch(epoch)
            ddp.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            step = epoch * steps_per_epoch
            lr = lr_at(step, total_steps, warmup_steps, recipe)
            for i, (x, y) in enumerate(train_loader):
                step = epoch * steps_per_epoch + i
                lr = lr_at(step, total_steps, warmup_steps, recipe)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = ddp(x)
                loss = criterion(out, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach().double() * len(y)
                correct += (out.detach().argmax(1) == y).sum()
                seen += len(y)
                bar.update(1)
            loss_total, correct_total, seen_total = _all_sum([float(loss_sum), float(correct), seen], device)
            if not math.isfinite(loss_total):
                raise TrainError(f"training loss is {loss_total} in epoch {epoch + 1} (lr {lr:.3g}): "
                                 "lower the learning rate")
            val_acc = evaluate(net, val_loader, device=device)
            record = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "lr": lr,
                      "train_loss": loss_total / max(1, seen_total), "train_acc": correct_total / max(1, seen_total),
                      "val_acc": val_acc, "seconds": round(time.perf_counter() - t0, 3),
                      "bad_images": len(train_loader.bad) + len(val_loader.bad)}
            history.append(record)
            if main:
                meta = {"schema": STATE_SCHEMA, "identity": identity, "recipe": recipe.to_dict(),
                        "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "world_size": world,
                        "rng": "torch.manual_seed(sample_seed(seed, 'train/epoch-<e>', 'rank-<r>')) per epoch; "
                               "augmentation seeded per sample from (seed, epoch, key)",
                        "history": history}
                save_state(state_path, net, optimizer, meta)
                write_atomic(log_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))
                bar.set_postfix(epoch=f"{epoch + 1}/{recipe.epochs}", loss=f"{record['train_loss']:.3f}",
                                val=f"{100 * val_acc:.1f}%")
                log.info("epoch %d/%d: loss %.4f, train acc %.4f, val acc %.4f (%.1f s)", epoch + 1, recipe.epochs,
                         record["train_loss"], record["train_acc"], val_acc, record["seconds"])
                if callback is not None:
                    callback(record)
    finally:
        bar.close()
    barrier()
    net.eval()
    finished = len(history) >= recipe.epochs
    if history:
        last = history[-1]
        val_acc, train_acc = last["val_acc"], last["train_acc"]
    else:  # zero epochs: the model as given
        val_acc, train_acc = evaluate(net, val_loader, device=device), None
    return {"val_acc": val_acc, "train_acc": train_acc, "epochs": len(history), "finished": finished,
            "seconds": round(sum(r["seconds"] for r in history), 3),
            "bad_images": sorted(set(train_loader.bad) | set(val_loader.bad)), "history": history}
