"""Where Rho-1's token weights go, for one finished run of the embedded experiment (`rho1`, `rho1_tokenskip`, or
another recipe's run, scored with the rho1 recipe's weights).

For the base model (what fine-tuning starts from) and the run's final model, over the first ``--rows``
training rows, per token group: the model's loss, the reference's loss, the excess loss (the Rho-1 score,
``ce − ref_ce``) and the weight training's `rho1_from_scores` gives it (per head, over consecutive groups of
``train.micro_batch_size`` rows where training draws shuffled micro-batches; the run's ``weights`` settings, or
the rho1 recipe's for another recipe's run), for head 0 and averaged over the heads. The
groups: the slot tokens of clean solutions (operation and constant: what decides whether a solution passes),
the other tokens of clean solutions, corrupted tokens and the rest of corrupted solutions (noisy data only),
and the final ``</s>``. A group the reference predicts worse than the model has a low excess loss, so Rho-1
moves weight off it, whatever the group's importance.

    python bench/rho1_signal.py runs/experiment/runs/rho1-noise0-seed0 [--rows 512]
    python bench/rho1_signal.py runs/experiment/runs/mtp_baseline-noise0-seed0   # the baseline's slot losses
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `pip install -e .`

from bench_models import bench_header  # noqa: E402

from wmtp_lib.checkpoints.convert import load_causal_lm  # noqa: E402
from wmtp_lib.checkpoints.tokenization import load_tokenizer  # noqa: E402
from wmtp_lib.config import load_resolved, project_path, resolve_config  # noqa: E402
from wmtp_lib.data.rows import tokenize_samples  # noqa: E402
from wmtp_lib.data.sources import load_samples  # noqa: E402
from wmtp_lib.model.heads import MTPModel  # noqa: E402
from wmtp_lib.model.losses import align_reference, target_valid  # noqa: E402
from wmtp_lib.model.step import sequential_mtp_step  # noqa: E402
from wmtp_lib.train.reference import reference_token_ce  # noqa: E402
from wmtp_lib.train.weight_stats import noisy_targets  # noqa: E402
from wmtp_lib.train.weighting import rho1_from_scores  # noqa: E402

GROUPS = ("clean slot", "clean other", "corrupted", "rest of noisy", "final </s>")
STATS = ("model ce", "ref ce", "excess", "weight")


def token_group_masks(batch, valid: torch.Tensor, H: int) -> dict[str, torch.Tensor]:
    """``(B, T, H)`` masks of the valid targets in each of `GROUPS`."""
    noisy, mark = noisy_targets(batch["noisy"], H).bool(), noisy_targets(batch["noise_marks"], H).bool()
    pos = torch.arange(valid.shape[1]).view(1, -1, 1).expand_as(valid)
    final = valid & (pos == torch.where(valid, pos, -1).amax(1, keepdim=True))
    body = valid & ~final
    return {"clean slot": ~noisy & mark & body, "clean other": ~noisy & ~mark & body,
            "corrupted": noisy & mark & body, "rest of noisy": noisy & ~mark & body, "final </s>": final}


@torch.no_grad()
def group_means(model: MTPModel, ref, data, cfg: dict, rows: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per group and statistic, the ``(H,)`` mean over the first ``rows`` training rows."""
    H = model.n_future
    sums = {g: {s: torch.zeros(H, dtype=torch.float64) for s in STATS} for g in GROUPS}
    counts = {g: torch.zeros(H, dtype=torch.float64) for g in GROUPS}
    step = cfg["train"]["micro_batch_size"]
    for start in range(0, rows, step):
        b = data.rows(list(range(start, min(rows, start + step))))
        ce = sequential_mtp_step(model, b, chunk_size=cfg["train"]["chunk_size"], backward=False).ce.float()
        ref_ce = align_reference(reference_token_ce(ref, b["input_ids"], b["attention_mask"]).float(), H)
        valid = target_valid(b["label_mask"], H)
        excess = ce - ref_ce
        weights = torch.cat([rho1_from_scores(excess[..., k:k + 1], valid[..., k:k + 1], cfg["weights"])
                             for k in range(H)], dim=-1)
        values = {"model ce": ce, "ref ce": ref_ce, "excess": excess, "weight": weights}
        for g, m in token_group_masks(b, valid.bool(), H).items():
            mf = m.double()
            counts[g] += mf.sum(dim=(0, 1))
            for s in STATS:
                sums[g][s] += (values[s].double() * mf).sum(dim=(0, 1))
    return {g: {s: sums[g][s] / counts[g].clamp(min=1) for s in STATS} | {"n": counts[g]} for g in GROUPS}


def print_table(label: str, means: dict[str, dict[str, torch.Tensor]]) -> None:
    print(f"\n{label}")
    print(f"  {'group':14s} {'targets':>8s} | " + " | ".join(f"{s:>8s} h0 / all" for s in STATS))
    for g, m in means.items():
        n = int(m["n"].sum())
        if n == 0:
            continue
        print(f"  {g:14s} {n:8d} | " + " | ".join(f"{m[s][0]:8.3f} / {m[s].mean():5.3f}" for s in STATS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--rows", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(bench_header("cpu", "fp32"))
    cfg = load_resolved(args.run_dir / "config.yaml")
    if cfg["weights"]["scheme"] != "rho1":  # e.g. the baseline: its losses, and the weights rho1 would give them
        cfg = {**cfg, "weights": resolve_config("rho1", cfg["env"])["weights"]}
        print(f"{args.run_dir.name} is a {cfg['recipe']} run: weights are those the rho1 recipe would give")
    if cfg["weights"]["weight_group"] != "micro_batch" or cfg["data"]["pack"]:
        raise SystemExit("this bench groups unpacked rows by micro-batch (weights.weight_group: micro_batch, "
                         "data.pack: false), as the experiment environment trains")
    models_dir = project_path(cfg["paths"]["models_dir"])
    samples = load_samples(cfg["data"], "train", project_path(cfg["paths"]["datasets_dir"]))
    tokenizer = load_tokenizer(models_dir / cfg["models"]["base"])
    data = tokenize_samples(tokenizer, samples, cfg["data"]["max_length"], cfg["data"]["prompt_masking"], False)
    ref = load_causal_lm(models_dir / cfg["models"]["reference"], dtype=torch.float32).eval()
    rows = min(args.rows, len(samples))
    print(f"{args.run_dir.name}: weights {cfg['weights']}, first {rows} training rows")
    for label, model_dir in (("base model (start of fine-tuning)", models_dir / cfg["models"]["base"]),
                             ("end of training", args.run_dir / "final")):
        model = MTPModel.from_pretrained(model_dir).eval()
        print_table(label, group_means(model, ref, data, cfg, rows))


if __name__ == "__main__":
    main()
