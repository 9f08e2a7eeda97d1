"""Where the critic's token weights come from, for one finished `critic` run of the embedded experiment.

Reports (1) how well the run's sequence rewards separate clean from corrupted training solutions (mean
reward per group and the AUC), and (2) for the value head after stage 1 (on the base model's trunk) and at
the end of training (on the trained trunk), the mean score (the aligned GAE advantage, λ_w = critic.score_lambda) and the mean token weight of head 0 on:
corrupted tokens, the other non-final tokens of corrupted solutions, clean solutions' non-final tokens,
and the final token (``</s>``) of corrupted and of clean solutions, where the sequence reward arrives.
All scores and weights are computed by training's own `CriticWeighting` (advantages → soft weights, value
trunk, temperature, standardize and cap from the run's config), over the first ``--rows`` training rows.

``--oracle`` replaces V by the best value a prefix can have on synthetic data, whatever the trunk: the mean
return of the states that have (or have not yet) seen a corrupted token, and reports its explained variance
and the weights its advantages give for each ``score_lambda`` and ``temperature``: what an exact value
function could localise (a corrupted span's first token carries the drop, GAE carries it back over the prefix).

    python bench/critic_signal.py runs/experiment/runs/critic-noise0.4-seed0 [--sweep] [--oracle]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from bench_models import bench_header  # noqa: E402

from wmtp_lib.checkpoints.tokenization import load_tokenizer  # noqa: E402
from wmtp_lib.config import load_resolved, project_path  # noqa: E402
from wmtp_lib.data.rows import tokenize_samples
from wmtp_lib.data.sources import load_samples  # noqa: E402
from wmtp_lib.model.heads import MTPModel  # noqa: E402
from wmtp_lib.model.losses import target_valid
from wmtp_lib.train.critic import (  # noqa: E402
    advantages,
    align_scores,
    auc,
    explained_variance,
    mc_returns,
)
from wmtp_lib.train.critic_weighting import CriticWeighting  # noqa: E402
from wmtp_lib.train.distributed import Dist  # noqa: E402
from wmtp_lib.train.rewards import reward_model_trunk
from wmtp_lib.train.weight_stats import noisy_targets  # noqa: E402

GROUPS = ("corrupted", "rest of noisy (not final)", "clean (not final)", "final token, noisy", "final token, clean")


@torch.no_grad()
def token_groups(model: MTPModel, critic: CriticWeighting, data, rows: int
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    """Scores and weights of head 0's targets per token group, and every valid weight."""
    H = model.n_future
    score_by, w_by = {g: [] for g in GROUPS}, {g: [] for g in GROUPS}
    every = []
    for start in range(0, rows, 32):
        idx = list(range(start, min(rows, start + 32)))
        b = data.rows(idx)
        hidden = model(b["input_ids"], b["attention_mask"], return_trunk=True).hidden
        score = critic.score(hidden, b)
        valid = target_valid(b["label_mask"], H)
        w = critic.weights_from_scores(score, valid)
        noisy = noisy_targets(b["noisy"], H)[..., 0]
        mark = noisy_targets(b["noise_marks"], H)[..., 0]
        ok = valid[..., 0]
        pos = torch.arange(ok.shape[1]).expand_as(ok)
        final = ok & (pos == torch.where(ok, pos, -1).amax(1, keepdim=True))
        groups = {GROUPS[0]: noisy & mark & ok, GROUPS[1]: noisy & ~mark & ok & ~final,
                  GROUPS[2]: ~noisy & ok & ~final, GROUPS[3]: noisy & final, GROUPS[4]: ~noisy & final}
        for g, m in groups.items():
            score_by[g] += score[..., 0][m].tolist()
            w_by[g] += w[..., 0][m].tolist()
        every += w[..., 0][ok].tolist()
    return score_by, w_by, every


def print_weight_table(critic: CriticWeighting, batch, H: int, lambdas: list[float], temperatures: list[float],
                       scores_for: Callable[[float], torch.Tensor]) -> None:
    """Mean weight (all heads) on corrupted / other noisy / clean-slot targets, per ``score_lambda`` (``scores_for``
    gives the aligned scores of one) and ``temperature``, with the run's other weight settings."""
    valid = target_valid(batch["label_mask"], H)
    noisy, mark = noisy_targets(batch["noisy"], H), noisy_targets(batch["noise_marks"], H)
    groups = {"corrupted": noisy & mark & valid, "rest": noisy & ~mark & valid, "clean slot": ~noisy & mark & valid}
    wcfg = dict(critic.cfg)
    print("  score_lambda temperature | corrupted  rest  clean slot | corrupted/rest corrupted/clean")
    for lam in lambdas:
        scores = scores_for(lam)
        for temperature in temperatures:
            critic.cfg = {**wcfg, "temperature": temperature}
            w = critic.weights_from_scores(scores, valid)
            m = {g: w[x].mean().item() for g, x in groups.items()}
            print(f"  {lam:12.2f} {temperature:11.2f} | {m['corrupted']:9.2f} {m['rest']:5.2f} {m['clean slot']:11.2f} | "
                  f"{m['corrupted'] / m['rest']:14.2f} {m['corrupted'] / m['clean slot']:15.2f}")
    critic.cfg = wcfg


@torch.no_grad()
def sweep(model: MTPModel, critic: CriticWeighting, data, rows: int, lambdas: list[float], temperatures: list[float]
          ) -> None:
    """Mean weight (all heads) on corrupted / other noisy / clean-slot targets for other ``score_lambda`` and
    ``temperature`` with the same value head: λ_w = 0 shows what V itself localises (its one-step TD errors)."""
    b = data.rows(list(range(rows)))
    hidden = model(b["input_ids"], b["attention_mask"], return_trunk=True).hidden
    ccfg = dict(critic.ccfg)

    def scores_for(lam: float) -> torch.Tensor:
        critic.ccfg = {**ccfg, "score_lambda": lam}
        return critic.score(hidden, b)

    print_weight_table(critic, b, model.n_future, lambdas, temperatures, scores_for)
    critic.ccfg = ccfg


def prefix_oracle_values(batch, returns: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """V*(s_t) ``(B, T)``: the mean Monte-Carlo return of the states whose prefix (tokens ``0..t``) holds a
    corrupted token, or of those whose prefix holds none; the best value computable from that one fact."""
    corrupted = batch["noise_marks"].bool() & batch["noisy"].bool()
    seen = corrupted.long().cumsum(1) > 0
    clean_so_far, after = returns[states & ~seen].mean(), returns[states & seen].mean()
    return torch.where(seen, after, clean_so_far).float()


@torch.no_grad()
def oracle_sweep(critic: CriticWeighting, data, rows: int, H: int, lambdas: list[float],
                 temperatures: list[float]) -> None:
    """Weights (all heads) on corrupted / other noisy / clean-slot targets of `prefix_oracle_values`."""
    b = data.rows(list(range(rows)))
    tr = critic.transitions(b)
    returns = mc_returns(tr.rewards, tr.states, critic.ccfg["gamma"], None, tr.bootstrap)
    values = prefix_oracle_values(b, returns, tr.states)
    corrupted = b["noise_marks"].bool() & b["noisy"].bool()
    seen = corrupted.long().cumsum(1) > 0
    clean_mean, after_mean = values[tr.states & ~seen].mean(), values[tr.states & seen].mean()
    hit = corrupted.any(1)
    spans = corrupted.sum(1)[hit].float()
    pos = torch.arange(corrupted.shape[1]).expand_as(corrupted)
    completion = b["label_mask"].bool()
    start = torch.where(completion, pos, corrupted.shape[1]).amin(1)
    length = completion.sum(1)
    first = torch.where(corrupted, pos, corrupted.shape[1]).amin(1)
    ev = explained_variance(values[tr.states].double(), returns[tr.states].double())
    print(f"\nprefix oracle V over {rows} rows: explained variance {ev:.3f} (V = {clean_mean:.3f} before the first "
          f"corrupted token, {after_mean:.3f} from it on); a corrupted solution has {spans.mean():.2f} corrupted tokens, "
          f"the first at token {(first - start)[hit].float().mean():.1f} of its {length[hit].float().mean():.1f}")
    gamma = critic.ccfg["gamma"]
    print_weight_table(critic, b, H, lambdas, temperatures,
                       lambda lam: align_scores(advantages(values, tr.rewards, tr.states, gamma, lam, tr.bootstrap), H))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--sweep", action="store_true",
                   help="also weights for other score_lambda / temperature values (stage-1 value head)")
    p.add_argument("--oracle", action="store_true",
                   help="also the weights of the prefix oracle value (see the docstring), synthetic data only")
    p.add_argument("--lambdas", default="0,0.5,0.8,0.9,0.95")
    p.add_argument("--temperatures", default="0.2,0.33,0.5")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(bench_header("cpu", "fp32"))
    cfg = load_resolved(args.run_dir / "config.yaml")
    samples = load_samples(cfg["data"], "train", project_path(cfg["paths"]["datasets_dir"]))
    tokenizer = load_tokenizer(project_path(cfg["paths"]["models_dir"]) / cfg["models"]["base"])
    data = tokenize_samples(tokenizer, samples, cfg["data"]["max_length"], cfg["data"]["prompt_masking"], False)
    rewards = load_file(str(args.run_dir / "rewards.safetensors"))["rewards"]
    noisy = torch.tensor([s.noisy for s in samples])
    print(f"{args.run_dir.name}: {int(noisy.sum())}/{len(samples)} corrupted training solutions")
    if noisy.any() and (~noisy).any():
        print(f"sequence reward: clean mean {rewards[~noisy].mean():.3f}, corrupted mean {rewards[noisy].mean():.3f}, "
              f"AUC clean > corrupted {auc(rewards[~noisy], rewards[noisy]):.4f}; reward variance {rewards.var():.3f}")
    base_dir = project_path(cfg["paths"]["models_dir"]) / cfg["models"]["base"]
    rm_dir = project_path(cfg["paths"]["models_dir"]) / (cfg["models"]["reward"] or "")
    value_trunk = reward_model_trunk(cfg, tokenizer, samples, rm_dir, Dist(torch.device("cpu"))) \
        if cfg["critic"]["value_trunk"] == "reward_model" else None
    for label, model_dir, value_file in (
            ("after stage 1 (base trunk, stage-1 value head)", base_dir, args.run_dir / "value_head_stage1.safetensors"),
            ("end of training (trained trunk, final value head)", args.run_dir / "final",
             args.run_dir / "final" / "value_head.safetensors")):
        model = MTPModel.from_pretrained(model_dir).eval()
        critic = CriticWeighting(cfg, model.n_future, model.config.hidden_size, data.token_map(rewards),
                                 data.cut_documents(tokenizer.eos_token_id), tokenizer.eos_token_id,
                                 torch.device("cpu"), value_trunk)
        critic.value_head.load_state_dict(load_file(str(value_file)))
        td_by, w_by, every = token_groups(model, critic, data, min(args.rows, len(samples)))
        if args.oracle and value_file.name == "value_head_stage1.safetensors":
            oracle_sweep(critic, data, min(args.rows, len(samples)), model.n_future,
                         [float(x) for x in args.lambdas.split(",")], [float(x) for x in args.temperatures.split(",")])
        if args.sweep and value_file.name == "value_head_stage1.safetensors":
            sweep(model, critic, data, min(args.rows, len(samples), 256),
                  [float(x) for x in args.lambdas.split(",")], [float(x) for x in args.temperatures.split(",")])
        print(f"\n{label}: head 0, first {min(args.rows, len(samples))} rows, mean weight {statistics.fmean(every):.3f}, "
              f"at the cap {sum(w >= cfg['weights']['max_weight'] - 1e-3 for w in every) / len(every):.3f}")
        for g in GROUPS:
            if td_by[g]:
                print(f"  {g:28s} n={len(td_by[g]):6d}  score {statistics.fmean(td_by[g]):+.3f} "
                      f"(sd {statistics.pstdev(td_by[g]):.3f})  weight {statistics.fmean(w_by[g]):.3f}")


if __name__ == "__main__":
    main()
