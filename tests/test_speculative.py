"""Self-speculative decoding computes every head's draft and verify logits in one unembedding call per forward."""

from __future__ import annotations

import torch
from tiny_models import tiny_config

from wmtp_lib.model.generation import greedy, speculative_greedy
from wmtp_lib.model.heads import MTPModel


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


def test_benchmark_times_both_decoders_in_alternating_order_after_a_warm_up(monkeypatch):
    import pytest

    from wmtp_lib.model import generation

    torch.manual_seed(5)
    model = MTPModel(tiny_config(n_future=4, layers=6)).eval()
    order: list[str] = []
    real_greedy, real_spec = generation.greedy, generation.speculative_greedy
    monkeypatch.setattr(generation, "greedy", lambda *a, **k: order.append("g") or real_greedy(*a, **k))
    monkeypatch.setattr(generation, "speculative_greedy", lambda *a, **k: order.append("s") or real_spec(*a, **k))
    # scripted clock: every timed pass reads it at its start and end; durations in call order are
    # repeat 1 greedy 4 s then speculative 1 s, repeat 2 speculative 5 s then greedy 6 s, repeat 3 greedy 2 s
    # then speculative 3 s: paired ratios 4.0, 1.2, 0.67
    durations = iter([4.0, 1.0, 5.0, 6.0, 2.0, 3.0])
    reads = [0]

    def fake_perf_counter() -> float:
        reads[0] += 1
        if reads[0] % 2 == 0:
            fake_perf_counter.now += next(durations)
        return fake_perf_counter.now

    fake_perf_counter.now = 0.0
    monkeypatch.setattr(generation.time, "perf_counter", fake_perf_counter)
    prompts = [[3, 1, 4, 1], [5, 9, 2, 6, 5]]
    res = generation.speculative_benchmark(model, prompts, 12, repeats=3)
    # warm-up (one prompt each), then g g s s | s s g g | g g s s: a neighbour's load hits both alike
    assert "".join(order) == "gs" + "ggss" + "ssgg" + "ggss"
    assert res["identical_to_greedy"] == 2
    assert res["speedup_per_repeat"] == pytest.approx([4.0, 1.2, 2 / 3])
    # the median paired ratio; the ratio of median (or mean) times would be 4/3
    assert res["speedup"] == pytest.approx(1.2)
    assert (res["speedup_min"], res["speedup_max"]) == pytest.approx((2 / 3, 4.0))
    assert (res["greedy_seconds"], res["speculative_seconds"]) == pytest.approx((4.0, 3.0))
    with pytest.raises(ValueError, match="repeats"):
        generation.speculative_benchmark(model, prompts, 12, repeats=0)
    with pytest.raises(ValueError, match="at least one prompt"):
        generation.speculative_benchmark(model, [], 12)
