"""Self-speculative decoding computes every head's draft and verify logits in one unembedding call per forward."""

from __future__ import annotations

import torch

from tiny_models import tiny_config
from wmtp_lib.generation import greedy, speculative_greedy
from wmtp_lib.heads import MTPModel


def test_one_batched_unembedding_per_forward_and_greedy_output():
    torch.manual_seed(5)
    model = MTPModel(tiny_config(n_future=4, layers=6)).eval()
    for k in (1, 2, 3):  # heads that agree with head 0 make drafts get accepted
        model.heads[k].load_state_dict(model.heads[0].state_dict())
    calls: list[tuple[int, ...]] = []
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    try:
        prompt = [3, 1, 4, 1, 5, 9, 2, 6]
        result = speculative_greedy(model, prompt, 30)
    finally:
        handle.remove()
    assert result.tokens == greedy(model, prompt, 30)
    assert len(calls) == result.forwards
    # each call carries all 4 heads: (H, positions, D)
    assert all(shape[0] == 4 and len(shape) == 3 for shape in calls), calls
