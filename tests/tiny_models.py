"""Tiny random MTP configurations for tests (a module of its own, so that processes spawned by a test
import it by name: the project root also has a ``conftest.py``)."""

from __future__ import annotations

from wmtp_lib.heads import mtp_config


def tiny_config(n_future: int = 3, vocab: int = 61, gqa: bool = True, layers: int = 5):
    return mtp_config(
        n_future,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        max_position_embeddings=128,
        rope_theta=10000.0,
    )
