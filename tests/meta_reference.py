"""An independent forward pass of Meta's multi-token Llama layout, written for the tests.

It reads Meta's state dict directly (interleaved RoPE as complex rotations, ``layers.*`` then
``extra_heads.*``) and shares no code with `wmtp_lib`.
"""

from __future__ import annotations

import math

import torch


def random_meta_checkpoint(dim=32, n_layers=5, n_heads=4, n_kv_heads=None, vocab=67, n_future=3,
                           multiple_of=16, ffn_dim_multiplier=None, dtype=torch.float32, seed=0,
                           rope_freqs=False, norm_eps=1e-5, rope_theta=10000.0):
    g = torch.Generator().manual_seed(seed)
    kv = n_kv_heads or n_heads
    hd = dim // n_heads
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)

    def r(*shape, scale=0.08):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    state = {"tok_embeddings.weight": r(vocab, dim, scale=1.0), "norm.weight": (1 + r(dim, scale=0.1)).to(dtype),
             "output.weight": r(vocab, dim)}
    names = [f"layers.{i}." for i in range(n_layers - n_future + 1)]
    names += [f"extra_heads.{j}." for j in range(n_future - 1)]
    for p in names:
        state[p + "attention.wq.weight"] = r(n_heads * hd, dim)
        state[p + "attention.wk.weight"] = r(kv * hd, dim)
        state[p + "attention.wv.weight"] = r(kv * hd, dim)
        state[p + "attention.wo.weight"] = r(dim, n_heads * hd)
        state[p + "feed_forward.w1.weight"] = r(hidden, dim)
        state[p + "feed_forward.w2.weight"] = r(dim, hidden)
        state[p + "feed_forward.w3.weight"] = r(hidden, dim)
        state[p + "attention_norm.weight"] = (1 + r(dim, scale=0.1)).to(dtype)
        state[p + "ffn_norm.weight"] = (1 + r(dim, scale=0.1)).to(dtype)
    if rope_freqs:
        state["rope.freqs"] = 1.0 / (rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "vocab_size": vocab,
              "multiple_of": multiple_of, "norm_eps": norm_eps, "rope_theta": rope_theta,
              "n_future_tokens": n_future}
    if n_kv_heads is not None:
        params["n_kv_heads"] = n_kv_heads
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    return state, params


def _rms(x, w, eps):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def _rope(x, angles):
    # x: (B, T, nh, hd); consecutive pairs are (real, imag)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    rot = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.view_as_real(xc * rot).flatten(3)


def _block(state, p, x, params, angles):
    n_heads = params["n_heads"]
    kv = params.get("n_kv_heads") or n_heads
    dim = params["dim"]
    hd = dim // n_heads
    eps = params["norm_eps"]
    B, T, _ = x.shape
    f = lambda name: state[p + name].float()  # noqa: E731
    h = _rms(x, f("attention_norm.weight"), eps)
    q = (h @ f("attention.wq.weight").t()).view(B, T, n_heads, hd)
    k = (h @ f("attention.wk.weight").t()).view(B, T, kv, hd)
    v = (h @ f("attention.wv.weight").t()).view(B, T, kv, hd)
    q, k = _rope(q, angles), _rope(k, angles)
    rep = n_heads // kv
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    scores = scores.masked_fill(causal, float("-inf")).softmax(-1)
    att = torch.einsum("bhts,bshd->bthd", scores, v).reshape(B, T, dim)
    x = x + att @ f("attention.wo.weight").t()
    h = _rms(x, f("ffn_norm.weight"), eps)
    ff = torch.nn.functional.silu(h @ f("feed_forward.w1.weight").t()) * (h @ f("feed_forward.w3.weight").t())
    return x + ff @ f("feed_forward.w2.weight").t()


def meta_forward(state, params, x):
    """Logits (B, T, H, V) in float32, Meta's way."""
    n_layers, H = params["n_layers"], params.get("n_future_tokens", 1)
    hd = params["dim"] // params["n_heads"]
    theta = params.get("rope_theta", 10000.0)
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.outer(torch.arange(x.shape[1]).float(), freqs)
    h = state["tok_embeddings.weight"].float()[x]
    n_trunk = n_layers - H
    for i in range(n_trunk):
        h = _block(state, f"layers.{i}.", h, params, angles)
    outs = []
    for p in [f"layers.{n_trunk}."] + [f"extra_heads.{j}." for j in range(H - 1)]:
        y = _block(state, p, h, params, angles)
        y = _rms(y, state["norm.weight"].float(), params["norm_eps"])
        outs.append(y @ state["output.weight"].float().t())
    return torch.stack(outs, dim=2)
