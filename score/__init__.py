"""qrobust.score: streams a corpus through models, runs the white-box attacks live, stores per-sample
results and computes every metric from them (docs/scoring.md, docs/metrics.md). The corpus format it
reads is defined in ``qrobust.shared.manifest``; it never imports ``qrobust.generate``."""
