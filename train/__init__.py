"""Training: float models from scratch and quantization-aware fine-tuning (imports qrobust.shared only)."""
