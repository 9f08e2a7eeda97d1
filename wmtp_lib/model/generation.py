"""Decoding with an `MTPModel`: sampling from head 0 with a KV cache, greedy decoding, and
self-speculative decoding (heads 1..H-1 draft, head 0 verifies) whose output equals greedy head-0
decoding token for token."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from wmtp_lib.model.heads import MTPModel


def new_cache(model: MTPModel) -> DynamicCache:
    return DynamicCache(config=model.config)


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the mass before it already reaches top_p (the top token always stays)
    drop = (probs.cumsum(-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


@torch.no_grad()
def sample(model: MTPModel, prompt_ids: list[int], n: int, max_new_tokens: int, temperature: float = 0.8,
           top_p: float = 0.95, eos_id: int | None = None, generator: torch.Generator | None = None,
           fixed_steps: bool = False) -> list[list[int]]:
    """``n`` continuations of one prompt, batched, from head 0 with a KV cache (greedy when temperature is 0).

    The trunk runs through ``model(...)`` so that FSDP2's root hooks gather the sharded embedding.
    ``fixed_steps=True`` always runs ``max_new_tokens`` forwards (no early stop when all rows ended):
    processes that share a sharded model must run the same number of forwards.
    """
    model.eval()
    device = model.device
    ids = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
    cache = new_cache(model)
    state = model(ids, cache=cache, return_trunk=True)
    logits = model.lm_head(model.forward_head(0, state)[:, -1]).float()
    out = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(_filter_top_p(logits / temperature, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        for i in range(n):
            if not done[i]:
                out[i].append(int(nxt[i]))
        if eos_id is not None:
            done |= nxt == eos_id
        if not fixed_steps and bool(done.all()):
            break
        state = model(nxt.unsqueeze(1), cache=cache, return_trunk=True)
        logits = model.lm_head(model.forward_head(0, state)[:, -1]).float()
    return out


@torch.no_grad()
def greedy(model: MTPModel, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy head-0 decoding with a KV cache (trunk + head 0 only)."""
    return sample(model, prompt_ids, 1, max_new_tokens, temperature=0.0, eos_id=eos_id)[0]


@dataclass
class SpeculativeResult:
    tokens: list[int]
    forwards: int

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(1, self.forwards)


def every_head_argmax(model: MTPModel, state, last_only: bool = False) -> torch.Tensor:
    """Greedy token of every head at every position of ``state`` (one sequence): ``(H, T)``, or ``(H, 1)``
    at the last position when ``last_only``.

    The head blocks run one after another (each has its own weights and KV cache and must see every fed
    token); their final hidden states are stacked so the norm + unembedding is one batched call.
    """
    hidden = torch.cat([model.forward_head(k, state) for k in range(model.n_future)])  # (H, T, D)
    if last_only:
        hidden = hidden[:, -1:]
    return model.lm_head(hidden).argmax(-1)


@torch.no_grad()
def speculative_greedy(model: MTPModel, prompt_ids: list[int], max_new_tokens: int,
                       eos_id: int | None = None) -> SpeculativeResult:
    """Self-speculative greedy decoding.

    Each forward feeds the last accepted token followed by the drafts of heads 1..H-1 from the previous
    forward; head 0's greedy predictions at those positions verify the drafts left to right. Accepted
    drafts plus head 0's next token are emitted, and the cache is cropped back to what was accepted.
    """
    model.eval()
    H = model.n_future
    device = model.device
    cache = new_cache(model)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    state = model.forward_trunk(ids, cache=cache)
    predicted = every_head_argmax(model, state, last_only=True)  # (H, 1)
    forwards = 1
    nxt, drafts = int(predicted[0, 0]), predicted[1:, 0].tolist()
    out: list[int] = []
    while True:
        out.append(nxt)
        if len(out) >= max_new_tokens or (eos_id is not None and nxt == eos_id):
            break
        budget = max_new_tokens - len(out)
        drafts = drafts[:budget]
        feed = [nxt] + drafts
        seen = cache.get_seq_length()
        state = model.forward_trunk(torch.tensor([feed], dtype=torch.long, device=device), cache=cache)
        # every head at every fed position in one unembedding call and one host sync: head 0 verifies,
        # heads 1..H-1 at the last accepted position draft the next forward's tokens
        predicted = every_head_argmax(model, state).tolist()  # (H, len(feed))
        forwards += 1
        verified = predicted[0]
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == verified[accepted]:
            accepted += 1
        stop = False
        for tok in drafts[:accepted]:
            out.append(tok)
            if eos_id is not None and tok == eos_id:
                stop = True
                break
        if stop or len(out) >= max_new_tokens:
            out = out[:max_new_tokens]
            break
        # keep the cache of the fed tokens that were accepted (nxt + accepted drafts)
        surplus = cache.get_seq_length() - (seen + 1 + accepted)
        if surplus > 0:
            cache.crop(-surplus)
        nxt = verified[accepted]
        drafts = [predicted[k][accepted] for k in range(1, H)]
    return SpeculativeResult(out, forwards)


def speculative_benchmark(model: MTPModel, prompts: list[list[int]], max_new_tokens: int,
                          eos_id: int | None = None, repeats: int = 3) -> dict[str, Any]:
    """Accepted tokens per forward and wall-clock speed-up of speculative over greedy decoding (same cache).

    Both decoders first run once on one prompt (allocator, thread pools); then each decodes every prompt
    ``repeats`` times, the order of the two alternating between repeats so that a neighbour's load or a
    clock change hits both alike. Each repeat gives a paired ratio (greedy time / speculative time, run back
    to back); the speed-up is their median, with their range, and the times are the medians per decoder.
    """
    if not prompts:
        raise ValueError("speculative_benchmark needs at least one prompt")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    greedy(model, prompts[0], min(8, max_new_tokens), eos_id)
    speculative_greedy(model, prompts[0], min(8, max_new_tokens), eos_id)

    def timed(decode):
        t0 = time.perf_counter()
        outs = [decode(model, p, max_new_tokens, eos_id) for p in prompts]
        return outs, time.perf_counter() - t0

    t_greedy, t_spec = [], []
    for r in range(repeats):
        if r % 2 == 0:
            greedy_out, tg = timed(greedy)
            spec, ts = timed(speculative_greedy)
        else:
            spec, ts = timed(speculative_greedy)
            greedy_out, tg = timed(greedy)
        t_greedy.append(tg)
        t_spec.append(ts)
    identical = sum(g == s.tokens for g, s in zip(greedy_out, spec))
    tokens = sum(len(s.tokens) for s in spec)
    ratios = [g / max(s, 1e-9) for g, s in zip(t_greedy, t_spec)]
    return {
        "prompts": len(prompts),
        "identical_to_greedy": identical,
        "tokens_per_forward": tokens / max(1, sum(s.forwards for s in spec)),
        "greedy_seconds": statistics.median(t_greedy),
        "speculative_seconds": statistics.median(t_spec),
        "speedup": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "speedup_per_repeat": ratios,
        "repeats": repeats,
        "tokens": tokens,
    }
