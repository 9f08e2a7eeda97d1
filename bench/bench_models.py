"""The random MTP model the step benches time (one place for its shape)."""

from __future__ import annotations

import torch

from wmtp_lib.heads import MTPModel, mtp_config


def bench_mtp_model(vocab: int, hidden: int, layers: int, max_positions: int, device: torch.device) -> MTPModel:
    """A 4-head MTP model in training mode, seeded: ``layers`` blocks in all, attention heads of width 128."""
    torch.manual_seed(0)
    config = mtp_config(4, vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                        num_hidden_layers=layers, num_attention_heads=max(4, hidden // 128),
                        max_position_embeddings=max_positions)
    return MTPModel(config).to(device).train()
