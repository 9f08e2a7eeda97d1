"""The sequential (memory-efficient) step gives the same gradients as all heads at once."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config

from wmtp_lib.model.heads import MTPModel
from wmtp_lib.model.losses import align_reference, critic_weights, rho1_weights
from wmtp_lib.data.rows import make_batch
from wmtp_lib.model.step import BatchWeights, StepCounts, all_heads_step, sequential_mtp_step, uniform_weights


def _weight_fns(H, B, T):
    torch.manual_seed(11)
    ref = align_reference(torch.rand(B, T) * 4, H)
    td = torch.randn(B, T, H)

    def rho1(k, ce_k, valid_k):
        return rho1_weights(ce_k.unsqueeze(-1), ref[:, :, k : k + 1], valid_k.unsqueeze(-1)).squeeze(-1)

    def skip(k, ce_k, valid_k):
        return rho1_weights(ce_k.unsqueeze(-1), ref[:, :, k : k + 1], valid_k.unsqueeze(-1),
                            mode="tokenskip").squeeze(-1)

    def critic(k, ce_k, valid_k):
        return critic_weights(td[:, :, k : k + 1], valid_k.unsqueeze(-1)).squeeze(-1)

    return {"uniform": uniform_weights, "rho1": rho1, "tokenskip": skip, "critic": critic}


@pytest.mark.parametrize("kind", ["uniform", "rho1", "tokenskip", "critic"])
@pytest.mark.parametrize("chunk", [3, 512])
def test_sequential_gradients_equal_all_at_once(kind, chunk):
    torch.manual_seed(0)
    model = MTPModel(tiny_config(n_future=4, layers=6)).train()
    twin = model.copy()
    B, T = 3, 12
    x = torch.randint(0, 61, (B, T))
    label_mask = torch.ones(B, T, dtype=torch.bool)
    label_mask[:, :4] = False
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, 9:] = 0
    label_mask[0, 9:] = False
    fn = _weight_fns(4, B, T)[kind]
    hw = [1.0, 0.3, 0.3, 0.3]
    batch = make_batch(x, attn, label_mask)
    ref = all_heads_step(model, batch, BatchWeights.fixed(fn), StepCounts(loss_scale=0.5), head_weights=hw)
    out = sequential_mtp_step(twin, batch, BatchWeights.fixed(fn), StepCounts(loss_scale=0.5), head_weights=hw,
                              chunk_size=chunk)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.weights, ref.weights)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sequential_equals_all_at_once_with_step_counts_and_a_trunk_loss():
    """The step's N_k (another micro-batch's targets counted in) and a trunk loss (the critic's value loss):
    the same loss, per-head losses and gradients either way."""
    torch.manual_seed(2)
    model = MTPModel(tiny_config(n_future=4, layers=6)).train()
    twin = model.copy()
    x = torch.randint(0, 61, (2, 10))
    probe = torch.randn(32)
    weights = BatchWeights(weight_fn=lambda trunk: _weight_fns(4, 2, 10)["rho1"],
                           trunk_loss=lambda h: (h @ probe).pow(2).mean())
    counts = StepCounts(n_valid=torch.tensor([30.0, 25.0, 22.0, 19.0]), loss_scale=2.0)
    ref = all_heads_step(model, make_batch(x), weights, counts, head_weights=[1.0, 0.5, 0.5, 0.5])
    out = sequential_mtp_step(twin, make_batch(x), weights, counts, head_weights=[1.0, 0.5, 0.5, 0.5], chunk_size=4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.head_losses, ref.head_losses, atol=1e-6, rtol=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sequential_step_trunk_loss_reaches_trunk():
    torch.manual_seed(1)
    model = MTPModel(tiny_config()).train()
    twin = model.copy()
    probe = torch.randn(32)
    x = torch.randint(0, 61, (2, 8))

    def extra(h):
        return (h @ probe).pow(2).mean()

    out = sequential_mtp_step(model, make_batch(x), BatchWeights(trunk_loss=extra))
    logits = twin(x)
    from wmtp_lib.model.losses import mtp_token_ce, weighted_mtp_loss

    ce, valid = mtp_token_ce(logits, x)
    state = twin(x, return_trunk=True)
    loss = weighted_mtp_loss(ce, valid.float(), valid) + extra(state.hidden)
    loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.trunk[0].mlp.up_proj.weight.grad, twin.trunk[0].mlp.up_proj.weight.grad,
                               atol=1e-5, rtol=1e-4)


def test_bf16_trunk_gradient_sums_the_heads_in_float32():
    """With a bf16 trunk (FSDP2 bf16) the H heads' gradients into the trunk output are summed in float32 and
    rounded to bf16 once, not rounded after every head."""
    torch.manual_seed(3)
    model = MTPModel(tiny_config(n_future=4)).to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    grads = []
    real_forward = model.forward

    def capture(*args, **kwargs):
        state = real_forward(*args, **kwargs)
        state.hidden.register_hook(lambda g: grads.append(g.clone()))
        return state

    model.forward = capture
    sequential_mtp_step(model, make_batch(ids), chunk_size=8)
    for k in range(4):  # each head's gradient alone (exact in bf16: one head, no sum)
        sequential_mtp_step(model, make_batch(ids), chunk_size=8, head_weights=[float(j == k) for j in range(4)])
    total, per_head = grads[0], grads[1:]
    expected = torch.stack([g.float() for g in per_head]).sum(0).to(torch.bfloat16)
    assert total.dtype == torch.bfloat16
    assert torch.equal(total, expected)
