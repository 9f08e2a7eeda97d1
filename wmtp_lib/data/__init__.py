"""Samples, the synthetic tasks, tokenised rows and the `Batch` type, packing, the batch schedule (layer 1)."""
