"""qrobust: the RobustMQ robustness benchmark for (quantized) image classifiers.

The repository's folders install as subpackages: ``qrobust.generate`` (builds
model-independent noise corpora), ``qrobust.score`` (runs models and attacks on
them), ``qrobust.train`` (float training and quantization-aware fine-tuning),
``qrobust.shared`` (the ground floor: corpus format, suites, sources, models,
quantizers) and ``qrobust.cli`` (the ``qrobust`` command, the only layer that
reaches all of them). See README.md and docs/design.md.
"""

__version__ = "0.1.0"
