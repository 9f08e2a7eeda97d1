"""Every loss and weight function against a per-element Python loop."""

from __future__ import annotations

import math

import pytest
import torch

from wmtp_lib.model.losses import (
    align_reference,
    chunked_linear_ce,
    critic_weights,
    head_targets,
    keep_count,
    mtp_token_ce,
    rho1_weights,
    weighted_mtp_loss,
)


def brute_ce(logits, x, label_mask):
    B, T, H, V = logits.shape
    ce = torch.zeros(B, T, H)
    valid = torch.zeros(B, T, H, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for k in range(H):
                j = t + k + 1
                if j < T and (label_mask is None or bool(label_mask[b, j])):
                    row = logits[b, t, k].double()
                    lse = math.log(sum(math.exp(v) for v in row.tolist()))
                    ce[b, t, k] = lse - row[x[b, j]].item()
                    valid[b, t, k] = True
    return ce, valid


def brute_cap(exponents: list[float], max_weight: float) -> list[float]:
    """Weights ``min(c · exp(a), M)`` with mean 1, ``c`` found by bisection on ``log c`` (not water-filling)."""
    n = len(exponents)
    if max_weight == 1:
        return [1.0] * n

    def mean_at(log_c):
        return sum(min(math.exp(min(a + log_c, math.log(max_weight))), max_weight) for a in exponents) / n

    lo, hi = -max(exponents) - math.log(n) - 1, -min(exponents) + math.log(max_weight) + 1
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_at(mid) < 1 else (lo, mid)
    return [min(math.exp(min(a + hi, math.log(max_weight))), max_weight) for a in exponents]


def brute_soft(s, valid, temperature, max_weight, standardize=True):
    B, T, H = s.shape
    w = torch.zeros(B, T, H, dtype=torch.float64)
    for k in range(H):
        keys = [(b, t) for b in range(B) for t in range(T) if valid[b, t, k]]
        vals = [s[b, t, k].item() for b, t in keys]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        scale = std + 1e-6 if standardize else 1.0
        for (b, t), v in zip(keys, brute_cap([(v - mean) / scale / temperature for v in vals], max_weight)):
            w[b, t, k] = v
    return w


def brute_topk(s, valid, keep_ratio):
    B, T, H = s.shape
    w = torch.zeros(B, T, H)
    for k in range(H):
        entries = [(-s[b, t, k].item(), b * T + t, b, t) for b in range(B) for t in range(T) if valid[b, t, k]]
        entries.sort()
        n_keep = math.ceil(round(keep_ratio * len(entries), 9))
        for _, _, b, t in entries[:n_keep]:
            w[b, t, k] = len(entries) / n_keep  # kept weights have mean 1 over valid entries
    return w


@pytest.mark.parametrize("use_mask", [False, True])
def test_mtp_token_ce_matches_loop(use_mask):
    torch.manual_seed(1)
    B, T, H, V = 2, 7, 3, 11
    logits = torch.randn(B, T, H, V)
    x = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.3) if use_mask else None
    ce, valid = mtp_token_ce(logits, x, mask)
    ce_ref, valid_ref = brute_ce(logits, x, mask)
    assert torch.equal(valid, valid_ref)
    torch.testing.assert_close(ce, ce_ref, atol=1e-5, rtol=1e-5)
    assert (ce[~valid] == 0).all()
    # head k has no target in the last k+1 positions
    for k in range(H):
        assert not valid[:, T - k - 1 :, k].any()


def test_mtp_token_ce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits must be"):
        mtp_token_ce(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids shape"):
        mtp_token_ce(torch.zeros(2, 3, 2, 5), torch.zeros(2, 4, dtype=torch.long))


def test_align_reference_matches_loop():
    torch.manual_seed(2)
    ref = torch.randn(3, 6)
    out = align_reference(ref, 4)
    for b in range(3):
        for t in range(6):
            for k in range(4):
                expect = ref[b, t + k].item() if t + k < 6 else 0.0
                assert out[b, t, k].item() == expect


def test_aligned_reference_scores_same_target_as_head():
    """Head k at t and the reference at t+k both score x[t+k+1]."""
    torch.manual_seed(3)
    B, T, V, H = 1, 8, 5, 3
    x = torch.randint(0, V, (B, T))
    ref_logits = torch.randn(B, T, V)
    ref_ce = torch.zeros(B, T)
    for j in range(T - 1):
        ref_ce[0, j] = -torch.log_softmax(ref_logits[0, j], -1)[x[0, j + 1]]
    # A "perfect copy" head k whose logits at t equal the reference's at t+k gives the same CE.
    logits = torch.zeros(B, T, H, V)
    for k in range(H):
        for t in range(T - k):
            logits[0, t, k] = ref_logits[0, t + k]
    ce, valid = mtp_token_ce(logits, x)
    aligned = align_reference(ref_ce, H)
    torch.testing.assert_close(ce[valid], aligned[valid])


@pytest.mark.parametrize("temperature,max_weight", [(1.0, 3.0), (0.5, 1.5), (2.0, 100.0)])
def test_rho1_weighted_matches_loop(temperature, max_weight):
    torch.manual_seed(4)
    B, T, H = 3, 9, 4
    ce = torch.rand(B, T, H) * 3
    ref = torch.rand(B, T, H) * 3
    valid = torch.rand(B, T, H) > 0.25
    ce = ce * valid
    w = rho1_weights(ce, ref, valid, "weighted", temperature=temperature, max_weight=max_weight)
    expect = brute_soft(ce - ref, valid, temperature, max_weight)
    torch.testing.assert_close(w.double(), expect, atol=1e-5, rtol=1e-5)
    assert (w[~valid] == 0).all()
    assert w.max() <= max_weight + 1e-6


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("temperature,max_weight", [(1.0, 3.0), (0.3, 1.5), (0.05, 2.0), (2.0, 100.0), (1.0, 1.0)])
def test_critic_weights_match_bisection_cap(temperature, max_weight, standardize):
    torch.manual_seed(5)
    B, T, H = 2, 13, 3
    s = torch.randn(B, T, H) * 0.7
    valid = torch.rand(B, T, H) > 0.2
    w = critic_weights(s, valid, temperature=temperature, max_weight=max_weight, standardize=standardize)
    torch.testing.assert_close(w.double(), brute_soft(s, valid, temperature, max_weight, standardize),
                               atol=2e-6, rtol=1e-5)
    for k in range(H):
        assert w[:, :, k][valid[:, :, k]].double().mean().item() == pytest.approx(1.0, abs=1e-6)
    assert (w[~valid] == 0).all() and w.max() <= max_weight * (1 + 1e-6)


def test_cap_redistributes_instead_of_shrinking_the_loss():
    """One large score: v2's "normalise, then cap" left the mean at (2 + 4·0.x)/5 < 1; the mean-preserving cap
    keeps mean 1 and raises the others (water-filling), ordered as their scores."""
    s = torch.tensor([0.0, 0.1, 0.2, 0.3, 10.0]).view(1, 5, 1)
    valid = torch.ones(1, 5, 1, dtype=torch.bool)
    w = critic_weights(s, valid, temperature=0.5, max_weight=2.0)
    assert w[0, 4, 0].item() == pytest.approx(2.0)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert (w[0, :4, 0].diff() > 0).all()
    raw = torch.exp(s / 0.5 - 20.0)
    v2 = (raw / raw.mean()).clamp(max=2.0)
    assert v2.mean().item() < 0.5  # what v2 did: most of the loss gone
    with pytest.raises(ValueError, match="max_weight must be >= 1"):
        critic_weights(s, valid, max_weight=0.5)


def test_standardize_off_keeps_score_units_so_no_signal_gives_flat_weights():
    """A tiny score (no signal) spreads weights fully when z-scored, barely in reward units."""
    torch.manual_seed(6)
    s = torch.randn(1, 400, 1) * 1e-3
    valid = torch.ones_like(s, dtype=torch.bool)
    z_scored = critic_weights(s, valid, temperature=0.33, standardize=True)
    units = critic_weights(s, valid, temperature=0.33, standardize=False)
    assert z_scored.std().item() > 1.0 and units.std().item() < 0.01
    # shifting every score by a constant changes nothing either way
    torch.testing.assert_close(critic_weights(s + 5.0, valid, temperature=0.33, standardize=False), units)


def test_soft_weights_edge_cases():
    valid = torch.zeros(2, 3, 2, dtype=torch.bool)
    valid[0, 0, 0] = True  # one valid entry in head 0, none in head 1
    w = critic_weights(torch.randn(2, 3, 2), valid)
    assert w[0, 0, 0].item() == pytest.approx(1.0)
    assert w.sum().item() == pytest.approx(1.0)


def test_soft_weights_never_overflow():
    """z/T far beyond float32's exp range (T = 0.02, one outlier among many tokens) gives finite weights with
    mean 1, equal to the bisection formula; an unshifted exp would give inf and then NaN."""
    torch.manual_seed(12)
    s = torch.randn(4, 512, 2)
    s[1, 7, 0] = 40.0  # one outlier: z ≈ 40, z / 0.02 = 2000
    valid = torch.ones_like(s, dtype=torch.bool)
    valid[3, 300:, 1] = False
    assert torch.isinf(torch.exp(torch.tensor(1000.0)))
    for standardize in (True, False):
        for temperature in (0.02, 0.5):
            w = critic_weights(s, valid, temperature=temperature, max_weight=3.0, standardize=standardize)
            assert torch.isfinite(w).all() and (w >= 0).all(), temperature
            for k in range(2):
                assert w[:, :, k][valid[:, :, k]].double().mean().item() == pytest.approx(1.0, abs=1e-5)
            sub = slice(0, 2)  # the brute force on a slice that holds the outlier
            torch.testing.assert_close(
                critic_weights(s[sub], valid[sub], temperature=temperature, standardize=standardize).double(),
                brute_soft(s[sub], valid[sub], temperature, 3.0, standardize), atol=1e-6, rtol=1e-4)
    assert critic_weights(s, valid, temperature=0.02)[1, 7, 0].item() == pytest.approx(3.0)


def test_weights_carry_no_gradient():
    ce = torch.rand(2, 5, 2, requires_grad=True)
    valid = torch.ones(2, 5, 2, dtype=torch.bool)
    for mode in ("weighted", "tokenskip"):
        w = rho1_weights(ce, torch.zeros(2, 5, 2), valid, mode)
        assert not w.requires_grad


@pytest.mark.parametrize("keep_ratio", [0.7, 0.5, 0.33, 1.0, 0.01])
def test_tokenskip_matches_loop(keep_ratio):
    torch.manual_seed(5)
    B, T, H = 2, 10, 3
    ce = torch.randint(0, 4, (B, T, H)).float()  # many ties
    ref = torch.zeros(B, T, H)
    valid = torch.rand(B, T, H) > 0.2
    w = rho1_weights(ce, ref, valid, "tokenskip", keep_ratio=keep_ratio)
    expect = brute_topk(ce - ref, valid, keep_ratio)
    torch.testing.assert_close(w, expect, rtol=1e-6, atol=0)
    for k in range(H):
        n = int(valid[:, :, k].sum())
        assert int((w[:, :, k] > 0).sum()) == keep_count(keep_ratio, n)
        assert w[:, :, k].sum().item() == pytest.approx(n, rel=1e-6)  # mean 1: loss = mean over kept tokens


def test_tokenskip_ties_go_to_lower_flat_index():
    s = torch.zeros(2, 3, 1)
    valid = torch.ones(2, 3, 1, dtype=torch.bool)
    w = rho1_weights(s, torch.zeros_like(s), valid, "tokenskip", keep_ratio=0.5)
    assert w[:, :, 0].flatten().tolist() == [2.0, 2.0, 2.0, 0.0, 0.0, 0.0]


def test_keep_count_is_exact_decimal():
    assert keep_count(0.7, 10) == 7
    assert keep_count(0.7, 11) == 8
    assert keep_count(0.3, 10) == 3
    assert keep_count(1.0, 5) == 5


def test_rho1_rejects_bad_mode_and_ratio():
    z = torch.zeros(1, 2, 1)
    v = torch.ones(1, 2, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode"):
        rho1_weights(z, z, v, "soft")
    with pytest.raises(ValueError, match="keep_ratio"):
        rho1_weights(z, z, v, "tokenskip", keep_ratio=0.0)


@pytest.mark.parametrize("head_weights", [None, [1.0, 0.3, 0.3]])
def test_weighted_mtp_loss_matches_loop(head_weights):
    torch.manual_seed(6)
    B, T, H = 2, 6, 3
    ce = torch.rand(B, T, H)
    w = torch.rand(B, T, H) * 2
    valid = torch.rand(B, T, H) > 0.3
    valid[:, :, 2] = False  # a head with nothing valid contributes 0
    loss = weighted_mtp_loss(ce, w, valid, head_weights)
    alpha = head_weights or [1.0] * H
    total = 0.0
    for k in range(H):
        num = sum(w[b, t, k].item() * ce[b, t, k].item() for b in range(B) for t in range(T) if valid[b, t, k])
        den = sum(1 for b in range(B) for t in range(T) if valid[b, t, k])  # N_k: valid targets, not Σw
        total += alpha[k] * (num / den if den > 0 else 0.0)
    assert loss.item() == pytest.approx(total, rel=1e-5)
    # N_k of a larger optimizer step: every head term divides by its own count
    n_valid = torch.tensor([50.0, 7.0, 0.0])
    split = weighted_mtp_loss(ce, w, valid, head_weights, n_valid=n_valid)
    expect = sum(alpha[k] * (ce[:, :, k] * w[:, :, k] * valid[:, :, k]).sum().item() / n_valid[k].item()
                 for k in range(2))
    assert split.item() == pytest.approx(expect, rel=1e-5)
    with pytest.raises(ValueError, match="n_valid must have shape"):
        weighted_mtp_loss(ce, w, valid, n_valid=torch.ones(2))


def test_loss_with_global_count_is_split_invariant():
    """Σ over micro-batches of the loss with the step's N_k equals the loss of the whole batch (any split)."""
    torch.manual_seed(11)
    B, T, H = 8, 9, 3
    ce = torch.rand(B, T, H)
    w = torch.rand(B, T, H) * 2
    valid = torch.rand(B, T, H) > torch.linspace(0.1, 0.9, B).view(B, 1, 1)  # rows of unequal length
    whole = weighted_mtp_loss(ce, w, valid)
    n_valid = valid.float().sum(dim=(0, 1))
    for parts in ([8], [4, 4], [2, 2, 2, 2], [1, 3, 4]):
        chunks = zip(ce.split(parts), w.split(parts), valid.split(parts))
        total = sum(weighted_mtp_loss(c, x, v, n_valid=n_valid) for c, x, v in chunks)
        assert total.item() == pytest.approx(whole.item(), rel=1e-6), parts


def test_uniform_weights_give_plain_mtp_loss():
    torch.manual_seed(7)
    logits = torch.randn(2, 6, 2, 9)
    x = torch.randint(0, 9, (2, 6))
    ce, valid = mtp_token_ce(logits, x)
    loss = weighted_mtp_loss(ce, valid.float(), valid)
    plain = sum(
        torch.nn.functional.cross_entropy(logits[:, : 6 - k - 1, k].reshape(-1, 9), x[:, k + 1 :].reshape(-1))
        for k in range(2)
    )
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)


def test_head_weights_length_checked():
    z = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="3 heads"):
        weighted_mtp_loss(z, z, z.bool(), [1.0, 2.0])


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_linear_ce_value_and_grad(chunk):
    torch.manual_seed(8)
    B, T, D, V = 2, 7, 5, 13
    h = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    targets, valid = head_targets(torch.randint(0, V, (B, T)), 1, torch.rand(B, T) > 0.2)
    g = torch.randn(B, T, dtype=torch.float64)
    ce = chunked_linear_ce(h, W, targets, valid, chunk)
    ref = torch.nn.functional.cross_entropy((h @ W.t()).reshape(-1, V), targets.reshape(-1), reduction="none")
    ref = torch.where(valid, ref.view(B, T), torch.zeros_like(ref.view(B, T)))
    torch.testing.assert_close(ce.double(), ref, atol=1e-5, rtol=1e-5)
    gh, gw = torch.autograd.grad((ce * g).sum(), [h, W])
    rh, rw = torch.autograd.grad((ref * g).sum(), [h, W])
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)


def test_chunked_linear_ce_half_precision_keeps_softmax_grad():
    """bf16 compute keeps softmax − onehot from forward; gradients match a float64 reference to bf16 precision."""
    torch.manual_seed(9)
    B, T, D, V = 2, 9, 16, 40
    h64 = torch.randn(B, T, D, dtype=torch.float64)
    W64 = torch.randn(V, D, dtype=torch.float64) * 0.3
    targets, valid = head_targets(torch.randint(0, V, (B, T)), 0)
    g = torch.rand(B, T, dtype=torch.float64)
    h = h64.to(torch.bfloat16).requires_grad_(True)
    W = W64.to(torch.bfloat16).requires_grad_(True)
    ce = chunked_linear_ce(h, W, targets, valid, 4)
    (ce * g.float()).sum().backward()
    hr = h.detach().double().requires_grad_(True)
    Wr = W.detach().double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy((hr @ Wr.t()).reshape(-1, V), targets.reshape(-1), reduction="none")
    ref = torch.where(valid, ref.view(B, T), torch.zeros_like(ref.view(B, T)))
    (ref * g).sum().backward()
    torch.testing.assert_close(ce.double(), ref.detach(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(h.grad.double(), hr.grad, atol=0.05, rtol=0.05)
    torch.testing.assert_close(W.grad.double(), Wr.grad, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_linear_ce_nan_at_invalid_positions_keeps_gradients_finite(dtype):
    """NaN hidden states where no target is valid (e.g. a fully masked padding row) reach neither gradient."""
    torch.manual_seed(9)
    B, T, D, V = 2, 6, 5, 11
    clean = torch.randn(B, T, D).to(dtype)
    W = torch.randn(V, D).to(dtype)
    targets, valid = head_targets(torch.randint(0, V, (B, T)), 0, torch.rand(B, T) > 0.3)
    assert not valid.all()
    poisoned = torch.where(valid.unsqueeze(-1), clean, torch.full_like(clean, float("nan")))
    grads = []
    for h0 in (poisoned, clean):
        h = h0.clone().requires_grad_(True)
        w = W.clone().requires_grad_(True)
        ce = chunked_linear_ce(h, w, targets, valid, 4)
        ce.sum().backward()
        grads.append((ce.detach(), h.grad, w.grad))
    (ce_p, gh_p, gw_p), (ce_c, gh_c, gw_c) = grads
    assert torch.isfinite(gw_p).all() and torch.isfinite(gh_p).all() and torch.isfinite(ce_p).all()
    assert torch.equal(ce_p, ce_c) and torch.equal(gw_p, gw_c)
    assert torch.equal(gh_p[valid], gh_c[valid]) and (gh_p[~valid] == 0).all()


def test_cap_keeps_mean_one_for_huge_exponents_ties_equal_scores_and_bf16():
    from wmtp_lib.model.losses import mean_preserving_cap

    # |log w| ~ 1e5 (a z of 10 at temperature 1e-4): roundoff at the boundary must not drop the mean to 0.25
    x = torch.tensor([-280598.754, -80789.286, -50072.747, 91709.728, 89038.856, 167762.043, 205828.58,
                      292266.162, 132062.433, -221567.002, -10936.946, 227022.867], dtype=torch.float64).view(1, 12, 1)
    w = mean_preserving_cap(x, torch.ones_like(x, dtype=torch.bool), 3.0)
    assert w.double().mean().item() == pytest.approx(1.0) and int((w == 3.0).sum()) == 4
    valid = torch.ones(1, 6, 1, dtype=torch.bool)
    ties = torch.tensor([5.0, 5.0, 5.0, 0.0, 0.0, 0.0]).view(1, 6, 1)
    w = critic_weights(ties, valid, temperature=0.1, max_weight=1.5)  # three tied at the top share the cap
    assert w[0, :3, 0].tolist() == pytest.approx([1.5] * 3) and w[0, 3:, 0].tolist() == pytest.approx([0.5] * 3)
    assert critic_weights(torch.full((1, 6, 1), 2.0), valid).flatten().tolist() == pytest.approx([1.0] * 6)
    s = torch.randn(2, 9, 3)
    valid = torch.rand(2, 9, 3) > 0.3
    torch.testing.assert_close(critic_weights(s.bfloat16(), valid), critic_weights(s.bfloat16().float(), valid))
