"""Tiny random MTP configurations for tests (a module of its own, so that processes spawned by a test
import it by name: the project root also has a ``conftest.py``)."""

from __future__ import annotations

from wmtp_lib.model.heads import mtp_config


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


CODELLAMA_INFILL_TOKENS = ("\u2581<PRE>", "\u2581<MID>", "\u2581<SUF>", "\u2581<EOT>")


def llama2_hf_tokenizer(spm_file):
    """Llama-2's Hugging Face fast tokenizer as its ``tokenizer.json`` is (transformers 4's Llama conversion of
    ``tokenizer.model``): the SentencePiece BPE with ``▁`` prepended to every text run, BOS added by a template
    post-processor, and ``<unk>``/``<s>``/``</s>`` matched anywhere in the text as control tokens (what
    Starling's card reads its input with)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from wmtp_lib.checkpoints.tokenization import spm_to_fast

    backend = spm_to_fast(spm_file).backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False, split_special_tokens=False)


def write_codellama_python_tokenizer(spm_file, dst):
    """CodeLlama-7b-Python-hf's tokenizer files as its repo has them: Llama-2's ``tokenizer.model``; a
    ``tokenizer.json`` from transformers 4's conversion of it plus ``▁<PRE> ▁<MID> ▁<SUF> ▁<EOT>`` added as the
    four ids after the base vocabulary (32000–32003 on the real one); a ``tokenizer_config.json`` naming
    ``CodeLlamaTokenizer``; ``special_tokens_map.json``."""
    import json
    import shutil
    from pathlib import Path

    from tokenizers import AddedToken

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(spm_file, dst / "tokenizer.model")
    backend = llama2_hf_tokenizer(spm_file).backend_tokenizer
    base = backend.get_vocab_size(with_added_tokens=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CODELLAMA_INFILL_TOKENS])
    backend.save(str(dst / "tokenizer.json"))
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(i): {"content": t, **flags} for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    added.update({str(base + i): {"content": t, **flags} for i, t in enumerate(CODELLAMA_INFILL_TOKENS)})
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
              "additional_special_tokens": list(CODELLAMA_INFILL_TOKENS), "bos_token": "<s>",
              "clean_up_tokenization_spaces": False, "eos_token": "</s>", "eot_token": "\u2581<EOT>",
              "fill_token": "<FILL_ME>", "legacy": None, "middle_token": "\u2581<MID>",
              "model_max_length": 1000000000000000019884624838656, "pad_token": None,
              "prefix_token": "\u2581<PRE>", "sp_model_kwargs": {}, "suffix_token": "\u2581<SUF>",
              "tokenizer_class": "CodeLlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (dst / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": list(CODELLAMA_INFILL_TOKENS), "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}, indent=2, ensure_ascii=False))
    return dst
