"""Checkpoint files read and written without ever running code from them.

``.safetensors`` files are parsed by safetensors (header bounded, offsets
checked, nothing unpickled); ``.pt``/``.pth`` state dicts go through
``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers. Every malformed, hostile or mismatched file is a one-line
:class:`ModelError` that names it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from qrobust.shared.errors import QrobustError
from qrobust.shared.files import fsync_dir, partial_path


class ModelError(QrobustError, ValueError):
    """A model cannot be built or loaded as asked (bad spec, file or state dict)."""


def read_checkpoint_metadata(path: str | os.PathLike) -> dict:
    """The string metadata of a ``.safetensors`` file ({} if it has none).

    Only the header is parsed (safetensors bounds it, checks every tensor's
    offsets against the file size, and never unpickles); a missing, truncated
    or malformed file is a one-line :class:`ModelError` naming it.

    >>> json.loads(read_checkpoint_metadata("ckpt.safetensors")["qrobust.model"])["arch"]  # doctest: +SKIP
    'resnet18'
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise ModelError(f"{path}: not a readable safetensors file: {one_line(e)}") from None


def one_line(e: BaseException | str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e))
    return " ".join(text.split()) or (type(e).__name__ if isinstance(e, BaseException) else "")


def _pickle_refusal(e: BaseException) -> str:
    """What torch's weights-only unpickler refused, without its advice to load unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text, re.S)
    if m:
        return one_line(m.group(1))
    lines = [line for line in text.splitlines() if line.strip()]
    return one_line(lines[0]) if lines else type(e).__name__


def read_state_dict(path: Path) -> dict:
    """Tensors from a weights file, never unpickling arbitrary objects."""
    if not path.is_file():
        raise ModelError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        read_checkpoint_metadata(path)  # turns a malformed file into a one-line error
        try:
            return load_file(str(path))
        except Exception as e:  # a dtype torch lacks, a file changed under us
            raise ModelError(f"{path}: cannot read its tensors: {one_line(e)}") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for payloads, RuntimeError for non-zip files
        raise ModelError(f"{path}: refused, not a plain tensor state dict (weights_only load: "
                         f"{_pickle_refusal(e)})") from None
    for key in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict) and not any(torch.is_tensor(v) for v in sd.values()):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ModelError(f"{path}: holds {type(sd).__name__}, not a state dict of tensors")
    return sd


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write tensors and string metadata to ``path`` atomically (partial file, fsync, rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = partial_path(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path
