"""qrobust: the RobustMQ robustness benchmark for (quantized) image classifiers.

The repository's folders install as subpackages: ``qrobust.generate`` (builds
model-independent noise corpora), ``qrobust.score`` (runs models and attacks on
them), ``qrobust.train`` (float training and quantization-aware fine-tuning),
``qrobust.shared`` (the ground floor: corpus format, suites, sources, models,
quantizers) and ``qrobust.cli`` (the ``qrobust`` command, the only layer that
reaches all of them). See README.md and docs/design.md.
"""

from qrobust._version import __version__

__all__ = ["evaluate", "score_many", "QrobustError", "__version__"]


def __getattr__(name: str):
    """``qrobust.evaluate`` (:func:`qrobust.score.api.evaluate`), ``qrobust.score_many``
    (:func:`qrobust.score.run.score_many`) and ``qrobust.QrobustError`` (the base of the
    errors that are the user's to fix), imported on first use so that ``import qrobust`` stays light."""
    if name == "evaluate":
        from qrobust.score.api import evaluate

        return evaluate
    if name == "score_many":  # a model grid in one pass over the corpus
        from qrobust.score.run import score_many

        return score_many
    if name == "QrobustError":
        from qrobust.shared.errors import QrobustError

        return QrobustError
    raise AttributeError(f"module 'qrobust' has no attribute {name!r}")
