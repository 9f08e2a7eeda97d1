"""Reward models as they are: their template, their tokenizer, their file layout, scored at the last token."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from wmtp_lib.loaders import convert_checkpoint
from wmtp_lib.reward import RewardModel

STARLING_TEMPLATE = "<s>[INST] {prompt} </s> [/INST] {response}</s>"
PAIRS = [("Write add(a, b).", "def add(a, b):\n    return a + b\n"),
         ("Say <s> literally", "print('</s>')"),
         ("x" * 40, "y")]


def _cfg(vocab, **kw):
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, **kw)


def test_sequence_classification_plain_template_equals_direct_forward(tmp_path, llama_spm):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama_spm))
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(_cfg(sp.vocab_size(), num_labels=1)).eval()
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    shutil.copy(llama_spm, src / "tokenizer.model")
    rm = RewardModel.from_dir(convert_checkpoint(src, tmp_path / "rm"), "sequence_classification",
                              "{prompt}{response}", "left")
    scores = rm.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    for (prompt, response), s in zip(PAIRS, scores):
        ids = torch.tensor([[1] + sp.encode(prompt + response)])
        assert torch.allclose(s, model(input_ids=ids).logits[0, 0], atol=1e-5)


LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}")


def _llama3_style_tokenizer():
    """A byte-level BPE with Llama-3's special tokens and chat template (FsfairX's tokenizer kind)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def add(a, b):\n    return a + b\n", "user assistant write"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def test_fsfairx_layout_reads_its_chat_template(tmp_path):
    tok = _llama3_style_tokenizer()
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(_cfg(len(tok), num_labels=1)).eval()
    src = tmp_path / "fsfairx"
    model.save_pretrained(str(src))
    tok.save_pretrained(str(src))
    rm = RewardModel.from_dir(convert_checkpoint(src, tmp_path / "rm"), "sequence_classification", "chat_template",
                              "left")
    scores = rm.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    for (prompt, response), s in zip(PAIRS, scores):
        text = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt.strip()}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n{response.strip()}<|eot_id|>")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
        assert torch.allclose(s, model(input_ids=torch.tensor([ids])).logits[0, 0], atol=1e-5)


class StarlingShaped(nn.Module):
    """The module Starling's authors saved: ``model`` (LlamaForCausalLM), ``transformer`` = ``model.model``,
    ``v_head``."""

    def __init__(self, config):
        super().__init__()
        self.model = LlamaForCausalLM(config)
        self.transformer = self.model.model
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False)

    def reward(self, ids: list[int]) -> torch.Tensor:
        hidden = self.transformer(input_ids=torch.tensor([ids])).last_hidden_state
        return self.v_head(hidden)[0, -1, 0]


def _starling_dir(tmp_path, llama_spm, layout: str, name: str):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama_spm))
    torch.manual_seed(5)
    cfg = _cfg(sp.vocab_size())
    module = StarlingShaped(cfg).eval()
    state = module.state_dict()  # holds model.model.*, transformer.* (shared), model.lm_head.weight, v_head.*
    if layout == "transformer":
        state = {k: v for k, v in state.items() if not k.startswith("model.")}
    elif layout == "model":
        state = {k: v for k, v in state.items() if not k.startswith("transformer.")}
    src = tmp_path / f"starling-{layout}"
    src.mkdir()
    torch.save(state, src / name)  # Starling ships a .bin/.pt state dict: converted at staging
    cfg.save_pretrained(str(src))
    shutil.copy(llama_spm, src / "tokenizer.model")  # staging brings Llama-2's tokenizer (tokenizer_source)
    return module, sp, src


@pytest.mark.parametrize("layout,name", [("both", "pytorch_model.bin"), ("transformer", "model.pt"),
                                         ("model", "pytorch_model.bin")])
def test_starling_layouts_score_at_the_final_eos(tmp_path, llama_spm, layout, name):
    module, sp, src = _starling_dir(tmp_path, llama_spm, layout, name)
    converted = convert_checkpoint(src, tmp_path / "rm")
    rng = torch.get_rng_state()
    rm = RewardModel.from_dir(converted, "starling", STARLING_TEMPLATE, "left")
    # built on the meta device: loading draws nothing from the global RNG (rank 0 alone scores rewards)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(t.is_meta for t in list(rm.model.parameters()) + list(rm.model.buffers()))
    assert rm.model.transformer.rotary_emb.inv_freq.dtype == torch.float32
    scores = rm.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    for (prompt, response), s in zip(PAIRS, scores):
        ids = [1, 1] + sp.encode(f"[INST] {prompt} ") + [2] + sp.encode(f" [/INST] {response}") + [2]
        assert rm.encode(prompt, response) == ids
        assert torch.allclose(s, module.reward(ids), atol=1e-5)
    # left truncation keeps the final </s> where the score is read
    rm.max_length = 9
    ids = [1, 1] + sp.encode(f"[INST] {PAIRS[0][0]} ") + [2] + sp.encode(f" [/INST] {PAIRS[0][1]}") + [2]
    assert rm.encode(*PAIRS[0]) == ids[-9:]
    assert torch.allclose(rm.score([PAIRS[0][0]], [PAIRS[0][1]])[0], module.reward(ids[-9:]), atol=1e-5)


def test_starling_file_with_a_foreign_key_is_refused(tmp_path, llama_spm):
    _, _, src = _starling_dir(tmp_path, llama_spm, "both", "pytorch_model.bin")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["critic.extra.weight"] = torch.zeros(2)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(KeyError, match="critic.extra.weight"):
        convert_checkpoint(src, tmp_path / "rm")
    assert not (tmp_path / "rm").exists()
