"""qrobust: the RobustMQ robustness benchmark for (quantized) image classifiers.

The repository's folders install as subpackages: ``qrobust.generate`` (builds
model-independent noise corpora), ``qrobust.score`` (runs models and attacks on
them) and ``qrobust.shared`` (the corpus format, suites, sources and command
line that both use).  See README.md.
"""

__version__ = "0.1.0"
