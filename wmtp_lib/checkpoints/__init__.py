"""Checkpoint conversion, manifests, tokenizers, reward models, S3 storage, staging, the tiny models (layer 3)."""
