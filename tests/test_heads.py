"""MTPModel: shapes, round trips, causal-LM interop, strict loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_config
from transformers import LlamaConfig, LlamaForCausalLM

from wmtp_lib.checkpoints.convert import load_causal_lm
from wmtp_lib.model.heads import MTPModel


def test_forward_shape_and_dtype(tiny_mtp):
    x = torch.randint(0, 61, (2, 9))
    logits = tiny_mtp(x)
    assert logits.shape == (2, 9, 3, 61)
    assert logits.dtype == torch.float32
    assert tiny_mtp.n_future == 3


def test_heads_are_causal(tiny_mtp):
    """Changing token j leaves every head's logits at positions < j unchanged."""
    x = torch.randint(0, 61, (1, 10))
    y = x.clone()
    y[0, 6] = (y[0, 6] + 1) % 61
    a, b = tiny_mtp(x), tiny_mtp(y)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_right_padding_mask_keeps_real_positions(tiny_mtp):
    x = torch.randint(0, 61, (1, 6))
    padded = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    torch.testing.assert_close(tiny_mtp(padded, mask)[:, :6], tiny_mtp(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_keeps_dtype_and_logits(tmp_path, dtype):
    torch.manual_seed(0)
    model = MTPModel(tiny_config()).to(dtype).eval()
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["n_future_tokens"] == 3
    loaded = MTPModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.dtype == dtype
    x = torch.randint(0, 61, (2, 8))
    assert torch.equal(model(x), loaded(x))


def test_strict_load_names_missing_and_unexpected_keys(tmp_path, tiny_mtp):
    tiny_mtp.save_pretrained(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    state.pop("heads.1.mlp.up_proj.weight")
    state["heads.9.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(KeyError, match=r"heads\.1\.mlp\.up_proj\.weight.*heads\.9\.extra"):
        MTPModel.from_pretrained(tmp_path / "m")


def test_non_strict_load_is_refused(tiny_mtp):
    """A caller asking MTPModel for a lenient load gets an error, not a load that hides missing weights: the
    lenient request is this test's input, not a fallback the project uses."""
    lenient = {"strict": False}
    with pytest.raises(ValueError, match="always strict"):
        tiny_mtp.load_state_dict(tiny_mtp.state_dict(), **lenient)


def test_missing_directory_says_how_to_convert(tmp_path):
    with pytest.raises(FileNotFoundError, match="wmtp_lib.checkpoints convert"):
        MTPModel.from_pretrained(tmp_path / "nothing")


def _tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_from_causal_lm_head0_equals_source(tie):
    llama = _tiny_llama(tie)
    mtp = MTPModel.from_causal_lm(llama, n_future=4).eval()
    assert mtp.n_future == 4 and mtp.n_trunk == 2
    x = torch.randint(0, 53, (2, 10))
    ref = llama(x).logits.float()
    out = mtp(x)
    torch.testing.assert_close(out[:, :, 0], ref, atol=1e-5, rtol=1e-5)
    # extra heads start as copies of head 0
    for k in range(1, 4):
        torch.testing.assert_close(out[:, :, k], ref, atol=1e-5, rtol=1e-5)


def test_from_causal_lm_directory(tmp_path):
    llama = _tiny_llama()
    llama.save_pretrained(tmp_path / "llama")
    mtp = MTPModel.from_causal_lm(load_causal_lm(tmp_path / "llama"), n_future=2).eval()
    x = torch.randint(0, 53, (1, 7))
    torch.testing.assert_close(mtp(x)[:, :, 0], llama(x).logits.float(), atol=1e-5, rtol=1e-5)


def test_export_head0_round_trip(tmp_path, tiny_mtp):
    tiny_mtp.export_head0(tmp_path / "head0")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "head0").eval()
    x = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(llama(x).logits.float(), tiny_mtp(x)[:, :, 0], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(tiny_mtp):
    x = torch.randint(0, 61, (2, 8))
    a = tiny_mtp.train()
    b = a.copy()
    b.gradient_checkpointing_enable()
    a(x).sum().backward()
    b(x).sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_config_validation():
    with pytest.raises(ValueError, match="num_hidden_layers"):
        tiny_config(n_future=6, layers=4)
    with pytest.raises(ValueError, match="n_future_tokens"):
        tiny_config(n_future=0)


def test_side_files_are_not_model_weights(tmp_path, tiny_mtp):
    """A run's final/ also holds value_head.safetensors: loading the model ignores it."""
    tiny_mtp.save_pretrained(tmp_path / "final")
    save_file({"fc1.weight": torch.zeros(2, 2)}, str(tmp_path / "final" / "value_head.safetensors"))
    x = torch.randint(0, 61, (1, 6))
    assert torch.equal(MTPModel.from_pretrained(tmp_path / "final").eval()(x), tiny_mtp(x))


def test_bf16_rope_stays_float32_and_head0_equals_llama_at_long_positions(tmp_path):
    """A bf16 checkpoint: every MTPModel load path keeps inv_freq float32, as LlamaForCausalLM does, so
    head 0 gives the source model's logits at positions up to 4096 (a bf16 inv_freq drifts there)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(tmp_path / "llama"))
    llama = LlamaForCausalLM.from_pretrained(str(tmp_path / "llama"), dtype=torch.bfloat16).eval()
    assert llama.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.randint(0, 64, (1, 4096), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = llama(input_ids=ids).logits.float()
        mtp = MTPModel.from_causal_lm(load_causal_lm(tmp_path / "llama"), n_future=2).eval()
        mtp.save_pretrained(tmp_path / "mtp")
        loaded = MTPModel.from_pretrained(tmp_path / "mtp").eval()
        mtp.export_head0(tmp_path / "head0")
        exported = LlamaForCausalLM.from_pretrained(str(tmp_path / "head0"), dtype=torch.bfloat16).eval()
        for model in (mtp, loaded, loaded.to(torch.float32).to(torch.bfloat16)):
            assert model.dtype == torch.bfloat16 and model.rotary_emb.inv_freq.dtype == torch.float32
            assert torch.equal(model(ids)[:, :, 0], want)
        head0 = mtp.head0_causal_lm()
        assert head0.model.rotary_emb.inv_freq.dtype == torch.float32
        assert torch.equal(head0(input_ids=ids).logits.float(), want)
        assert torch.equal(exported(input_ids=ids).logits.float(), want)
        # the failure this guards against: a bf16 inv_freq moves the far positions' logits
        llama.model.rotary_emb.inv_freq = llama.model.rotary_emb.inv_freq.to(torch.bfloat16)
        assert not torch.equal(llama(input_ids=ids).logits.float()[:, -64:], want[:, -64:])


def test_mtp_directory_has_its_own_model_type_and_shards_with_an_index(tmp_path, tiny_mtp):
    from transformers import AutoModelForCausalLM

    from wmtp_lib.model.heads import load_safetensors_dir

    path = tiny_mtp.save_pretrained(tmp_path / "final", max_shard_size=20_000)
    assert json.loads((path / "config.json").read_text())["model_type"] == "wmtp_mtp"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((path / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(tiny_mtp.state_dict())
    back = MTPModel.from_pretrained(path).eval()
    x = torch.randint(0, 61, (2, 7))
    assert torch.equal(back(x), tiny_mtp(x))
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_pretrained(str(path))  # loudly, never a Llama with random weights
    (path / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_safetensors_dir(path)
