"""The training state file: what a killed training run resumes from.

One safetensors file (model and optimizer tensors, the rest as JSON metadata),
written atomically after every epoch; never unpickled. A state written by
another recipe, data set or source model is refused, naming the first
difference (:func:`first_difference`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qrobust.shared.checkpoints import write_safetensors
from qrobust.train.recipes import TrainError

STATE_NAME = "state.safetensors"
STATE_SCHEMA = "qrobust.train_state/1"
META_STATE = "qrobust.train_state"


def jsonable(x):
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Write the training state atomically (safetensors; optimizer tensors flattened, the rest JSON)."""

    tensors = {f"model/{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    osd = optimizer.state_dict()
    index = {}
    for pid, state in osd["state"].items():
        entry = {}
        for name, value in state.items():
            if torch.is_tensor(value):
                key = f"optim/{pid}/{name}"
                tensors[key] = value.detach().cpu().clone()
                entry[name] = {"tensor": key}
            else:
                entry[name] = {"value": value}
        index[str(pid)] = entry
    meta = dict(meta, optimizer={"state": index, "param_groups": osd["param_groups"]})
    write_safetensors(tensors, path, {META_STATE: json.dumps(jsonable(meta), sort_keys=True)})


def read_state(path: Path) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a state file; :class:`TrainError` if it is not one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_STATE])
        tensors = load_file(str(path))
    except Exception as e:  # malformed header, missing key, bad JSON
        raise TrainError(f"{path}: not a readable qrobust training state ({type(e).__name__}: {e}); "
                         "delete it or pass resume=False") from None
    if not isinstance(meta, dict):
        raise TrainError(f"{path}: not a qrobust training state ({META_STATE} holds {type(meta).__name__}); "
                         "delete it or pass resume=False")
    if meta.get("schema") != STATE_SCHEMA:
        raise TrainError(f"{path}: training state schema {meta.get('schema')!r}, expected {STATE_SCHEMA!r}")
    return meta, tensors


def optimizer_state(meta: dict, tensors: dict) -> dict:
    state = {}
    for pid, entry in meta["optimizer"]["state"].items():
        state[int(pid)] = {name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in entry.items()}
    return {"state": state, "param_groups": meta["optimizer"]["param_groups"]}


def first_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if a != b:
        show = lambda v: json.dumps(v)[:80]  # noqa: E731
        return f"{path}: state has {show(a)}, this run {show(b)}"
    return None
