"""Checkpoint conversion: Meta layout and Hugging Face directories → our safetensors directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from meta_reference import meta_forward, random_meta_checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

from wmtp_lib.checkpoints.convert import (
    convert_checkpoint,
    load_causal_lm,
    save_meta_checkpoint,
)
from wmtp_lib.checkpoints.manifest import ManifestError, verify_manifest
from wmtp_lib.checkpoints.tokenization import (
    TokenizerMismatchError,
    check_tokenizer_compat,
)
from wmtp_lib.model.heads import MTPModel


def _write_meta(tmp_path, state, params, shards=1):
    src = tmp_path / "meta"
    src.mkdir()
    (src / "params.json").write_text(json.dumps(params))
    if shards == 1:
        torch.save(state, src / "consolidated.00.pth")
    else:
        split = {"tok_embeddings.weight": 1, "output.weight": 0, "wq.weight": 0, "wk.weight": 0, "wv.weight": 0,
                 "wo.weight": 1, "w1.weight": 0, "w3.weight": 0, "w2.weight": 1}
        parts = [{} for _ in range(shards)]
        for name, t in state.items():
            dim = next((d for s, d in split.items() if name.endswith(s)), None)
            for i in range(shards):
                parts[i][name] = t if dim is None else t.chunk(shards, dim=dim)[i].clone()
        for i, part in enumerate(parts):
            torch.save(part, src / f"consolidated.{i:02d}.pth")
    return src


def test_meta_reference_forward_matches_llama_for_one_head():
    """Validate the test's independent Meta forward against transformers' Llama (n_future_tokens=1)."""
    state, params = random_meta_checkpoint(n_layers=3, n_future=1, n_kv_heads=2, seed=4)
    mtp_state = {}
    from wmtp_lib.checkpoints.convert import meta_params_to_config, meta_to_mtp_state

    cfg = meta_params_to_config(params, params["vocab_size"], torch.float32)
    mtp_state = meta_to_mtp_state(state, cfg)
    hf = {"model.embed_tokens.weight": mtp_state["embed_tokens.weight"], "model.norm.weight": mtp_state["norm.weight"],
          "lm_head.weight": mtp_state["lm_head.weight"]}
    for name, t in mtp_state.items():
        for prefix, i in (("trunk.0.", 0), ("trunk.1.", 1), ("heads.0.", 2)):
            if name.startswith(prefix):
                hf[f"model.layers.{i}.{name[len(prefix):]}"] = t
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=cfg.intermediate_size,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         rms_norm_eps=1e-5)).eval()
    llama.load_state_dict(hf, strict=True)
    x = torch.randint(0, 67, (2, 9))
    torch.testing.assert_close(meta_forward(state, params, x)[:, :, 0], llama(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_freqs", [False, True])
def test_convert_meta_matches_reference_head_by_head(tmp_path, gqa, dtype, rope_freqs):
    state, params = random_meta_checkpoint(n_kv_heads=2 if gqa else None, dtype=dtype, rope_freqs=rope_freqs,
                                           ffn_dim_multiplier=1.3, rope_theta=500000.0, seed=1)
    src = _write_meta(tmp_path, state, params)
    umask = os.umask(0o022)
    try:
        dst = convert_checkpoint(src, tmp_path / "out")
    finally:
        os.umask(umask)
    verify_manifest(dst)
    # readable by the other users of a shared model cache, as any file written under umask 022
    assert {oct(p.stat().st_mode & 0o777) for p in [dst, *dst.rglob("*")] if p.is_dir()} == {"0o755"}
    assert {oct(p.stat().st_mode & 0o777) for p in dst.rglob("*") if p.is_file()} == {"0o644"}
    model = MTPModel.from_pretrained(dst).eval()
    assert model.dtype == dtype and model.n_future == 3
    x = torch.randint(0, 67, (2, 11))
    ref = meta_forward(state, params, x)
    ours = model.float()(x)
    for k in range(3):
        torch.testing.assert_close(ours[:, :, k], ref[:, :, k], atol=2e-4, rtol=2e-4, msg=f"head {k}")


def test_convert_meta_two_model_parallel_shards(tmp_path):
    state, params = random_meta_checkpoint(n_kv_heads=2, seed=2)
    src = _write_meta(tmp_path, state, params, shards=2)
    model = MTPModel.from_pretrained(convert_checkpoint(src, tmp_path / "out")).eval()
    x = torch.randint(0, 67, (1, 8))
    torch.testing.assert_close(model(x), meta_forward(state, params, x), atol=2e-4, rtol=2e-4)


def test_meta_round_trip_through_writer(tmp_path, tiny_mtp):
    save_meta_checkpoint(tiny_mtp, tmp_path / "meta")
    back = MTPModel.from_pretrained(convert_checkpoint(tmp_path / "meta", tmp_path / "out")).eval()
    x = torch.randint(0, 61, (2, 7))
    assert torch.equal(back(x), tiny_mtp(x))


def test_convert_meta_refuses_unexpected_and_missing_keys(tmp_path):
    state, params = random_meta_checkpoint(seed=3)
    state["extra_heads.7.attention.wq.weight"] = torch.zeros(1)
    src = _write_meta(tmp_path, state, params)
    with pytest.raises(KeyError, match="extra_heads.7"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    state.pop("extra_heads.7.attention.wq.weight")
    state.pop("layers.1.ffn_norm.weight")
    (src / "consolidated.00.pth").unlink()
    torch.save(state, src / "consolidated.00.pth")
    with pytest.raises(KeyError, match="layers.1.ffn_norm.weight"):
        convert_checkpoint(src, tmp_path / "out2")


def _tiny_llama():
    torch.manual_seed(5)
    return LlamaForCausalLM(LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("shards", [1, 2])
def test_hf_bin_to_safetensors_round_trip(tmp_path, shards):
    llama = _tiny_llama()
    src = tmp_path / "hf"
    llama.save_pretrained(src)
    (src / "model.safetensors").unlink()
    state = llama.state_dict()
    names = sorted(state)
    for i in range(shards):
        torch.save({n: state[n].clone() for n in names[i::shards]}, src / f"pytorch_model-{i}.bin")
    dst = convert_checkpoint(src, tmp_path / "out")
    assert not list(dst.glob("*.bin"))
    manifest = verify_manifest(dst)
    assert "model.safetensors" in manifest["files"]
    back = load_causal_lm(dst)
    x = torch.randint(0, 53, (2, 6))
    assert torch.equal(back(x).logits, llama(x).logits)


def test_hf_conversion_refuses_missing_weight(tmp_path):
    llama = _tiny_llama()
    src = tmp_path / "hf"
    llama.save_pretrained(src)
    (src / "model.safetensors").unlink()
    state = dict(llama.state_dict())
    state.pop("model.layers.1.mlp.up_proj.weight")
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        convert_checkpoint(src, tmp_path / "out")


def test_bin_with_code_is_refused(tmp_path):
    """weights_only=True: a pickle that would run code is rejected."""
    llama = _tiny_llama()
    src = tmp_path / "hf"
    llama.save_pretrained(src)
    (src / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "evil": subprocess.Popen}, src / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        convert_checkpoint(src, tmp_path / "out")


def test_manifest_detects_corruption(tmp_path, tiny_mtp):
    save_meta_checkpoint(tiny_mtp, tmp_path / "meta")
    dst = convert_checkpoint(tmp_path / "meta", tmp_path / "out")
    weights = dst / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        verify_manifest(dst)
    weights.write_bytes(bytes(data[:-5]))
    with pytest.raises(ManifestError, match="size"):
        verify_manifest(dst)


def test_cli_convert_and_errors(tmp_path, tiny_mtp, capsys):
    from wmtp_lib.checkpoints.__main__ import main

    save_meta_checkpoint(tiny_mtp, tmp_path / "meta")
    # the command as a user types it, in its own interpreter
    ok = subprocess.run([sys.executable, "-m", "wmtp_lib.checkpoints", "convert", str(tmp_path / "meta"),
                         str(tmp_path / "out")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()
    # its errors, through the same entry function (a new interpreter costs about 9 s each)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "out")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "o2")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_sentencepiece_tokenizer_converted_beside_weights(tmp_path, tiny_mtp, llama_spm):
    """Meta's repo layout: tokenizer.model at the root, weights in the 7B_1T_4 folder."""
    import shutil

    import sentencepiece as spm

    meta = save_meta_checkpoint(tiny_mtp, tmp_path / "repo" / "7B_1T_4")
    shutil.copy(llama_spm, tmp_path / "repo" / "tokenizer.model")
    dst = convert_checkpoint(meta, tmp_path / "out")
    assert (dst / "tokenizer.json").is_file() and (dst / "tokenizer.model").is_file()
    from wmtp_lib.checkpoints.tokenization import load_tokenizer

    tok = load_tokenizer(dst)
    sp = spm.SentencePieceProcessor(model_file=str(llama_spm))
    sample = "def add(a, b):\n    return a + b  # <s>\n"
    assert tok(sample, add_special_tokens=False)["input_ids"] == sp.encode(sample)


def test_non_llama_sentencepiece_model_refused(tmp_path, tiny_mtp):
    import sentencepiece as spm

    from wmtp_lib.checkpoints.tokenization import TokenizerConversionError

    text = ["def add(a, b):\n    return a + b\n", "print('hello world')"] * 40
    meta = save_meta_checkpoint(tiny_mtp, tmp_path / "repo" / "7B_1T_4")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "repo" / "tokenizer"),
                                   vocab_size=61, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)  # default normalizer nmt_nfkc, no byte fallback
    with pytest.raises(TokenizerConversionError, match="nmt_nfkc"):
        convert_checkpoint(meta, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_compat_from_files(tmp_path, llama_spm):
    """Unused added tokens beyond the base vocabulary pass (CodeLlama's 32004); a changed piece fails naming the text."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    from tokenizers import AddedToken

    from wmtp_lib.checkpoints.tokenization import load_tokenizer, spm_to_fast

    base = spm_to_fast(llama_spm)
    ref = spm_to_fast(llama_spm)
    ref.add_tokens([AddedToken(t, special=True) for t in ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")])
    assert len(ref) == len(base) + 4
    texts = ["def f(x):\n    return x + 1\n", "class A:\n\tpass\r\n"] * 3
    assert check_tokenizer_compat(base, ref, texts) == len(texts)
    # one changed piece that the texts use: fails naming the text
    proto = model_pb2.ModelProto()
    proto.ParseFromString(llama_spm.read_bytes())
    next(p for p in proto.pieces if p.piece == "return").piece = "r3turn"
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(TokenizerMismatchError, match="return x"):
        check_tokenizer_compat(base, load_tokenizer(tmp_path / "ref"), texts, "mtp-7b", "ref")
    # a changed piece the texts never use: named by its id
    proto.ParseFromString(llama_spm.read_bytes())
    last = len(proto.pieces) - 1
    proto.pieces[last].piece = "\u2581zzzz"
    (tmp_path / "ref" / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(TokenizerMismatchError, match=f"id {last}"):
        check_tokenizer_compat(base, load_tokenizer(tmp_path / "ref"), texts)
    with pytest.raises(TokenizerMismatchError, match="bos id 1 vs 2"):
        other = spm_to_fast(llama_spm)
        other.bos_token = "</s>"
        check_tokenizer_compat(base, other, texts)

def test_converter_shards_with_an_index_and_manifest(tmp_path, tiny_mtp):
    meta = save_meta_checkpoint(tiny_mtp, tmp_path / "meta")
    dst = convert_checkpoint(meta, tmp_path / "mtp", max_shard_size=20_000)
    manifest = verify_manifest(dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and set(shards) | {"model.safetensors.index.json"} <= set(manifest["files"])
    x = torch.randint(0, 61, (1, 6))
    assert torch.equal(MTPModel.from_pretrained(dst)(x), tiny_mtp(x))
    torch.manual_seed(2)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4)).eval()
    llama.save_pretrained(str(tmp_path / "hf"))
    hf = convert_checkpoint(tmp_path / "hf", tmp_path / "hf-out", max_shard_size=20_000)
    assert len(json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]) == len(llama.state_dict())
    assert torch.equal(load_causal_lm(hf)(input_ids=x).logits, llama(input_ids=x).logits)


def test_codellama_tokenizer_files_are_read_through_their_tokenizer_model(tmp_path, llama_spm):
    """CodeLlama-7b-Python's repo has Llama-2's tokenizer.model and a tokenizer.json naming CodeLlamaTokenizer,
    which transformers rebuilds with a Metaspace pre-tokenizer and control-token matching. Training start
    (`load_tokenizer`) and every other path read the tokenizer.model, converted exactly."""
    import sentencepiece as spm
    from tiny_models import write_codellama_python_tokenizer
    from transformers import AutoTokenizer

    from wmtp_lib.checkpoints.tokenization import load_tokenizer

    files = write_codellama_python_tokenizer(llama_spm, tmp_path / "codellama")
    sp = spm.SentencePieceProcessor(model_file=str(llama_spm))
    texts = ["  two", "a </s> b", "    for x in y:\n\treturn  x\n", "<s>"]
    rebuilt = AutoTokenizer.from_pretrained(str(files))
    assert rebuilt("  two", add_special_tokens=False)["input_ids"] != sp.encode("  two")  # what is avoided
    tok = load_tokenizer(files)
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), repr(text)
    assert len(tok) == sp.vocab_size() and [tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [1, 2, 0]
