"""Critic math against per-element loops."""

from __future__ import annotations

import pytest
import torch

from wmtp_lib.model.packing import document_ids
from wmtp_lib.train.critic import (
    advantages,
    align_scores,
    auc,
    bootstrap_mask,
    explained_variance,
    gae,
    mc_returns,
    rms_normalize,
    sparse_rewards,
    state_mask_from_labels,
    td_errors,
)


def _mask():
    label = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return label, state_mask_from_labels(label)


def test_state_mask_and_sparse_reward_at_last_state():
    label, m = _mask()
    assert m.tolist() == [[False, True, True, True, False, False], [True, True, True, True, True, False]]
    r = sparse_rewards(torch.tensor([2.0, -1.0]), m)
    assert r[0].tolist() == [0, 0, 0, 2.0, 0, 0]
    assert r[1].tolist() == [0, 0, 0, 0, -1.0, 0]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)])
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
    torch.testing.assert_close(advantages(v, r, m, gamma, lam), adv)
    if lam == 0.0:  # v2's score is the special case λ_w = 0
        torch.testing.assert_close(adv, delta)


def test_monte_carlo_returns_are_the_discounted_reward_and_gae_one_telescopes_to_them():
    _, m = _mask()
    torch.manual_seed(1)
    v = torch.randn(2, 6)
    r = sparse_rewards(torch.tensor([1.5, 0.3]), m)
    g = mc_returns(r, m, 1.0)
    assert torch.allclose(g[0][m[0]], torch.full((3,), 1.5)) and torch.allclose(g[1][m[1]], torch.full((5,), 0.3))
    g9 = mc_returns(r, m, 0.9)
    assert g9[1].tolist()[:5] == pytest.approx([0.3 * 0.9 ** (4 - t) for t in range(5)], abs=1e-6)
    # A(λ=1) + V is the Monte-Carlo return whatever V is
    torch.testing.assert_close(torch.where(m, advantages(v, r, m, 0.9, 1.0) + v, torch.zeros_like(v)), g9)


def test_a_cut_document_gets_no_terminal_reward_and_bootstraps_from_v():
    # row 1 was cut by max_length: its last target is x[5], not EOS; the state before it bootstraps from V(h_5)
    label, m = _mask()
    cut = torch.tensor([[False] * 6, [True] * 6])
    v = torch.arange(12.0).view(2, 6) / 10
    r = sparse_rewards(torch.tensor([2.0, -1.0]), m, cut=cut)
    assert r[1].abs().sum() == 0 and r[0, 3] == 2.0
    boot = bootstrap_mask(m, cut)
    assert boot.tolist() == [[False] * 6, [False] * 5 + [True]]
    delta = td_errors(v, r, m, 1.0, boot)
    assert delta[1, 4].item() == pytest.approx(v[1, 5].item() - v[1, 4].item())
    assert delta[0, 3].item() == pytest.approx(2.0 - v[0, 3].item())  # a whole document still ends at V = 0
    g = mc_returns(r, m, 0.5, v, boot)
    assert g[1, 4].item() == pytest.approx(0.5 * v[1, 5].item()) and g[1, 0].item() == pytest.approx(0.5 ** 5 * 1.1)


def test_advantages_stay_inside_their_document_in_a_packed_row():
    # two documents in one row: positions restart at 5; the second is the first's continuation in ids only
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    label = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    m = state_mask_from_labels(label, position_ids)
    r = sparse_rewards(torch.tensor([[1.0] * 5 + [-2.0] * 5]), m, position_ids)
    v = torch.randn(1, 10)
    adv = advantages(v, r, m, 1.0, 0.9)
    docs = document_ids(position_ids)
    for t in range(10):
        if not m[0, t]:
            assert adv[0, t] == 0
            continue
        expect, coef = 0.0, 1.0
        u = t
        while u < 10 and m[0, u] and docs[0, u] == docs[0, t]:
            nxt = v[0, u + 1].item() if u + 1 < 10 and m[0, u + 1] and docs[0, u + 1] == docs[0, u] else 0.0
            expect += coef * (r[0, u].item() + nxt - v[0, u].item())
            coef *= 0.9
            u += 1
        assert adv[0, t].item() == pytest.approx(expect, abs=1e-5)
    # changing the second document's values never moves the first's advantages
    v2 = v.clone()
    v2[0, 5:] += 3.0
    assert torch.equal(advantages(v2, r, m, 1.0, 0.9)[0, :5], adv[0, :5])


def test_aligned_scores_are_the_advantage_of_each_heads_transition():
    adv = torch.arange(12.0).view(2, 6)
    s = align_scores(adv, 3)
    for b in range(2):
        for t in range(6):
            for k in range(3):
                assert s[b, t, k].item() == (adv[b, t + k].item() if t + k < 6 else 0.0)


def test_explained_variance_and_auc_against_definitions():
    g = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    assert explained_variance(g, g) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(g, g.mean()), g) == pytest.approx(0.0, abs=1e-12)
    v = torch.tensor([0.9, 0.2, 0.6, 0.7, 0.1])
    expect = 1 - ((g - v) - (g - v).mean()).pow(2).mean() / (g - g.mean()).pow(2).mean()
    assert explained_variance(v, g) == pytest.approx(expect.item())
    pos, neg = torch.tensor([0.9, 0.5, 0.5]), torch.tensor([0.5, 0.1])
    pairs = [(p > n) + 0.5 * (p == n) for p in pos.tolist() for n in neg.tolist()]
    assert auc(pos, neg) == pytest.approx(sum(pairs) / len(pairs))
    assert auc(pos, torch.zeros(0)) != auc(pos, torch.zeros(0))  # nan: one class is empty


def test_value_features_are_rms_normalised():
    h = torch.randn(2, 3, 8) * 50
    x = rms_normalize(h)
    torch.testing.assert_close(x.pow(2).mean(-1), torch.ones(2, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(rms_normalize(h * 7), x, atol=1e-5, rtol=0)


def test_value_head_init_ignores_global_rng_draws_made_on_one_rank_only():
    from wmtp_lib.train.critic import seeded_value_head

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

    from wmtp_lib.data.sample import Sample
    from wmtp_lib.train.distributed import Dist
    from wmtp_lib.train.rewards import reward_cache_key, sequence_rewards

    cfg = {"critic": {"reward_source": "model"}, "models": {"reward": "tiny-rm"}}
    samples = [Sample("a", "def f():", " return 1"), Sample("b", "def g():", " pass")]
    save_file({"rewards": torch.tensor([0.5, 1.0])}, str(tmp_path / "rewards.safetensors"),
              metadata={"key": reward_cache_key(cfg, samples)})
    edited = [samples[0], Sample("b", "def g():", " return 2")]
    other_rm = {**cfg, "models": {"reward": "starling-rm-7b"}}
    for c, s in ((cfg, edited), (other_rm, samples)):
        with pytest.raises(RuntimeError, match="rewards of other samples or another reward.*new run_name"):
            sequence_rewards(c, None, s, None, Dist(torch.device("cpu")), tmp_path, lambda m: tmp_path / m)


def test_rollout_cache_of_other_samples_is_refused(tmp_path):
    import json

    from wmtp_lib.data.sample import Sample
    from wmtp_lib.train.distributed import Dist
    from wmtp_lib.train.rollouts import build_rollout_data, rollout_cache_key

    cfg = {"seed": 1, "train": {}, "critic": {"rollouts": 2, "rollout_max_new_tokens": 8, "rollout_temperature": 1.0}}
    samples = [Sample("a", "def f():", " return 1")]
    cache = tmp_path / "rollouts.json"
    cache.write_text(json.dumps({"key": rollout_cache_key(samples, cfg), "samples": [], "rewards": []}))
    edited = [Sample("a", "def f():", " return 2")]
    with pytest.raises(RuntimeError, match="rollouts of other samples.*new run_name"):
        build_rollout_data(None, None, edited, cfg, cache, Dist(torch.device("cpu")))
    assert rollout_cache_key(samples, cfg) != rollout_cache_key(samples, {**cfg, "seed": 2})


def test_stage1_keeps_the_best_head_and_counts_evaluations_without_improvement():
    from wmtp_lib.train.critic import ValueHead
    from wmtp_lib.train.critic_weighting import Stage1Fit

    head = ValueHead(8)
    fit = Stage1Fit()
    snapshots = {}
    for step, ev in ((20, 0.1), (40, 0.3), (60, float("nan")), (80, 0.25)):
        with torch.no_grad():
            head.fc2.bias.fill_(float(step))
        snapshots[step] = head.fc2.bias.clone()
        fit.update({"step": step, "explained_variance": ev, "last_state_auc": step / 100}, head)
    assert (fit.best_step, fit.best_ev, fit.bad_evals, fit.steps_run) == (40, 0.3, 2, 80)  # nan never improves
    assert torch.equal(fit.best_head["fc2.bias"], snapshots[40])
    assert fit.best["last_state_auc"] == 0.4  # the summary's AUC is the kept head's, not the last evaluated one
    restored = Stage1Fit()
    restored.load_state_dict(fit.state_dict())
    assert (restored.best_step, restored.bad_evals) == (40, 2) and torch.equal(restored.best_head["fc2.bias"],
                                                                               snapshots[40])


def test_heldout_rows_keep_prompts_together_are_seeded_and_bounded():
    from wmtp_lib.train.critic_weighting import heldout_split

    groups = [f"prompt {i // 4}" for i in range(100)]  # 4 rollouts of each of 25 prompts
    fit, held = heldout_split(groups, 128, seed=3)
    assert len(held) == 20 and len(fit) == 80  # a fifth of the rows, in whole prompts
    assert set(fit.tolist()).isdisjoint(held.tolist()) and set(fit.tolist()) | set(held.tolist()) == set(range(100))
    assert not {groups[i] for i in fit} & {groups[i] for i in held}  # no held-out prompt was fitted
    assert torch.equal(heldout_split(groups, 128, seed=3)[1], held)
    assert not torch.equal(heldout_split(groups, 128, seed=4)[1], held)
    assert len(heldout_split(["one"] * 10, 128, seed=0)[1]) == 0  # one prompt: nothing to hold out
    fit, held = heldout_split([f"p{i}" for i in range(4)], 128, seed=0)
    assert len(held) == 1 and len(fit) == 3  # few rows still hold one out


def test_cut_documents_are_those_without_their_eos():
    from wmtp_lib.data.rows import TokenizedData

    eos = 2
    ids = torch.tensor([[1, 5, 6, 2, 1, 7, 2, 0], [1, 5, 6, 7, 8, 9, 9, 9]])
    src = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 2, 2, 2, 2]])
    data = TokenizedData(ids, (src >= 0).long(), src >= 0, torch.zeros_like(ids, dtype=torch.bool), src)
    assert data.cut_documents(eos).tolist() == [[False] * 8, [True] * 8]


def test_reward_model_value_trunk_needs_the_base_tokenizer(tmp_path, tiny_models):
    """The tiny reward model shares the base's tokenizer: its decoder serves as the value trunk. A reward model
    whose tokenizer differs (FsfairX's Llama-3 against a Llama-2 base) is refused, naming both models."""
    import shutil

    from wmtp_lib.checkpoints.tiny import train_tokenizer
    from wmtp_lib.checkpoints.tokenization import load_tokenizer
    from wmtp_lib.config import resolve_config
    from wmtp_lib.data.sources import load_samples
    from wmtp_lib.train.distributed import Dist
    from wmtp_lib.train.rewards import reward_model_trunk

    cfg = resolve_config("critic", "local", {"critic.value_trunk": "reward_model", "data.n_train": 40,
                                             "paths.models_dir": str(tiny_models)})
    tokenizer = load_tokenizer(tiny_models / "tiny-mtp")
    samples = load_samples(cfg["data"], "train", tmp_path)
    trunk = reward_model_trunk(cfg, tokenizer, samples, tiny_models / "tiny-rm", Dist(torch.device("cpu")))
    ids = torch.tensor([tokenizer("def f(x):\n    return x + 3\n")["input_ids"]])
    hidden = trunk(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert hidden.shape == (1, ids.shape[1], trunk.config.hidden_size)
    assert not any(p.requires_grad for p in trunk.parameters())

    other = tmp_path / "other-rm"
    shutil.copytree(tiny_models / "tiny-rm", other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    train_tokenizer([f"print({i} * 'spam eggs')\n" for i in range(300)], vocab_size=300, workdir=other)
    with pytest.raises(Exception, match="tiny-rm"):
        reward_model_trunk(cfg, tokenizer, samples, other, Dist(torch.device("cpu")))


def test_value_trunk_config_is_validated():
    from wmtp_lib.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match="critic.value_trunk"):
        resolve_config("critic", "local", {"critic.value_trunk": "reward_model", "critic.value_grad_to_trunk": True})
    with pytest.raises(ConfigError, match="weights.max_weight must be >= 1"):
        resolve_config("critic", "local", {"weights.max_weight": 0.8})
    with pytest.raises(ConfigError, match="critic.score_lambda"):
        resolve_config("critic", "local", {"critic.score_lambda": 1.5})
    assert resolve_config("critic", "local")["weights"]["standardize"] is False
    assert resolve_config("rho1", "local")["weights"]["standardize"] is True


def test_registry_says_which_reward_models_can_be_a_value_trunk(tmp_path):
    from wmtp_lib.registry import REGISTRY_PATH, RegistryError, load_registry

    reg = load_registry()
    assert "mtp-7b" in reg.model("starling-rm-7b").value_trunk_for  # Llama-2's tokenizer, as the 7B base
    assert reg.model("llama3-8b-rm").value_trunk_for == ()  # Llama-3's tokenizer
    bad = tmp_path / "models.yaml"
    bad.write_text(REGISTRY_PATH.read_text().replace("value_trunk_for: [tiny-mtp]", "value_trunk_for: [tiny-ref]"))
    with pytest.raises(RegistryError, match="tiny-rm.value_trunk_for lists 'tiny-ref'"):
        load_registry(bad)
