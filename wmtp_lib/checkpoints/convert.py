"""Checkpoint conversion and loading (DESIGN §5).

Meta's layout (``params.json`` + ``consolidated*.pth``) or a Hugging Face directory (``*.bin`` or
``*.safetensors``) becomes our directory: ``config.json``, ``*.safetensors``, tokenizer files and a
``manifest.json`` with the sha256 and size of every file. ``.bin``/``.pth`` files are only ever read with
``torch.load(weights_only=True)``; training reads safetensors only.

    python -m wmtp_lib.checkpoints convert SRC DST
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict

from wmtp_lib.checkpoints.manifest import write_manifest
from wmtp_lib.checkpoints.reward_models import starling_state
from wmtp_lib.checkpoints.tokenization import convert_sentencepiece
from wmtp_lib.model.heads import MAX_SHARD_SIZE, MTPModel, mtp_config

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


# ---------------------------------------------------------------------------------------- safe loading
def load_torch_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.bin``/``.pth`` state dict with ``weights_only=True`` (never unpickles code)."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors")
    return obj


# ---------------------------------------------------------------------------------------- Meta layout
def is_meta_layout(path: Path) -> bool:
    return (path / "params.json").is_file() and any(path.glob("consolidated*.pth"))


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Llama's SwiGLU hidden size from ``params.json`` fields."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from Meta's interleaved RoPE pairs to the rotate-half layout.

    Per head, Meta rotates row pairs ``(2i, 2i+1)``; Hugging Face rotates ``(i, i + d/2)``. Row ``2i`` goes
    to ``i`` and row ``2i+1`` to ``i + d/2``.
    """
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    per_head = weight.reshape(n_heads, head_dim // 2, 2, in_dim)
    return per_head.permute(0, 2, 1, 3).reshape(out_dim, in_dim)


def rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_rotate_half` (used to write Meta-layout checkpoints)."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    per_head = weight.reshape(n_heads, 2, head_dim // 2, in_dim)
    return per_head.permute(0, 2, 1, 3).reshape(out_dim, in_dim)


# Model-parallel shards of Meta checkpoints are split along these dims (others are replicated).
_META_SPLIT_DIM = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
}

_META_BLOCK_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def _merge_meta_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(shards) == 1:
        return dict(shards[0])
    merged = {}
    for name in shards[0]:
        suffix = next((s for s in _META_SPLIT_DIM if name.endswith(s)), None)
        if suffix is None:
            merged[name] = shards[0][name]
        else:
            merged[name] = torch.cat([s[name] for s in shards], dim=_META_SPLIT_DIM[suffix])
    return merged


def meta_params_to_config(params: dict[str, Any], vocab_size: int, dtype: torch.dtype) -> Any:
    """``params.json`` → our MTP `LlamaConfig` (errors name the missing field)."""
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise KeyError(f"params.json: missing required field {key!r}")
    dim, n_heads = params["dim"], params["n_heads"]
    n_future = int(params.get("n_future_tokens", 1))
    n_kv = params.get("n_kv_heads") or n_heads
    return mtp_config(
        n_future,
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=meta_ffn_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        max_position_embeddings=params.get("max_seq_len", 4096),
        bos_token_id=1,
        eos_token_id=2,
    )


def meta_to_mtp_state(meta: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Rename and permute Meta's keys into `MTPModel`'s; every Meta key must be used (``rope.freqs`` aside)."""
    n_layers, H = config.num_hidden_layers, config.n_future_tokens
    n_trunk = n_layers - H
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    state: dict[str, torch.Tensor] = {}
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in meta:
            raise KeyError(f"Meta checkpoint is missing {name!r}")
        used.add(name)
        return meta[name]

    state["embed_tokens.weight"] = take("tok_embeddings.weight")
    state["norm.weight"] = take("norm.weight")
    state["lm_head.weight"] = take("output.weight")
    blocks = [(f"layers.{i}.", f"trunk.{i}.") for i in range(n_trunk)]
    blocks.append((f"layers.{n_trunk}.", "heads.0."))
    blocks += [(f"extra_heads.{j}.", f"heads.{j + 1}.") for j in range(H - 1)]
    for src, dst in blocks:
        for meta_suffix, our_suffix in _META_BLOCK_MAP.items():
            tensor = take(src + meta_suffix)
            if meta_suffix == "attention.wq.weight":
                tensor = interleaved_to_rotate_half(tensor, n_heads)
            elif meta_suffix == "attention.wk.weight":
                tensor = interleaved_to_rotate_half(tensor, n_kv)
            state[dst + our_suffix] = tensor.contiguous()
    leftover = sorted(k for k in meta if k not in used and k != "rope.freqs")
    if leftover:
        raise KeyError(f"Meta checkpoint has unexpected keys {leftover[:8]} ({len(leftover)} in all): "
                       f"params.json says n_layers={n_layers}, n_future_tokens={H}")
    return state


def mtp_to_meta_state(model: MTPModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our model written back in Meta's layout (state dict, params.json); the inverse of the converter."""
    cfg = model.config
    H, n_trunk = model.n_future, model.n_trunk
    inverse = {v: k for k, v in _META_BLOCK_MAP.items()}
    state = {"tok_embeddings.weight": model.embed_tokens.weight, "norm.weight": model.norm.weight,
             "output.weight": model.lm_head.weight}
    blocks = [(f"trunk.{i}.", f"layers.{i}.") for i in range(n_trunk)]
    blocks.append(("heads.0.", f"layers.{n_trunk}."))
    blocks += [(f"heads.{j + 1}.", f"extra_heads.{j}.") for j in range(H - 1)]
    ours = model.state_dict()
    for src, dst in blocks:
        for our_suffix, meta_suffix in inverse.items():
            tensor = ours[src + our_suffix]
            if meta_suffix == "attention.wq.weight":
                tensor = rotate_half_to_interleaved(tensor, cfg.num_attention_heads)
            elif meta_suffix == "attention.wk.weight":
                tensor = rotate_half_to_interleaved(tensor, cfg.num_key_value_heads)
            state[dst + meta_suffix] = tensor
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "multiple_of": 1,
        "ffn_dim_multiplier": None,
        "norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_parameters["rope_theta"],
        "n_future_tokens": H,
        "max_seq_len": cfg.max_position_embeddings,
    }
    if meta_ffn_dim(cfg.hidden_size, 1, None) != cfg.intermediate_size:
        params["ffn_dim_multiplier"] = cfg.intermediate_size / meta_ffn_dim(cfg.hidden_size, 1, None)
        if meta_ffn_dim(cfg.hidden_size, 1, params["ffn_dim_multiplier"]) != cfg.intermediate_size:
            raise ValueError(f"intermediate_size {cfg.intermediate_size} cannot be written as Meta params")
    return state, params


def save_meta_checkpoint(model: MTPModel, dst: str | Path) -> Path:
    """Write ``params.json`` + ``consolidated.00.pth`` in Meta's layout (for tests and the tiny default)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state, params = mtp_to_meta_state(model)
    (dst / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    torch.save(state, dst / "consolidated.00.pth")
    return dst


def _find_tokenizer_model(src: Path) -> Path | None:
    # Meta's repo keeps tokenizer.model at its root, one level above the 7B_1T_4 folder.
    for candidate in (src / "tokenizer.model", src.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


# What the exact conversion of a tokenizer.model writes: a repo's own copies are not staged beside it
_CONVERSION_WRITES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _copy_tokenizer_files(src: Path, dst: Path, sentencepiece: bool) -> list[str]:
    """Copy the tokenizer files of ``src``; with a SentencePiece ``tokenizer.model`` (``sentencepiece``) its
    exact conversion is the tokenizer, so the repo's own tokenizer.json, config, special-token map and added
    tokens (CodeLlama's four infilling tokens) are left behind rather than staged beside a different truth."""
    copied = []
    for name in TOKENIZER_FILES:
        if sentencepiece and name in _CONVERSION_WRITES:
            continue
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
            copied.append(name)
    return copied


def convert_meta(src: Path, dst: Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> dict[str, Any]:
    params = json.loads((src / "params.json").read_text())
    shard_files = sorted(src.glob("consolidated*.pth"))
    meta = _merge_meta_shards([load_torch_file(f) for f in shard_files])
    emb = meta.get("tok_embeddings.weight")
    if emb is None:
        raise KeyError(f"{shard_files[0]}: missing 'tok_embeddings.weight'")
    vocab = params.get("vocab_size", -1)
    if vocab not in (-1, None) and vocab != emb.shape[0]:
        raise ValueError(f"params.json vocab_size {vocab} != tok_embeddings rows {emb.shape[0]}")
    config = meta_params_to_config(params, emb.shape[0], emb.dtype)
    w1 = meta.get("layers.0.feed_forward.w1.weight")
    if w1 is not None and w1.shape[0] != config.intermediate_size:
        raise ValueError(f"params.json gives intermediate size {config.intermediate_size} but "
                         f"layers.0.feed_forward.w1 has {w1.shape[0]} rows (check multiple_of/ffn_dim_multiplier)")
    state = meta_to_mtp_state(meta, config)
    with torch.device("meta"):
        model = MTPModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary_emb = type(model.rotary_emb)(config=config)
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    spm_file = _find_tokenizer_model(src)
    _copy_tokenizer_files(src, dst, sentencepiece=spm_file is not None)
    if spm_file is not None:
        convert_sentencepiece(spm_file, dst)
    return {"source_format": "meta", "n_future_tokens": config.n_future_tokens, "dtype": str(emb.dtype)}


# ---------------------------------------------------------------------------------------- HF layout
def _hf_weight_files(src: Path) -> tuple[str, list[Path]]:
    st = sorted(src.glob("*.safetensors"))
    if st:
        return "safetensors", st
    bins = sorted(p for p in src.glob("*.bin") if p.name != "training_args.bin")
    if bins:
        return "bin", bins
    pth = sorted(src.glob("*.pth")) + sorted(src.glob("*.pt"))
    if pth:
        return "pth", pth
    raise FileNotFoundError(f"{src}: no *.safetensors, *.bin or *.pth weight files")


def _check_hf_keys(config_dict: dict[str, Any], keys: set[str], src: Path) -> None:
    """When the architecture is known to transformers, the converted keys must match it exactly."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    archs = config_dict.get("architectures") or []
    if "n_future_tokens" in config_dict:
        return
    if "v_head.weight" in keys:  # Starling's reward layout, normalised by `starling_state`
        from transformers import AutoConfig, LlamaModel

        with torch.device("meta"):
            trunk = LlamaModel(AutoConfig.from_pretrained(src))
        expected = {f"transformer.{k}" for k in trunk.state_dict()} | {k for k in keys if k.startswith("v_head.")}
        _raise_key_diff(src, "Starling reward layout", expected, {k for k in keys if not k.endswith("inv_freq")})
        return
    if not archs:
        return
    arch = archs[0]
    if arch.endswith("ForCausalLM"):
        factory = AutoModelForCausalLM
    elif arch.endswith("ForSequenceClassification"):
        factory = AutoModelForSequenceClassification
    else:
        return
    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = factory.from_config(config)
    expected = set(model.state_dict().keys())
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tied_keys = set(tied.keys() if isinstance(tied, dict) else tied)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        expected -= tied_keys
    given = {k for k in keys if not (tied and k in tied_keys) and not k.endswith("rotary_emb.inv_freq")}
    _raise_key_diff(src, arch, expected, given)


def _raise_key_diff(src: Path, what: str, expected: set[str], given: set[str]) -> None:
    missing = sorted(expected - given)
    unexpected = sorted(given - expected)
    if missing or unexpected:
        raise KeyError(f"{src}: weights do not match {what}: missing {missing[:8]} ({len(missing)}), "
                       f"unexpected {unexpected[:8]} ({len(unexpected)})")


def convert_hf(src: Path, dst: Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> dict[str, Any]:
    """Re-write a Hugging Face directory with safetensors shards (+ index), config and tokenizer files."""
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}/config.json not found: not a Hugging Face model directory")
    config_dict = json.loads((src / "config.json").read_text())
    fmt, files = _hf_weight_files(src)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            part = load_file(str(file))
        else:
            part = load_torch_file(file)
        for name, tensor in part.items():
            if name in state:
                raise ValueError(f"{src}: tensor {name} appears in more than one weight file")
            # clone: tied/shared storages cannot be written to safetensors as views
            state[name] = tensor.detach().clone().contiguous()
    info: dict[str, Any] = {}
    if "v_head.weight" in state:
        state, dropped = starling_state(state, src)
        info["dropped_keys"] = dropped
    _check_hf_keys(config_dict, set(state), src)
    save_torch_state_dict(state, str(dst), filename_pattern="model{suffix}.safetensors",
                          max_shard_size=max_shard_size, metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    spm_file = src / "tokenizer.model"
    _copy_tokenizer_files(src, dst, sentencepiece=spm_file.is_file())
    if spm_file.is_file():
        # The SentencePiece model is the source of truth: its exact conversion replaces any shipped
        # tokenizer.json (CodeLlama's own conversion is not proven equal to SentencePiece).
        convert_sentencepiece(spm_file, dst)
    for extra in ("v_head.json",):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)
    return {"source_format": f"hf-{fmt}", "architectures": config_dict.get("architectures"), **info}


def convert_checkpoint(src: str | Path, dst: str | Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Meta or Hugging Face checkpoint at ``src`` → our safetensors directory at ``dst`` (+ manifest).

    Weights are written as safetensors shards of at most ``max_shard_size`` with
    ``model.safetensors.index.json`` (one ``model.safetensors`` when they fit in one).

    The output is written to a temporary sibling and renamed into place, so a failure leaves nothing
    half written. An existing ``dst`` is an error.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; remove it or choose another destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        convert = convert_meta if is_meta_layout(src) else convert_hf
        info = convert(src, tmp, max_shard_size)
        write_manifest(tmp, {"source": str(src), **info})
        _modes_by_umask(tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dst


def _modes_by_umask(root: Path) -> None:
    """Give a converted directory the modes a plain ``mkdir``/``open`` would have: ``mkdtemp`` makes it 0700 and
    safetensors writes its files 0600, which would hide a staged model from the other users of a shared cache."""
    probe = root / ".mode-probe"  # what open() gives under this process's umask (and default ACLs), read without
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # os.umask's set-and-restore race
    file_mode = probe.stat().st_mode & 0o777
    probe.unlink()
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # x wherever r: 0644 -> 0755, 0640 -> 0750, 0600 -> 0700
    for path in (root, *root.rglob("*")):
        os.chmod(path, dir_mode if path.is_dir() else file_mode)


# ---------------------------------------------------------------------------------------- loading
def load_causal_lm(path: str | Path, dtype: torch.dtype | None = None):
    """A Hugging Face causal LM from a local directory (safetensors preferred)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json not found: stage the model first "
                                f"(notebooks/stage_models.ipynb or `python -m wmtp_lib.checkpoints convert`)")
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
