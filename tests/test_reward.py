"""Reward models of both layouts score text exactly like a direct forward."""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel

from wmtp_lib.loaders import convert_checkpoint
from wmtp_lib.reward import RewardModel
from wmtp_lib.tiny import train_tokenizer


def _tok(tmp_path):
    tok = train_tokenizer(["def f(x): return x + 1", "print('hi')"] * 20, vocab_size=300)
    tok.save_pretrained(str(tmp_path / "tok"))
    return tok


def _cfg(vocab, **kw):
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, pad_token_id=0, **kw)


def test_sequence_classification_reward_equals_direct_forward(tmp_path):
    tok = _tok(tmp_path)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(_cfg(len(tok), num_labels=1)).eval()
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    tok.save_pretrained(str(src))
    rm = RewardModel.from_dir(convert_checkpoint(src, tmp_path / "rm"), "sequence_classification")
    texts = ["def f(x): return x", "print('hi') print('hi') print('hi')", "x"]
    scores = rm.score(texts)
    for text, s in zip(texts, scores):
        ids = tok(text, return_tensors="pt")["input_ids"]
        direct = model(input_ids=ids).logits[0, 0]
        assert torch.allclose(s, direct, atol=1e-5)


def test_starling_layout_reward_equals_direct_forward(tmp_path):
    tok = _tok(tmp_path)
    torch.manual_seed(1)
    cfg = _cfg(len(tok))
    trunk = LlamaModel(cfg).eval()
    v_head = torch.nn.Linear(32, 1, bias=False)
    src = tmp_path / "starling"
    src.mkdir()
    state = {f"transformer.{k}": v.clone() for k, v in trunk.state_dict().items()}
    state["v_head.weight"] = v_head.weight.detach().clone()
    torch.save(state, src / "pytorch_model.bin")  # Starling ships a .bin: converted at staging
    cfg.save_pretrained(str(src))
    tok.save_pretrained(str(src))
    rm = RewardModel.from_dir(convert_checkpoint(src, tmp_path / "rm"), "starling")
    texts = ["def f(x): return x + 1", "hi"]
    scores = rm.score(texts)
    for text, s in zip(texts, scores):
        ids = tok(text, return_tensors="pt")["input_ids"]
        direct = v_head(trunk(input_ids=ids).last_hidden_state)[0, -1, 0]
        assert torch.allclose(s, direct, atol=1e-5)
