"""qrobust.score: streams a corpus through a model and stores per-sample results
(see ../shared/DESIGN.md). The scorer is built by its own issue; the corpus
format it reads is defined in ``qrobust.shared.manifest``."""
