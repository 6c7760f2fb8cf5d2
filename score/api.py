"""The Python API: score a model on a corpus from a notebook, in one call.

::

    import qrobust
    summary = qrobust.evaluate(model, "corpora/robustmq", attacks=["all"], attack_limit=1000, device="cuda")
    summary["natural"]["mnr"], summary["intervals"]["values"]["natural.mnr"]

``model`` is an ``nn.Module`` built in this process (it gets RGB in [0, 1],
normalizing itself, unless ``normalize="imagenet"``) or anything
``qrobust score --model`` accepts (a checkpoint, ``resnet18`` with
``weights=``, ``resnet18:IMAGENET1K_V1``, ``package.module:callable``). It is
the same code path as ``qrobust score``: the same results folder (written to
``out``, or to a temporary folder that is removed afterwards), the same
summary. A results folder is tied to the model's state: after training the
module further, score it into a new ``out`` (the old folder refuses it).
"""
from __future__ import annotations

import os
import shutil
import tempfile

from qrobust.score.run import score


def evaluate(model, corpus: str | os.PathLike, out: str | os.PathLike | None = None, *,
             weights: str | os.PathLike | None = None, normalize: str | None = None, only: list[str] | None = None,
             exclude: list[str] | None = None, attacks: list[str] | None = None, budgets: list[str] | None = None,
             attack_limit: int | None = None, attack_config: dict | None = None, device: str = "cpu",
             batch_size: int = 64, workers: int = 0, limit: int | None = None, progress: bool = False) -> dict:
    """Score ``model`` on ``corpus`` and return its summary (``summary.json`` as a dict).

    The arguments are ``qrobust score``'s (see :func:`qrobust.score.run.score`);
    ``attacks=["all"]`` runs the paper's five attacks. Raises
    :class:`~qrobust.shared.errors.QrobustError` subclasses for a bad corpus,
    model or results folder, as the command line reports them.

    >>> import torchvision  # doctest: +SKIP
    >>> net = torchvision.models.resnet18(num_classes=12)  # doctest: +SKIP
    >>> summary = evaluate(net, "demo-out/corpus", normalize="imagenet", only=["clean/*"])  # doctest: +SKIP
    >>> summary["clean"]["acc"], summary["intervals"]["values"]["clean.acc"]  # doctest: +SKIP
    """
    folder = out if out is not None else tempfile.mkdtemp(prefix="qrobust-")
    try:
        return score(str(corpus), model, str(folder), weights=None if weights is None else str(weights),
                     normalize=normalize, only=only, exclude=exclude, attacks=attacks, budgets=budgets,
                     attack_limit=attack_limit, attack_config=attack_config, device=device,
                     batch_size=batch_size, workers=workers, limit=limit, progress=progress)
    finally:
        if out is None:
            shutil.rmtree(folder, ignore_errors=True)
