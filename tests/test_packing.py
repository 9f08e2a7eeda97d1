"""Packed rows: no document sees, predicts, is scored against or is rewarded for another (DESIGN §6).

Rows come from the real packing collate on synthetic MBPP-style samples tokenized by a Llama-2-style
SentencePiece tokenizer. Document A is the first one of a packed row; replacing it by another sample
of another length must leave everything of its neighbour B as it was, and B packed must equal B alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from wmtp_lib.checkpoints.tiny import train_tokenizer
from wmtp_lib.data.packing import pack_documents
from wmtp_lib.data.rows import tokenize_samples
from wmtp_lib.data.synthetic import synthetic_tasks
from wmtp_lib.model.heads import MTPModel, mtp_config
from wmtp_lib.model.losses import mtp_token_ce
from wmtp_lib.model.packing import document_ids
from wmtp_lib.model.step import all_heads_step, sequential_mtp_step
from wmtp_lib.train.critic import (
    ValueHead,
    advantages,
    mc_returns,
    sparse_rewards,
    state_mask_from_labels,
    td_errors,
)
from wmtp_lib.train.reference import reference_token_ce

H = 4
T = 320


@pytest.fixture(scope="module")
def tok():
    from wmtp_lib.data.synthetic import synthetic_corpus

    return train_tokenizer(synthetic_corpus(n=200), vocab_size=400)


@pytest.fixture(scope="module")
def samples():
    return synthetic_tasks(12, "train", 5, 0.25)


def _model(vocab: int, dtype: torch.dtype = torch.float32) -> MTPModel:
    torch.manual_seed(0)
    config = mtp_config(H, vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)
    return MTPModel(config).to(dtype).eval()


def _reference(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def _pair(tok, samples, a: int, b: int):
    """A packed row holding sample ``a`` then sample ``b``, B's slice in it, and B alone (padded)."""
    packed = tokenize_samples(tok, [samples[a], samples[b]], T, pack=True)
    assert len(packed) == 1, "both samples must fit one row"
    row = packed.rows([0])
    start = int((packed.sample_index[0] == 0).sum())
    n_b = int((packed.sample_index[0] == 1).sum())
    alone = tokenize_samples(tok, [samples[b]], T).rows([0])
    return row, slice(start, start + n_b), alone, slice(0, n_b)


def _logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], position_ids=batch.get("position_ids"))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 0.0)])
def test_logits_and_targets_of_b_ignore_a_and_equal_b_alone(tok, samples, dtype, atol):
    model = _model(len(tok), dtype)
    row1, b1, alone, b0 = _pair(tok, samples, 0, 3)
    row2, b2, _, _ = _pair(tok, samples, 2, 3)
    assert b1.start != b2.start  # A changed length as well as content
    l1, l2, l0 = _logits(model, row1), _logits(model, row2), _logits(model, alone)
    assert l1.shape == (1, T, H, len(tok)) and torch.isfinite(l1).all()
    # B after one A or another: the same (bf16 included: masked keys add exact zeros)
    torch.testing.assert_close(l1[0, b1], l2[0, b2], atol=atol, rtol=0)
    # B packed vs B alone: same values up to float32 summation order over the longer rows
    torch.testing.assert_close(l1[0, b1], l0[0, b0], atol=1e-6 if dtype == torch.float32 else 2e-2, rtol=0)
    # the leak this prevents: without positions, B attends to A
    with torch.no_grad():
        leaky = model(row1["input_ids"], row1["attention_mask"])
    assert (leaky[0, b1] - l0[0, b0]).abs().max() > 1e-3
    ce1, v1 = mtp_token_ce(l1, row1["input_ids"], row1["label_mask"], row1["position_ids"])
    ce2, v2 = mtp_token_ce(l2, row2["input_ids"], row2["label_mask"], row2["position_ids"])
    ce0, v0 = mtp_token_ce(l0, alone["input_ids"], alone["label_mask"])
    assert torch.equal(v1[0, b1], v2[0, b2]) and torch.equal(v1[0, b1], v0[0, b0])
    torch.testing.assert_close(ce1[0, b1], ce2[0, b2], atol=atol, rtol=0)


def test_valid_targets_stay_in_their_document(tok, samples):
    data = tokenize_samples(tok, samples, T, pack=True)
    rows = data.rows(list(range(len(data))))
    logits = torch.zeros(len(data), T, H, 7)
    ids = rows["input_ids"] % 7
    _, valid = mtp_token_ce(logits, ids, rows["label_mask"], rows["position_ids"])
    src = data.sample_index
    assert (src[:, 1:] != src[:, :-1]).logical_and(src[:, 1:] >= 0).any(), "rows must hold several documents"
    for b in range(len(data)):
        for t in range(T):
            for k in range(H):
                j = t + k + 1
                expect = j < T and bool(rows["label_mask"][b, j]) and int(src[b, j]) == int(src[b, t])
                assert bool(valid[b, t, k]) == expect, (b, t, k)


def test_reference_loss_of_b_ignores_a(tok, samples):
    ref = _reference(len(tok))
    row1, b1, alone, b0 = _pair(tok, samples, 0, 3)
    row2, b2, _, _ = _pair(tok, samples, 2, 3)
    r1, r2, r0 = (reference_token_ce(ref, r["input_ids"], r["attention_mask"], position_ids=r.get("position_ids"))
                  for r in (row1, row2, alone))
    assert torch.equal(r1[0, b1], r2[0, b2])
    torch.testing.assert_close(r1[0, b1], r0[0, b0], atol=1e-6, rtol=0)
    assert r1[0, b1.start - 1] == 0  # A's last token (EOS) is not scored on B's first (BOS)
    assert r1[0, : b1.start - 1].ne(0).all()


def test_critic_reward_advantages_and_value_targets_stay_in_their_document(tok, samples):
    model = _model(len(tok))
    torch.manual_seed(2)
    head = ValueHead(32)
    reward_of = torch.tensor([0.9, -0.4, 0.0, 0.25])  # per sample of the pair lists below

    def critic(batch, rewards):
        with torch.no_grad():
            hidden = model(batch["input_ids"], batch["attention_mask"], position_ids=batch.get("position_ids"),
                           return_trunk=True).hidden
            values = head(hidden)
        positions = batch.get("position_ids")
        states = state_mask_from_labels(batch["label_mask"], positions)
        r = sparse_rewards(rewards, states, positions)
        delta = td_errors(values, r, states, gamma=0.97)
        adv = advantages(values, r, states, gamma=0.97, lam=0.9)
        targets = mc_returns(r, states, gamma=0.97)
        return states, r, delta, adv, targets, values

    row1, b1, alone, b0 = _pair(tok, samples, 0, 3)
    row2, b2, _, _ = _pair(tok, samples, 2, 3)
    # each token holds its own document's reward (TokenizedData.token_map in training)
    map1 = torch.where(torch.arange(T) < b1.start, reward_of[0], reward_of[3]) * row1["attention_mask"]
    map2 = torch.where(torch.arange(T) < b2.start, reward_of[1], reward_of[3]) * row2["attention_mask"]
    s1, r1, d1, a1, g1, v1 = critic(row1, map1)
    s2, r2, d2, a2, g2, v2 = critic(row2, map2)
    s0, r0, d0, a0, g0, v0 = critic(alone, reward_of[3:4])
    for x1, x2, x0 in ((s1, s2, s0), (r1, r2, r0)):
        assert torch.equal(x1[0, b1], x2[0, b2]) and torch.equal(x1[0, b1], x0[0, b0])
    for x1, x2, x0 in ((d1, d2, d0), (a1, a2, a0), (g1, g2, g0)):
        assert torch.equal(x1[0, b1], x2[0, b2])
        torch.testing.assert_close(x1[0, b1], x0[0, b0], atol=1e-6, rtol=0)
    # A's own reward at A's own last state; nothing bootstraps from B's first value
    last_a = int(s1[0, : b1.start].nonzero().max())
    assert last_a == b1.start - 2  # the state that emits A's EOS
    assert r1[0].nonzero().flatten().tolist() == [last_a, int(s1[0].nonzero().max())]
    assert r1[0, last_a] == reward_of[0]
    assert d1[0, last_a] == pytest.approx(float(reward_of[0] - v1[0, last_a]), abs=1e-6)
    assert not s1[0, b1.start - 1]


def test_sparse_rewards_put_each_document_reward_at_its_last_state():
    # row 0: docs [0..3], [4..8], padding [9..10]; row 1: one document (old per-row reward form)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1], list(range(11))])
    label = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    states = state_mask_from_labels(label, positions)
    assert states[0].nonzero().flatten().tolist() == [0, 1, 2, 5, 7]
    per_token = torch.tensor([[2.0] * 4 + [-1.0] * 5 + [0.0] * 2, [5.0] * 11])
    r = sparse_rewards(per_token, states, positions)
    assert r[0].tolist() == [0, 0, 2.0, 0, 0, 0, 0, -1.0, 0, 0, 0]
    assert r[1].nonzero().flatten().tolist() == [8] and r[1, 8] == 5.0
    assert torch.equal(sparse_rewards(torch.tensor([7.0, 5.0])[1:], states[1:]), r[1:])
    assert document_ids(positions)[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]


def test_packed_step_gradient_equals_padded_step_on_same_documents(tok, samples):
    """Uniform weights: one packed micro-batch and the padded rows of the same documents hold the same
    valid targets, so the mean loss and its gradient must agree."""
    model = _model(len(tok))
    model.train()
    packed = tokenize_samples(tok, samples[:8], T, pack=True)
    padded = tokenize_samples(tok, samples[:8], T)
    assert len(packed) < len(padded)

    def grads(batch, step):
        model.zero_grad(set_to_none=True)
        out = step(model, batch)
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    out_p, g_p = grads(packed.rows(list(range(len(packed)))), sequential_mtp_step)
    out_u, g_u = grads(padded.rows(list(range(len(padded)))), all_heads_step)
    assert torch.equal(out_p.valid.sum((0, 1)), out_u.valid.sum((0, 1)))
    torch.testing.assert_close(out_p.head_losses, out_u.head_losses, rtol=1e-5, atol=0)
    for name in g_u:
        torch.testing.assert_close(g_p[name], g_u[name], rtol=1e-4, atol=1e-7, msg=name)


def test_position_ids_of_another_shape_are_refused(tiny_mtp):
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"position_ids shape \(2, 5\) must equal input_ids shape \(2, 6\)"):
        tiny_mtp(ids, position_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids shape \(2, 5\) must be \(B, T\)"):
        mtp_token_ce(torch.zeros(2, 6, 3, 5), ids, position_ids=torch.zeros(2, 5, dtype=torch.long))


def test_pack_documents_first_fit():
    assert pack_documents([5, 4, 3, 2, 9, 1], 9) == [[0, 1], [2, 3, 5], [4]]
    assert pack_documents([12, 2], 10) == [[0], [1]]  # too long: truncated by the caller, alone
    with pytest.raises(ValueError, match="max_length"):
        pack_documents([1], 0)


@pytest.mark.slow
def test_packed_training_runs_rho1_cached_equals_online_and_critic(tmp_path, tiny_models):
    """The trainer hands packed rows' positions to the model, the cached and the online reference alike
    (a path that dropped them would score other losses), and the critic gives each document its reward."""
    from train_helpers import make_config, metrics, run_training

    # samples are ~90 tokens: rows of 256 hold two or three documents each
    common = {"train.steps": 3, "train.micro_batch_size": 4, "train.log_every": 1, "data.pack": True,
              "data.n_train": 60, "data.max_length": 256}
    runs = {"cached": ("rho1", {}), "online": ("rho1", {"rho1.ref_cache": False}),
            "critic": ("critic", {"critic.stage1_max_steps": 2})}
    for name, (recipe, over) in runs.items():
        _, cfg = make_config(tmp_path, recipe, tiny_models, name, {**common, **over})
        proc = run_training(cfg)
        rows = int(proc.stdout.split("data: 60 samples -> ")[1].split(" rows")[0])
        assert rows <= 30, proc.stdout
    cached, online = metrics(tmp_path / "runs" / "cached"), metrics(tmp_path / "runs" / "online")
    assert len(cached) == len(online) == 3
    for r1, r2 in zip(cached, online):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["weight_mean"] == pytest.approx(r1["weight_mean"], rel=1e-5)
    critic = [r for r in metrics(tmp_path / "runs" / "critic") if r["stage"] == "mtp"]
    assert len(critic) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in critic)
    from safetensors.torch import load_file

    rewards = load_file(str(tmp_path / "runs" / "critic" / "rewards.safetensors"))["rewards"]
    assert rewards.shape == (60,)  # one reward per document, not per packed row


def test_packed_padding_tail_is_its_own_document_with_no_fully_masked_query_row(tok, samples):
    """The tail of a packed row is a document of its own: every query row attends to something (a fully
    masked row gives NaN on some CUDA SDPA backends), and the real documents' logits do not change."""
    model = _model(len(tok))
    row, b, _, _ = _pair(tok, samples, 0, 3)
    assert not row["attention_mask"].all()  # the row has a padding tail
    with torch.no_grad():
        state = model.forward_trunk(row["input_ids"], row["attention_mask"], row["position_ids"])
    mask = state.attention_mask
    allowed = mask if mask.dtype == torch.bool else mask == 0  # boolean SDPA mask or additive eager mask
    assert allowed.any(dim=-1).all()
    ones = {**row, "attention_mask": torch.ones_like(row["attention_mask"])}
    real = row["attention_mask"][0].bool()
    assert torch.equal(_logits(model, row)[0, real], _logits(model, ones)[0, real])
