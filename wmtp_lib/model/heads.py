"""Multi-token prediction model built from `transformers` Llama blocks.

Layout (DESIGN §5): a trunk of ``n_layers - H`` decoder blocks, ``H`` head blocks that each read the
trunk output, one shared final RMSNorm and one shared unembedding. Head ``k`` at position ``t``
predicts token ``t + k + 1``.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, packed_sequence_mask_function
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from wmtp_lib.model.packing import document_ids

# transformers renamed the KV-cache keyword from `past_key_values` to `cache` during 5.x; use
# whichever this installation's Llama blocks and mask builder declare.
_BLOCK_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"
_MASK_CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MAX_SHARD_SIZE = "5GB"
MODEL_TYPE = "wmtp_mtp"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> ``"bfloat16"`` (the spelling stored in ``config.json``)."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(_DTYPES)}")


class MTPConfig(LlamaConfig):
    """A Llama config with ``n_future_tokens``, under its own ``model_type``.

    Registered with `AutoConfig`, and with no `AutoModelForCausalLM` mapping, so a plain causal-LM load of
    an MTP directory fails loudly instead of building a Llama with random weights.
    """

    model_type = MODEL_TYPE


AutoConfig.register(MODEL_TYPE, MTPConfig, exist_ok=True)


def mtp_config(n_future_tokens: int, **llama_kwargs: Any) -> MTPConfig:
    """An `MTPConfig` whose ``num_hidden_layers`` counts trunk + head blocks, plus ``n_future_tokens``."""
    config = MTPConfig(**llama_kwargs)
    config.n_future_tokens = int(n_future_tokens)
    config._attn_implementation = "sdpa"
    validate_mtp_config(config)
    return config


def validate_mtp_config(config: LlamaConfig) -> None:
    """Raise ``ValueError`` naming the bad field when the config cannot describe an MTP model."""
    n_future = getattr(config, "n_future_tokens", None)
    if not isinstance(n_future, int) or n_future < 1:
        raise ValueError(f"config.n_future_tokens must be a positive integer, got {n_future!r}")
    if config.num_hidden_layers < n_future:
        raise ValueError(
            f"config.num_hidden_layers ({config.num_hidden_layers}) must be >= n_future_tokens ({n_future}): "
            "it counts trunk blocks plus one block per head"
        )
    if config.tie_word_embeddings:
        raise ValueError("config.tie_word_embeddings must be false: MTPModel keeps its own unembedding")


class Float32RotaryEmbedding(LlamaRotaryEmbedding):
    """Llama's RoPE whose ``inv_freq`` stays float32 through ``.to(dtype)``, as
    ``LlamaForCausalLM.from_pretrained(dtype=bf16)`` keeps it: a bf16 ``inv_freq`` (0.1 → 0.1001) makes
    logits drift from the source model as positions grow."""

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            # recompute rather than upcast: the bf16 values have already lost the precision
            fresh = LlamaRotaryEmbedding(config=self.config)
            self.inv_freq = fresh.inv_freq.to(self.inv_freq.device)
            self.original_inv_freq = fresh.original_inv_freq.to(self.inv_freq.device)
        return self


def keep_rope_float32(lm: LlamaForCausalLM) -> LlamaForCausalLM:
    """Rebuild a causal LM's RoPE buffers in float32 on its device (after a ``.to(dtype)``)."""
    lm.model.rotary_emb = LlamaRotaryEmbedding(config=lm.config).to(lm.device)
    return lm


def mtp_config_from_causal_lm(source: LlamaConfig, n_future: int) -> MTPConfig:
    """The MTP config of a causal LM whose last layer becomes head 0 and is copied into ``n_future - 1``
    more heads (untied unembedding)."""
    kwargs = {k: v for k, v in source.to_dict().items()
              if k not in ("architectures", "model_type", "transformers_version", "n_future_tokens")}
    kwargs["tie_word_embeddings"] = False
    kwargs["num_hidden_layers"] = source.num_hidden_layers - 1 + n_future
    return mtp_config(n_future, **kwargs)


def causal_lm_key_map(config: LlamaConfig, tied: bool) -> dict[str, str]:
    """`MTPModel` key -> the causal LM's key it is read from (`mtp_config_from_causal_lm`'s layout): trunk
    block ``i`` is layer ``i``, every head is the last layer, the unembedding is ``lm_head`` (the embedding
    when ``tied``)."""
    n_future = config.n_future_tokens
    n_trunk = config.num_hidden_layers - n_future
    with torch.device("meta"):
        block = LlamaDecoderLayer(config, 0)
    names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "model.embed_tokens.weight" if tied else "lm_head.weight"}
    for suffix in block.state_dict():
        for i in range(n_trunk):
            names[f"trunk.{i}.{suffix}"] = f"model.layers.{i}.{suffix}"
        for k in range(n_future):
            names[f"heads.{k}.{suffix}"] = f"model.layers.{n_trunk}.{suffix}"
    return names


class Unembedding(nn.Linear):
    """The shared output projection; with ``targets`` it returns chunked per-token cross-entropy.

    Going through ``__call__`` for the loss as well lets FSDP's module hooks gather the weight.
    """

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                chunk_size: int = 512) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        from wmtp_lib.model.losses import chunked_linear_ce

        if valid is None:
            valid = torch.ones_like(targets, dtype=torch.bool)
        return chunked_linear_ce(hidden, self.weight, targets, valid, chunk_size)


@dataclass
class TrunkState:
    """What the head blocks need from a trunk pass: its output and the shared attention context."""

    hidden: torch.Tensor
    attention_mask: Any
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    cache: Cache | None


class MTPModel(nn.Module):
    """Trunk + ``n_future`` head blocks + shared norm and unembedding; logits ``(B, T, H, V)``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        validate_mtp_config(config)
        config._attn_implementation = "sdpa"
        self.config = config
        n_layers = config.num_hidden_layers
        n_future = config.n_future_tokens
        n_trunk = n_layers - n_future
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Unique layer_idx per block so one KV cache can hold the trunk and every head.
        self.trunk = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(n_trunk)])
        self.heads = nn.ModuleList([LlamaDecoderLayer(config, n_trunk + k) for k in range(n_future)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = Unembedding(config.hidden_size, config.vocab_size, bias=False)
        self.rotary_emb = Float32RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.reset_parameters()

    # ------------------------------------------------------------------ properties
    @property
    def n_future(self) -> int:
        """Number of prediction heads ``H``."""
        return int(self.config.n_future_tokens)

    @property
    def n_trunk(self) -> int:
        return len(self.trunk)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def reset_parameters(self) -> None:
        """Llama's initialisation: normal(0, initializer_range) for matrices, ones for norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, LlamaRMSNorm):
                nn.init.ones_(module.weight)

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Recompute trunk block activations in backward instead of storing them."""
        self.gradient_checkpointing = enabled

    def reset_rotary(self, device: str | torch.device) -> None:
        """Recompute the RoPE buffers in float32 on ``device``. They are not persistent, so loading a state
        dict never fills them: a model built on the meta device (or materialised with ``to_empty``) holds
        no values there until this runs."""
        fresh = Float32RotaryEmbedding(config=self.config)
        self.rotary_emb.inv_freq = fresh.inv_freq.to(device)
        self.rotary_emb.original_inv_freq = fresh.original_inv_freq.to(device)

    # ------------------------------------------------------------------ forward pieces
    def forward_trunk(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> TrunkState:
        """Embed and run the trunk blocks; returns the trunk output and the attention context.

        ``attention_mask`` ``(B, T)`` marks real tokens (right padding). ``position_ids`` ``(B, T)``,
        without a cache, marks packed rows: positions restart at 0 where a document starts and each
        document attends only to itself (block-diagonal causal mask, `wmtp_lib.model.packing`).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        embeds = self.embed_tokens(input_ids)
        documents = None
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        elif cache is None:
            if position_ids.dim() == 2 and position_ids.shape[0] == 1:
                position_ids = position_ids.expand(input_ids.shape[0], -1)  # one row of positions for all
            if tuple(position_ids.shape) != tuple(input_ids.shape):
                raise ValueError(f"position_ids shape {tuple(position_ids.shape)} must equal input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            # Always masked by document when positions are given (deciding whether a row restarts would
            # cost a host sync); rows that do not restart get the plain causal mask's values.
            documents = packed_sequence_mask_function(document_ids(position_ids))
            # The 2D padding mask is dropped: a packed row's padding tail restarts its positions, so it is a
            # document of its own and the document mask already keeps it apart. Combined with it, the tail's
            # query rows would be fully masked (NaN on some CUDA SDPA backends). All ones rather than None:
            # with no 2D mask transformers would detect the packing itself (a host sync).
            attention_mask = torch.ones_like(input_ids)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            and_mask_function=documents,
            **{_MASK_CACHE_KW: cache},
        )
        position_embeddings = self.rotary_emb(embeds, position_ids=position_ids)
        hidden = embeds
        for block in self.trunk:
            hidden = self._run_block(block, hidden, mask, position_ids, position_embeddings, cache)
        return TrunkState(hidden, mask, position_ids, position_embeddings, cache)

    def _run_block(self, block, hidden, mask, position_ids, position_embeddings, cache):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            def run(h: torch.Tensor) -> torch.Tensor:
                return block(h, attention_mask=mask, position_ids=position_ids,
                             position_embeddings=position_embeddings)

            return checkpoint(run, hidden, use_reentrant=False)
        return block(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
            **{_BLOCK_CACHE_KW: cache},
        )

    def forward_head(self, k: int, state: TrunkState, trunk_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Head ``k``'s normed hidden state ``(B, T, D)`` (before the unembedding).

        ``trunk_hidden`` replaces ``state.hidden`` (e.g. a detached copy for the sequential step).
        """
        hidden = state.hidden if trunk_hidden is None else trunk_hidden
        out = self.heads[k](
            hidden,
            attention_mask=state.attention_mask,
            position_ids=state.position_ids,
            use_cache=state.cache is not None,
            **{_BLOCK_CACHE_KW: state.cache},
            position_embeddings=state.position_embeddings,
        )
        return self.norm(out)

    def head_logits(self, k: int, state: TrunkState) -> torch.Tensor:
        """Float logits ``(B, T, V)`` of head ``k``."""
        return self.lm_head(self.forward_head(k, state)).float()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
        position_ids: torch.Tensor | None = None, return_trunk: bool = False, cache: Cache | None = None,
    ) -> torch.Tensor | TrunkState:
        """Float logits ``(B, T, H, V)``: entry ``[b, t, k]`` scores token ``t + k + 1``.

        ``position_ids`` ``(B, T)`` (optional) restarting at 0 per document makes a packed row: no
        document attends to another (see `forward_trunk`). ``return_trunk=True`` returns the
        `TrunkState` instead (the sequential step and sampling go through ``__call__`` so that FSDP's
        hooks gather the root parameters); ``cache`` is a KV cache for decoding.
        """
        state = self.forward_trunk(input_ids, attention_mask, position_ids, cache=cache)
        if return_trunk:
            return state
        return torch.stack([self.head_logits(k, state) for k in range(self.n_future)], dim=2)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path, max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
        """Write ``config.json`` and safetensors (dtype kept): ``model.safetensors``, or shards of at most
        ``max_shard_size`` with ``model.safetensors.index.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config["n_future_tokens"] = self.n_future
        config["torch_dtype"] = dtype_name(self.dtype)
        config["architectures"] = ["MTPModel"]
        config["model_type"] = MODEL_TYPE
        config.pop("_attn_implementation_autoset", None)
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_torch_state_dict(state, str(path), filename_pattern="model{suffix}.safetensors",
                              max_shard_size=max_shard_size,
                              metadata={"format": "pt", "n_future_tokens": str(self.n_future)})
        return path

    @classmethod
    def config_from_dir(cls, path: str | Path) -> LlamaConfig:
        """Read an MTP ``config.json``; errors name the file and the bad field."""
        cfg_path = Path(path) / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found: not an MTPModel directory (convert it with "
                                    f"`python -m wmtp_lib.checkpoints convert SRC {path}`)")
        raw = json.loads(cfg_path.read_text())
        if "n_future_tokens" not in raw:
            raise ValueError(f"{cfg_path}: missing n_future_tokens (is this a plain causal LM? use "
                             "MTPModel.from_causal_lm)")
        n_future = raw.pop("n_future_tokens")
        stored = raw.pop("torch_dtype", None) or raw.pop("dtype", None)
        for key in ("architectures", "model_type", "transformers_version", "dtype"):
            raw.pop(key, None)
        config = mtp_config(n_future, **raw)
        if stored is not None and stored not in _DTYPES:
            raise ValueError(f"{cfg_path}: torch_dtype {stored!r} is not one of {sorted(_DTYPES)}")
        config.wmtp_dtype = stored
        return config

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> "MTPModel":
        """Load a directory written by `save_pretrained` or `convert_checkpoint`; strict on keys."""
        path = Path(path)
        config = cls.config_from_dir(path)
        state = load_safetensors_dir(path)
        stored_dtype = _DTYPES.get(config.wmtp_dtype or "", None)
        del config.wmtp_dtype
        if stored_dtype is None:
            stored_dtype = next(iter(state.values())).dtype
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=True, assign=True)
        # Non-persistent RoPE buffers were created on meta; rebuild them.
        model.rotary_emb = Float32RotaryEmbedding(config=config)
        model = model.to(device=device, dtype=dtype or stored_dtype)
        return model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Strict load with an error that names every missing and unexpected key."""
        if not strict:
            raise ValueError("MTPModel loads are always strict: a missing weight is an error")
        expected = set(self.state_dict().keys())
        given = set(state_dict.keys())
        missing = sorted(expected - given)
        unexpected = sorted(given - expected)
        if missing or unexpected:
            raise KeyError(
                f"checkpoint does not match MTPModel: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}"
                f" ({len(missing)}), unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
                f" ({len(unexpected)})"
            )
        own = self.state_dict()
        for name, tensor in state_dict.items():
            if tuple(own[name].shape) != tuple(tensor.shape):
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                                 f"model {tuple(own[name].shape)}")
        return super().load_state_dict(state_dict, strict=True, assign=assign)

    # ------------------------------------------------------------------ causal-LM interop
    @classmethod
    def from_causal_lm(cls, source: LlamaForCausalLM, n_future: int) -> "MTPModel":
        """Any Llama-family causal LM → MTP model: last layer is head 0, extra heads copy it.

        Head 0 then reproduces the source model's logits exactly. A staged causal LM's directory is read with
        `wmtp_lib.checkpoints.convert.load_causal_lm`, in the checkpoints layer above this one.
        """
        config = mtp_config_from_causal_lm(source.config, n_future)
        with torch.device("meta"):
            model = cls(config)
        src = source.state_dict()
        state, used = {}, set()
        for name, key in causal_lm_key_map(config, bool(source.config.tie_word_embeddings)).items():
            # a source tensor that fills several keys (extra heads, tied unembedding) is copied after its first use
            state[name] = src[key].clone() if key in used else src[key]
            used.add(key)
        model.load_state_dict(state, strict=True, assign=True)
        model.rotary_emb = Float32RotaryEmbedding(config=config)
        return model.to(device=source.device, dtype=source.dtype)

    def head0_causal_lm(self) -> LlamaForCausalLM:
        """A plain `LlamaForCausalLM` (trunk + head 0) whose logits equal head 0's."""
        kwargs = {k: v for k, v in self.config.to_dict().items()
                  if k not in ("architectures", "model_type", "transformers_version", "n_future_tokens")}
        kwargs["num_hidden_layers"] = self.n_trunk + 1
        config = LlamaConfig(**kwargs)
        config.architectures = ["LlamaForCausalLM"]
        state = {"model.embed_tokens.weight": self.embed_tokens.weight, "model.norm.weight": self.norm.weight,
                 "lm_head.weight": self.lm_head.weight}
        for i, block in enumerate(list(self.trunk) + [self.heads[0]]):
            for name, tensor in block.state_dict().items():
                state[f"model.layers.{i}.{name}"] = tensor
        with torch.device("meta"):
            lm = LlamaForCausalLM(config)
        lm.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
        lm.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # its buffers were built on meta
        return keep_rope_float32(lm.to(device=self.device, dtype=self.dtype)).eval()

    def export_head0(self, dst: str | Path) -> Path:
        """Write head 0 as a plain `LlamaForCausalLM` directory (config + safetensors)."""
        dst = Path(dst)
        self.head0_causal_lm().save_pretrained(dst)
        return dst

    def copy(self) -> "MTPModel":
        return copy.deepcopy(self)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class TensorLocation:
    """Where one tensor's bytes lie in a safetensors file (offsets from the file's start)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


class SafetensorsReader:
    """A model's safetensors files read one tensor at a time: the headers first (names, dtypes, shapes,
    offsets), then each tensor with a plain read of its bytes, so no whole file is loaded or mapped.

    The files are the shards named by ``model.safetensors.index.json`` when there is one (each key must be
    in the shard the index names), else ``model.safetensors``/``pattern`` files (side files such as
    ``value_head.safetensors`` are not model weights); a key in two shards is an error.
    """

    def __init__(self, path: str | Path, pattern: str = "model*.safetensors"):
        self.path = Path(path)
        index_file = self.path / WEIGHTS_INDEX_NAME
        weight_map = None
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_file}: no weight_map")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{index_file} names shards that are missing: {missing}")
        else:
            files = sorted(p.name for p in self.path.glob(pattern))
            if not files:
                raise FileNotFoundError(f"no {pattern} files in {self.path}")
        self.locations: dict[str, TensorLocation] = {}
        for file in files:
            for name, location in _safetensors_header(self.path / file).items():
                if name in self.locations:
                    raise ValueError(f"tensor {name} appears in more than one shard of {self.path}")
                if weight_map is not None and weight_map.get(name) != file:
                    raise ValueError(f"{index_file}: tensor {name} found in {file}, index says {weight_map.get(name)}")
                self.locations[name] = location
        if weight_map is not None and set(weight_map) != set(self.locations):
            raise ValueError(f"{index_file}: index lists {sorted(set(weight_map) - set(self.locations))[:8]} "
                             "not in any shard")

    def keys(self) -> list[str]:
        return list(self.locations)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, as stored (dtype kept), in a fresh CPU buffer."""
        location = self.locations[name]
        out = torch.empty(location.shape, dtype=location.dtype)
        if out.numel():
            with open(location.file, "rb") as fh:
                fh.seek(location.start)
                view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
                if fh.readinto(view) != location.stop - location.start:
                    raise ValueError(f"{location.file}: tensor {name} is truncated")
        return out

    def check(self, expected: dict[str, tuple[tuple[int, ...], str]], ignored_suffixes: tuple[str, ...] = ()
              ) -> str | None:
        """``None`` when the files hold exactly ``expected`` (source key -> (shape, what the model calls it)),
        keys ending in ``ignored_suffixes`` aside, else the error message (missing and unexpected keys, or
        the first wrong shape)."""
        missing = sorted(set(expected) - set(self.locations))
        unexpected = sorted(k for k in set(self.locations) - set(expected) if not k.endswith(ignored_suffixes))
        if missing or unexpected:
            return (f"{self.path} does not match MTPModel: missing keys {missing[:8]}"
                    f"{'...' if len(missing) > 8 else ''} ({len(missing)}), unexpected keys {unexpected[:8]}"
                    f"{'...' if len(unexpected) > 8 else ''} ({len(unexpected)})")
        for name, (shape, target) in expected.items():
            if self.locations[name].shape != tuple(shape):
                return (f"shape mismatch for {target}: checkpoint {self.locations[name].shape}, "
                        f"model {tuple(shape)}")
        return None


def _safetensors_header(file: Path) -> dict[str, TensorLocation]:
    """The tensors a safetensors file holds, from its header alone (8-byte little-endian length + JSON)."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    base = 8 + size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
        start, stop = info["data_offsets"]
        out[name] = TensorLocation(file, _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), base + start,
                                   base + stop)
    return out


def load_safetensors_dir(path: str | Path, pattern: str = "model*.safetensors") -> dict[str, torch.Tensor]:
    """All tensors of a model's safetensors in ``path`` (the files and checks of `SafetensorsReader`)."""
    reader = SafetensorsReader(path, pattern)
    return {name: reader.read(name) for name in reader.keys()}
