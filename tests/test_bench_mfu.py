"""The MFU arithmetic of bench/train_throughput.py against a hand count for a tiny config."""

from __future__ import annotations

import importlib

import pytest
import torch
from train_helpers import ROOT

from wmtp_lib.model.heads import MTPModel, mtp_config

# D 16, 4 attention heads of width 4, 2 key/value heads (grouped: k and v are narrower than q), MLP 24,
# 2 trunk + 4 head blocks, vocab 50, sequence 8
TINY = dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
            num_hidden_layers=6, vocab_size=50, max_position_embeddings=8)


@pytest.fixture
def throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module("train_throughput")


def test_flops_per_token_matches_a_hand_count(throughput):
    # one block: q 16·16 = 256, k 16·(2·4) = 128, v 128, o 256, gate + up + down 3·16·24 = 1152 → 1920
    # dense: 6 FLOPs per weight a token meets, 6 blocks: 6 · 6 · 1920 = 69120
    # unembeddings: 4 heads · 6 · 16 · 50 = 19200
    # attention: 12 · 6 blocks · 4 heads · width 4 · T 8 = 9216
    flops = throughput.flops_per_token(mtp_config(4, **TINY), length=8)
    assert flops == {"dense": 69120, "unembedding": 19200, "attention": 9216, "total": 97536}


def test_dense_count_is_the_models_own_block_matrices(throughput):
    """N_dense is every weight matrix of the trunk and head blocks; the shared unembedding is D × V."""
    config = mtp_config(4, **TINY)
    model = MTPModel(config)
    blocks = list(model.trunk) + list(model.heads)
    block_matrices = sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    flops = throughput.flops_per_token(config, length=8)
    assert flops["dense"] == 6 * block_matrices
    assert flops["unembedding"] == 6 * config.n_future_tokens * model.lm_head.weight.numel()


def test_mfu_divides_achieved_model_flops_by_the_peak(throughput):
    # 97536 FLOPs a token at 2e6 tokens/s = 1.95072e11 FLOP/s, over 0.5 TFLOP/s
    assert throughput.mfu(97536, 2e6, 0.5) == pytest.approx(0.390144)


@pytest.mark.parametrize("name, peak", [("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
                                        ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("AMD EPYC (x86_64, 2 cores)", None)])
def test_peak_by_device_name(throughput, name, peak):
    assert throughput.peak_tflops(name) == peak


def test_peak_override_wins_over_the_table(throughput):
    assert throughput.peak_tflops("NVIDIA H100 80GB HBM3", override=500.0) == 500.0


def test_1b_preset_is_about_a_billion_parameters(throughput):
    p = throughput.PRESETS["1b"]
    config = mtp_config(4, vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                        num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                        num_key_value_heads=p["kv_heads"], max_position_embeddings=p["length"])
    with torch.device("meta"):
        n = sum(t.numel() for t in MTPModel(config).parameters())
    assert 0.9e9 < n < 1.2e9
