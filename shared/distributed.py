"""Joining a torch process group, for scoring and training alike (both run under torchrun)."""
from __future__ import annotations


def init_process_group(backend: str, **kwargs) -> None:
    """``torch.distributed.init_process_group``, made safe to destroy (scoring and training use this one).

    torch._dynamo (which torchvision imports) keeps a reference to the process
    group when it is first imported after ``init_process_group``, so
    ``destroy_process_group`` could not free it: gloo's threads lived on into
    interpreter shutdown, where a rank died by SIGABRT now and then ("terminate
    called without an active exception"). Imported first, it holds nothing.
    """
    import importlib

    import torch.distributed as dist

    importlib.import_module("torch._dynamo")
    dist.init_process_group(backend, **kwargs)
