"""Where the critic's token weights come from, for one finished `critic` run of the embedded experiment.

Reports (1) how well the run's sequence rewards separate clean from corrupted training solutions (mean
reward per group and the AUC), and (2) for the value head after stage 1 (on the base model's trunk) and at
the end of training (on the trained trunk), the mean TD error and the mean token weight of head 0 on:
corrupted tokens, the other non-final tokens of corrupted solutions, clean solutions' non-final tokens,
and the final token (``</s>``) of corrupted and of clean solutions, where the sequence reward arrives.
All weights are computed as training computes them (TD errors → soft weights, temperature and cap from
the run's config), over the first ``--rows`` training rows.

    python bench/critic_signal.py runs/experiment/runs/critic-noise0.4-seed0
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from bench_models import bench_header  # noqa: E402

from wmtp_lib.config import load_resolved, project_path  # noqa: E402
from wmtp_lib.critic import ValueHead, align_td, sparse_rewards, state_mask_from_labels, value_targets  # noqa: E402
from wmtp_lib.data import load_samples, tokenize_samples  # noqa: E402
from wmtp_lib.heads import MTPModel  # noqa: E402
from wmtp_lib.loaders import load_tokenizer  # noqa: E402
from wmtp_lib.losses import critic_weights  # noqa: E402
from wmtp_lib.weight_stats import noisy_targets  # noqa: E402
from wmtp_lib.weighting import target_valid  # noqa: E402

GROUPS = ("corrupted", "rest of noisy (not final)", "clean (not final)", "final token, noisy", "final token, clean")


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a clean solution's reward > a corrupted one's), ties counted half."""
    a, b = pos[:, None], neg[None, :]
    return ((a > b).double().mean() + 0.5 * (a == b).double().mean()).item()


@torch.no_grad()
def token_groups(model: MTPModel, head: ValueHead, data, rewards: torch.Tensor, rows: int, cfg: dict
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    """TD errors and weights of head 0's targets per token group, and every valid weight."""
    ccfg, wcfg, H = cfg["critic"], cfg["weights"], model.n_future
    td_by, w_by = {g: [] for g in GROUPS}, {g: [] for g in GROUPS}
    every = []
    token_rewards = data.token_map(rewards)
    for start in range(0, rows, 32):
        idx = list(range(start, min(rows, start + 32)))
        b = data.rows(idx)
        hidden = model(b["input_ids"], b["attention_mask"], return_trunk=True).hidden
        states = state_mask_from_labels(b["label_mask"])
        delta, _ = value_targets(head(hidden), sparse_rewards(token_rewards[idx], states), states, ccfg["gamma"],
                                 ccfg["lam"])
        td = align_td(delta, H)
        valid = target_valid(b["label_mask"], H)
        w = critic_weights(td, valid, temperature=wcfg["temperature"], max_weight=wcfg["max_weight"])
        noisy = noisy_targets(b["noisy"], H)[..., 0]
        mark = noisy_targets(b["noise_marks"], H)[..., 0]
        ok = valid[..., 0]
        pos = torch.arange(ok.shape[1]).expand_as(ok)
        final = ok & (pos == torch.where(ok, pos, -1).amax(1, keepdim=True))
        groups = {GROUPS[0]: noisy & mark & ok, GROUPS[1]: noisy & ~mark & ok & ~final,
                  GROUPS[2]: ~noisy & ok & ~final, GROUPS[3]: noisy & final, GROUPS[4]: ~noisy & final}
        for g, m in groups.items():
            td_by[g] += td[..., 0][m].tolist()
            w_by[g] += w[..., 0][m].tolist()
        every += w[..., 0][ok].tolist()
    return td_by, w_by, every


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--rows", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(bench_header("cpu", "fp32"))
    cfg = load_resolved(args.run_dir / "config.yaml")
    samples = load_samples(cfg["data"], "train", project_path(cfg["paths"]["datasets_dir"]))
    tokenizer = load_tokenizer(args.run_dir / "final")
    data = tokenize_samples(tokenizer, samples, cfg["data"]["max_length"], cfg["data"]["prompt_masking"], False)
    rewards = load_file(str(args.run_dir / "rewards.safetensors"))["rewards"]
    noisy = torch.tensor([s.noisy for s in samples])
    print(f"{args.run_dir.name}: {int(noisy.sum())}/{len(samples)} corrupted training solutions")
    if noisy.any() and (~noisy).any():
        print(f"sequence reward: clean mean {rewards[~noisy].mean():.3f}, corrupted mean {rewards[noisy].mean():.3f}, "
              f"AUC clean > corrupted {auc(rewards[~noisy], rewards[noisy]):.4f}; reward variance {rewards.var():.3f}")
    base_dir = project_path(cfg["paths"]["models_dir"]) / cfg["models"]["base"]
    for label, model_dir, value_file in (
            ("after stage 1 (base trunk, stage-1 value head)", base_dir, args.run_dir / "value_head_stage1.safetensors"),
            ("end of training (trained trunk, final value head)", args.run_dir / "final",
             args.run_dir / "final" / "value_head.safetensors")):
        model = MTPModel.from_pretrained(model_dir).eval()
        head = ValueHead(model.config.hidden_size)
        head.load_state_dict(load_file(str(value_file)))
        td_by, w_by, every = token_groups(model, head, data, rewards, min(args.rows, len(samples)), cfg)
        print(f"\n{label}: head 0, first {min(args.rows, len(samples))} rows, mean weight {statistics.fmean(every):.3f}, "
              f"at the cap {sum(w >= cfg['weights']['max_weight'] - 1e-3 for w in every) / len(every):.3f}")
        for g in GROUPS:
            if td_by[g]:
                print(f"  {g:28s} n={len(td_by[g]):6d}  TD error {statistics.fmean(td_by[g]):+.3f} "
                      f"(sd {statistics.pstdev(td_by[g]):.3f})  weight {statistics.fmean(w_by[g]):.3f}")


if __name__ == "__main__":
    main()
