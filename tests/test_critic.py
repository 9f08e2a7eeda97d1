"""Critic math against per-element loops."""

from __future__ import annotations

import pytest
import torch

from wmtp_lib.critic import align_td, gae, sparse_rewards, state_mask_from_labels, td_errors, value_targets


def _mask():
    label = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return label, state_mask_from_labels(label)


def test_state_mask_and_sparse_reward_at_last_state():
    label, m = _mask()
    assert m.tolist() == [[False, True, True, True, False, False], [True, True, True, True, True, False]]
    r = sparse_rewards(torch.tensor([2.0, -1.0]), m)
    assert r[0].tolist() == [0, 0, 0, 2.0, 0, 0]
    assert r[1].tolist() == [0, 0, 0, 0, -1.0, 0]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_td_and_gae_match_loops(gamma, lam):
    torch.manual_seed(0)
    _, m = _mask()
    v = torch.randn(2, 6)
    r = sparse_rewards(torch.tensor([1.5, 0.3]), m)
    delta = td_errors(v, r, m, gamma)
    adv = gae(delta, m, gamma, lam)
    for b in range(2):
        states = [t for t in range(6) if m[b, t]]
        for t in range(6):
            if t not in states:
                assert delta[b, t] == 0 and adv[b, t] == 0
                continue
            nxt = v[b, t + 1].item() if (t + 1) in states else 0.0
            expect = r[b, t].item() + gamma * nxt - v[b, t].item()
            assert delta[b, t].item() == pytest.approx(expect, abs=1e-6)
            a, coef = 0.0, 1.0
            for u in range(t, 6):
                if u not in states:
                    break
                a += coef * delta[b, u].item()
                coef *= gamma * lam
            assert adv[b, t].item() == pytest.approx(a, abs=1e-5)
    _, targets = value_targets(v, r, m, gamma, lam)
    torch.testing.assert_close(targets, torch.where(m, adv + v, torch.zeros_like(v)))


def test_lambda_one_gamma_one_targets_are_the_reward():
    _, m = _mask()
    v = torch.randn(2, 6)
    r = sparse_rewards(torch.tensor([1.5, 0.3]), m)
    _, targets = value_targets(v, r, m, 1.0, 1.0)
    assert torch.allclose(targets[0][m[0]], torch.full((3,), 1.5))
    assert torch.allclose(targets[1][m[1]], torch.full((5,), 0.3))


def test_align_td_matches_transition_of_each_head():
    delta = torch.arange(12.0).view(2, 6)
    td = align_td(delta, 3)
    for b in range(2):
        for t in range(6):
            for k in range(3):
                assert td[b, t, k].item() == (delta[b, t + k].item() if t + k < 6 else 0.0)


def test_value_head_init_ignores_global_rng_draws_made_on_one_rank_only():
    from wmtp_lib.critic import seeded_value_head

    torch.manual_seed(0)
    a = seeded_value_head(16, seed=7)
    torch.manual_seed(0)
    torch.randn(1000)  # rank-0-only work (reward model init, tiny-model staging) draws from the global RNG
    after_draws = torch.get_rng_state()
    b = seeded_value_head(16, seed=7)
    assert torch.equal(torch.get_rng_state(), after_draws)  # the global stream is left untouched
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(seeded_value_head(16, seed=8).fc1.weight, a.fc1.weight)


def test_reward_cache_of_other_samples_or_reward_model_is_refused(tmp_path):
    from safetensors.torch import save_file

    from wmtp_lib.data import Sample
    from wmtp_lib.distributed import Dist
    from wmtp_lib.weighting import reward_cache_key, sequence_rewards

    cfg = {"critic": {"reward_source": "model"}, "models": {"reward": "rm-a"}}
    samples = [Sample("a", "def f():", " return 1"), Sample("b", "def g():", " pass")]
    save_file({"rewards": torch.tensor([0.5, 1.0])}, str(tmp_path / "rewards.safetensors"),
              metadata={"key": reward_cache_key(cfg, samples)})
    edited = [samples[0], Sample("b", "def g():", " return 2")]
    other_rm = {**cfg, "models": {"reward": "rm-b"}}
    for c, s in ((cfg, edited), (other_rm, samples)):
        with pytest.raises(RuntimeError, match="rewards of other samples or another reward.*new run_name"):
            sequence_rewards(c, None, s, None, Dist(torch.device("cpu")), tmp_path, lambda m: tmp_path / m)


def test_rollout_cache_of_other_samples_is_refused(tmp_path):
    import json

    from wmtp_lib.data import Sample
    from wmtp_lib.distributed import Dist
    from wmtp_lib.rollouts import build_rollout_data, rollout_cache_key

    cfg = {"seed": 1, "train": {}, "critic": {"rollouts": 2, "rollout_max_new_tokens": 8, "rollout_temperature": 1.0}}
    samples = [Sample("a", "def f():", " return 1")]
    cache = tmp_path / "rollouts.json"
    cache.write_text(json.dumps({"key": rollout_cache_key(samples, cfg), "samples": [], "rewards": []}))
    edited = [Sample("a", "def f():", " return 2")]
    with pytest.raises(RuntimeError, match="rollouts of other samples.*new run_name"):
        build_rollout_data(None, None, edited, cfg, cache, Dist(torch.device("cpu")))
    assert rollout_cache_key(samples, cfg) != rollout_cache_key(samples, {**cfg, "seed": 2})
