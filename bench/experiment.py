"""The embedded experiment: does weighting stop the model from learning the noise?

One command trains every (noise level, recipe, seed) of the grid on the tiny default, evaluates each run
on held-out synthetic tasks (pass@1 and noise imitation: the fraction of sampled solutions that use a
corrupted operation), and writes into ``--out``:

- ``runs.csv``: one row per run (training and evaluation numbers, per-head token weights over the whole run
  and over its last logs, the commit it was trained at);
- ``table.md`` and ``table.csv``: per recipe and noise level, the mean over seeds and problems with a 95%
  bootstrap interval that resamples both the training seeds and the problem families (problems of one
  family share a template), the paired difference to ``mtp_baseline`` at the same noise level with the same
  kind of interval, the spread over seeds, and per-family means;
- ``figure.png``: mean weight on corrupted / other noisy / clean-slot tokens per recipe and head, and
  pass@1 and noise imitation vs noise level per recipe with their intervals;
- ``critic.png`` (when the grid has critic runs): the value head's held-out explained variance through stage 1,
  and the critic's mean weight on corrupted / other noisy / clean-slot tokens through training, per noise level.

    python bench/experiment.py --out runs/experiment --jobs 2     # the grid (3 noise x 4 recipes x 3 seeds)
    python bench/experiment.py --out /tmp/smoke --smoke           # 1 x 2 x 1, a few steps (the CI check)

The calibrated constants live in ``params/envs/experiment.yaml`` (an environment like ``local``); runs
that already have their evaluation are not run again, so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_models import bench_header  # noqa: E402

from wmtp_lib.checkpoints.tiny import stage_tiny  # noqa: E402
from wmtp_lib.config import (  # noqa: E402
    RECIPES,
    load_resolved,
    project_path,
    resolve_config,
    write_config,
)
from wmtp_lib.data.sources import load_samples  # noqa: E402
from wmtp_lib.eval.evaluation import run_evaluation  # noqa: E402

GROUPS = ("corrupt", "corrupt_rest", "clean_slot")
SMOKE = {"noise": [0.4], "recipes": ["mtp_baseline", "rho1"], "seeds": [0],
         "overrides": {"train.steps": 4, "train.log_every": 2, "data.n_train": 64, "data.n_test": 4},
         "n_samples": 2, "limit": 4, "max_new_tokens": 24}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (models/, runs/, tables, figure)")
    p.add_argument("--env", default="experiment", help="environment file under params/envs/")
    p.add_argument("--noise", default="0,0.2,0.4", help="comma-separated noise fractions")
    p.add_argument("--recipes", default=None, help="comma-separated (default: all four; --smoke: mtp_baseline,rho1)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n-samples", type=int, default=5, help="sampled solutions per held-out problem")
    p.add_argument("--limit", type=int, default=None, help="held-out problems (default: data.n_test)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=64, help="a synthetic solution is about 20 tokens")
    p.add_argument("--overrides", default="{}", help="JSON of dotted config keys applied to every run")
    p.add_argument("--models-dir", default=None, help="staged tiny models to reuse (default: <out>/models)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (2 on a 2-core machine)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads a run trains and evaluates with, whatever --jobs is: CPU reductions depend "
                        "on the thread count, so the numbers are reproducible for a given --threads only")
    p.add_argument("--smoke", action="store_true",
                   help="1 noise level x 2 recipes (or --recipes) x 1 seed, a few steps; sets --noise and --seeds")
    args = p.parse_args(argv)
    args.noise = [float(x) for x in args.noise.split(",")]
    recipes_given = args.recipes is not None
    args.recipes = (args.recipes or ",".join(RECIPES)).split(",")
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.overrides = json.loads(args.overrides)
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; valid: {', '.join(RECIPES)}")
    if args.smoke:
        args.noise, args.seeds = SMOKE["noise"], SMOKE["seeds"]
        args.recipes = args.recipes if recipes_given else SMOKE["recipes"]
        args.overrides = {**SMOKE["overrides"], **args.overrides}
        args.n_samples, args.limit, args.max_new_tokens = SMOKE["n_samples"], SMOKE["limit"], SMOKE["max_new_tokens"]
    return args


def run_name(recipe: str, noise: float, seed: int) -> str:
    return f"{recipe}-noise{noise:g}-seed{seed}"


def train_one(args: argparse.Namespace, recipe: str, noise: float, seed: int, models_dir: Path,
              runs_dir: Path) -> Path:
    """Resolve, write and train one run as a subprocess (its log in ``<run>/train.log``)."""
    name = run_name(recipe, noise, seed)
    over = {**args.overrides, "data.noise_fraction": noise, "seed": seed, "paths.models_dir": str(models_dir),
            "paths.runs_dir": str(runs_dir), "train.resume": "never"}
    cfg = resolve_config(recipe, args.env, over, run_name=name)
    run_dir = runs_dir / name
    if run_dir.exists():  # a run without its evaluation is incomplete: start it again
        import shutil

        shutil.rmtree(run_dir)
    config = write_config(cfg, run_dir / "config.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "wmtp_lib.train", "--config", str(config)], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"training {name} failed (exit {proc.returncode}); log {run_dir / 'train.log'}:\n"
                           + "\n".join(tail))
    return run_dir


FINAL_LOGS = 5  # the "final" weights: the run's last logged steps (steps 260-300 of the calibrated 300)


def head_means(records: list[dict[str, Any]], key: str, last: int | None = None) -> list[float | None]:
    """Per head, the mean of a per-head logged weight over the run's logs where the head saw such tokens
    (the last ``last`` such logs only, when given: weights drift as the model learns)."""
    rows = [r[key] for r in records if r.get(key)]
    if last is not None:
        rows = rows[-last:]
    if not rows:
        return []
    out = []
    for k in range(len(rows[0])):
        vals = [r[k] for r in rows if r[k] is not None]
        out.append(statistics.fmean(vals) if vals else None)
    return out


def collect(run_dir: Path, recipe: str, noise: float, seed: int, evaluation: dict[str, Any]) -> dict[str, Any]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    mtp = [r for r in records if r.get("stage") == "mtp"]
    problems = evaluation["per_problem"]
    summary = json.loads((run_dir / "summary.json").read_text())
    commit = summary.get("git_commit") or "unknown"
    cfg = load_resolved(run_dir / "config.yaml")
    family = {t.id: t.entry_point for t in load_samples(cfg["data"], "test", project_path(cfg["paths"]["datasets_dir"]))}
    row: dict[str, Any] = {
        "recipe": recipe, "noise": noise, "seed": seed, "final_loss": mtp[-1]["loss"],
        "pass@1": evaluation["summary"]["pass@1"], "noise_imitation": evaluation["summary"]["noise_imitation"],
        "problems": len(problems), "n_samples": evaluation["n_samples"],
        "per_problem_pass@1": [p["pass_at_k"]["1"] for p in problems],
        "per_problem_imitation": [p["noise_imitation"] for p in problems],
        "heldout_head_loss": evaluation["head_metrics"]["loss"],
        "per_problem_family": [family[p["id"]] for p in problems],
        # a run trained from a working tree with uncommitted changes says so
        "commit": commit[:7] + ("-dirty" if commit.endswith("-dirty") else ""),
    }
    for group in GROUPS:
        row[f"weight_{group}"] = head_means(mtp, f"weight_{group}")
        row[f"weight_{group}_final"] = head_means(mtp, f"weight_{group}", last=FINAL_LOGS)
    means = [r["weight_mean"] for r in mtp if r.get("weight_mean") is not None]
    row["weight_mean"] = statistics.fmean(means) if means else None  # 1 for every soft weighting (DESIGN §4)
    row["stage1_ev"] = summary.get("stage1_explained_variance")
    row["stage1_auc"] = summary.get("stage1_last_state_auc")
    row["stage1_best_step"] = summary.get("stage1_best_step")
    row["stage1_r2"] = summary.get("stage1_r2")
    return row


def seeds_families_ci(runs: list[list[float]], families: list[str], base: list[list[float]] | None = None,
                      n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over problems of the seed-averaged per-problem values (minus the baseline's, paired over the same
    problems, when ``base`` is given), with a 95% bootstrap interval that resamples both the training seeds
    (each recipe's independently) and the problem families (clusters: problems of one family share their
    template, so they are not independent draws). ``runs[s][i]``: seed ``s``, problem ``i``.
    """
    rng = random.Random(seed)
    names = sorted(set(families))
    members = {f: [i for i, x in enumerate(families) if x == f] for f in names}

    def value(seeds: list[int], base_seeds: list[int] | None, fams: list[str]) -> float:
        problems = [i for f in fams for i in members[f]]
        mine = statistics.fmean(runs[s][i] for i in problems for s in seeds)
        if base is None:
            return mine
        return mine - statistics.fmean(base[s][i] for i in problems for s in base_seeds)

    point = value(list(range(len(runs))), None if base is None else list(range(len(base))), names)
    draws = sorted(value([rng.randrange(len(runs)) for _ in runs],
                         None if base is None else [rng.randrange(len(base)) for _ in base],
                         [rng.choice(names) for _ in names]) for _ in range(n_boot))
    return point, draws[int(0.025 * n_boot)], draws[min(n_boot - 1, int(0.975 * n_boot))]


def _mean_heads(per_run: list[list[float | None]]) -> list[float | None]:
    heads = []
    for k in range(len(per_run[0]) if per_run else 0):
        vals = [w[k] for w in per_run if w[k] is not None]
        heads.append(statistics.fmean(vals) if vals else None)
    return heads


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (recipe, noise): mean over seeds and problems, its 95% interval resampling seeds and problem
    families, the paired difference to the baseline at the same noise level, the spread over seeds, the
    token weights (whole run and final logs) and per-family means."""
    out = []
    keys = sorted({(r["recipe"], r["noise"]) for r in rows}, key=lambda k: (RECIPES.index(k[0]), k[1]))
    for recipe, noise in keys:
        runs = [r for r in rows if r["recipe"] == recipe and r["noise"] == noise]
        base = [r for r in rows if r["recipe"] == "mtp_baseline" and r["noise"] == noise]
        families = runs[0]["per_problem_family"]
        agg: dict[str, Any] = {"recipe": recipe, "noise": noise, "seeds": len(runs),
                               "problems": len(families), "families": len(set(families)),
                               "family_of_problem": families}
        for metric, per_problem in (("pass@1", "per_problem_pass@1"), ("noise_imitation", "per_problem_imitation")):
            mean, lo, hi = seeds_families_ci([r[per_problem] for r in runs], families)
            seed_means = [r[metric] for r in runs]
            agg.update({metric: mean, f"{metric}_lo": lo, f"{metric}_hi": hi,
                        f"{metric}_seed_sd": statistics.stdev(seed_means) if len(runs) > 1 else 0.0,
                        f"{metric}_seed_min": min(seed_means), f"{metric}_seed_max": max(seed_means)})
            if recipe == "mtp_baseline" or not base:
                agg.update({f"d_{metric}": None, f"d_{metric}_lo": None, f"d_{metric}_hi": None})
            else:
                d, lo, hi = seeds_families_ci([r[per_problem] for r in runs], families, [r[per_problem] for r in base])
                agg.update({f"d_{metric}": d, f"d_{metric}_lo": lo, f"d_{metric}_hi": hi})
            agg[f"{metric}_by_family"] = {
                f: statistics.fmean(r[per_problem][i] for r in runs for i, x in enumerate(families) if x == f)
                for f in sorted(set(families))}
        for group in GROUPS:
            agg[f"weight_{group}"] = _mean_heads([r[f"weight_{group}"] for r in runs if r[f"weight_{group}"]])
            agg[f"weight_{group}_final"] = _mean_heads([r[f"weight_{group}_final"] for r in runs
                                                        if r[f"weight_{group}_final"]])
        out.append(agg)
    return out


def _fmt_heads(values: list[float | None]) -> str:
    return " ".join("—" if v is None else f"{v:.2f}" for v in values) if values else "—"


def _fmt_weight(a: dict[str, Any], group: str) -> str:
    """Mean over heads, whole run / final logs (per head in table.csv)."""
    def mean(values):
        vals = [v for v in values if v is not None]
        return f"{statistics.fmean(vals):.2f}" if vals else "—"
    return "—" if not a[f"weight_{group}"] else f"{mean(a[f'weight_{group}'])} / {mean(a[f'weight_{group}_final'])}"


def write_tables(agg: list[dict[str, Any]], out: Path, header: str) -> None:
    lines = [header, "",
             "| recipe | noise | seeds | pass@1 [95% CI] | seed sd (min–max) | Δ pass@1 vs baseline [95% CI] "
             "| noise imitation [95% CI] | seed sd (min–max) | Δ imitation vs baseline [95% CI] "
             "| w corrupted: run / final | w rest of noisy | w clean slots |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in agg:
        cells = [f"`{a['recipe']}`", f"{a['noise']:g}", str(a["seeds"])]
        for m in ("pass@1", "noise_imitation"):
            cells.append(f"{a[m]:.3f} [{a[m + '_lo']:.3f}, {a[m + '_hi']:.3f}]")
            cells.append(f"{a[m + '_seed_sd']:.3f} ({a[m + '_seed_min']:.3f}–{a[m + '_seed_max']:.3f})")
            cells.append("—" if a["d_" + m] is None else
                         f"{a['d_' + m]:+.3f} [{a['d_' + m + '_lo']:+.3f}, {a['d_' + m + '_hi']:+.3f}]")
        cells += [_fmt_weight(a, g) for g in GROUPS]
        lines.append("| " + " | ".join(cells) + " |")
    families = sorted(agg[0]["pass@1_by_family"])
    lines += ["", "Per family (mean over seeds and the family's problems; problems per family: "
              + ", ".join(f"{f} {n}" for f, n in sorted(Counter(agg[0]["family_of_problem"]).items())) + "):", "",
              "| recipe | noise | " + " | ".join(f"{f} pass@1 / imitation" for f in families) + " |",
              "|---|---|" + "---|" * len(families)]
    for a in agg:
        lines.append(f"| `{a['recipe']}` | {a['noise']:g} | " + " | ".join(
            f"{a['pass@1_by_family'][f]:.2f} / {a['noise_imitation_by_family'][f]:.2f}" for f in families) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        cols = [k for k in agg[0] if not k.startswith("weight_") and not k.endswith("_by_family")
                and k != "family_of_problem"]
        heads = [f"weight_{g}{suffix}_head{k}" for suffix in ("", "_final") for g in GROUPS for k in range(4)]
        w.writerow(cols + heads)
        for a in agg:
            vals = [(a[f"weight_{g}{suffix}"] + [None] * 4)[k] for suffix in ("", "_final") for g in GROUPS
                    for k in range(4)]
            w.writerow([a[c] for c in cols] + ["" if v is None else v for v in vals])


def write_runs_csv(rows: list[dict[str, Any]], out: Path) -> None:
    cols = ["recipe", "noise", "seed", "final_loss", "pass@1", "noise_imitation", "problems", "n_samples", "commit",
            "weight_mean", "stage1_ev", "stage1_r2", "stage1_auc", "stage1_best_step"]
    with open(out / "runs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols + ["heldout_head_loss"] + [f"weight_{g}{x}" for x in ("", "_final") for g in GROUPS])
        for r in rows:
            w.writerow([r[c] for c in cols] + [" ".join(f"{x:.4f}" for x in r["heldout_head_loss"])]
                       + [_fmt_heads(r[f"weight_{g}{x}"]) for x in ("", "_final") for g in GROUPS])


def write_figure(agg: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = [r for r in RECIPES if any(a["recipe"] == r for a in agg)]
    top = max(a["noise"] for a in agg)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    # (a) token weights at the highest noise level, per weighted recipe and head
    ax = axes[0]
    weighted = [r for r in recipes if r != "mtp_baseline"]
    width = 0.8 / max(1, 3 * len(weighted))
    for i, recipe in enumerate(weighted):
        a = next(x for x in agg if x["recipe"] == recipe and x["noise"] == top)
        for j, group in enumerate(GROUPS):
            vals = [float("nan") if v is None else v for v in a[f"weight_{group}"]]
            xs = [k + (3 * i + j) * width for k in range(len(vals))]
            ax.bar(xs, vals, width, label=f"{recipe}: {group.replace('_', ' ')}",
                   color=plt.cm.tab20(4 * i + j))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="mtp_baseline (every weight 1)")
    n_heads = max((len(a["weight_corrupt_rest"]) for a in agg), default=0)
    ax.set_xticks([k + (3 * len(weighted) - 1) * width / 2 for k in range(n_heads)], [str(k) for k in range(n_heads)])
    ax.set_xlabel("head")
    ax.set_ylabel("mean token weight")
    ax.set_title(f"weights at noise {top:g}: corrupted vs other vs clean-slot tokens")
    tallest = max((v for a in agg for g in GROUPS for v in a[f"weight_{g}"] if v is not None), default=1.0)
    ax.set_ylim(0, 1.75 * max(tallest, 1.0))  # room above the bars for the legend
    ax.legend(fontsize=6, ncol=3, loc="upper center")
    # (b, c) pass@1 and noise imitation vs noise level with 95% intervals over problems
    for ax, metric in zip(axes[1:], ("pass@1", "noise_imitation")):
        for i, recipe in enumerate(recipes):
            pts = sorted((a for a in agg if a["recipe"] == recipe), key=lambda a: a["noise"])
            xs = [a["noise"] + (i - (len(recipes) - 1) / 2) * 0.006 for a in pts]  # side by side
            ys = [a[metric] for a in pts]
            err = [[a[metric] - a[metric + "_lo"] for a in pts], [a[metric + "_hi"] - a[metric] for a in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=recipe)
        ax.set_xticks(sorted({a["noise"] for a in agg}))
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("noise fraction of training solutions")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} on held-out tasks (95% bootstrap CI)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "figure.png", dpi=110)
    plt.close(fig)


def _head_mean(values: list[float | None] | None) -> float | None:
    vals = [v for v in (values or []) if v is not None]
    return statistics.fmean(vals) if vals else None


def write_critic_figure(rows: list[dict[str, Any]], runs_dir: Path, out: Path) -> None:
    """``critic.png``: stage 1's held-out explained variance by step, and the token weights (mean over heads)
    on corrupted / other noisy / clean-slot tokens by training step, for every critic run (one line a seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in rows if r["recipe"] == "critic"]
    if not runs:
        return
    noises = sorted({r["noise"] for r in runs})
    fig, axes = plt.subplots(1, 1 + len(noises), figsize=(4.2 * (1 + len(noises)), 3.8))
    colors = {g: plt.cm.tab10(i) for i, g in enumerate(GROUPS)}
    for r in runs:
        records = [json.loads(x) for x in (runs_dir / run_name("critic", r["noise"], r["seed"]) / "metrics.jsonl")
                   .read_text().splitlines() if x.strip()]
        ev = [(x["step"], x["explained_variance"]) for x in records
              if x.get("stage") == "value" and x.get("explained_variance") is not None]
        if ev:
            axes[0].plot(*zip(*ev), marker=".", color=plt.cm.viridis(noises.index(r["noise"]) / max(1, len(noises))),
                         label=f"noise {r['noise']:g}" if r["seed"] == min(x["seed"] for x in runs) else None)
        ax = axes[1 + noises.index(r["noise"])]
        for g in GROUPS:
            pts = [(x["step"], _head_mean(x.get(f"weight_{g}"))) for x in records if x.get("stage") == "mtp"]
            pts = [(a, b) for a, b in pts if b is not None]
            if pts:
                ax.plot(*zip(*pts), color=colors[g], alpha=0.7, lw=1,
                        label=g.replace("_", " ") if r["seed"] == min(x["seed"] for x in runs) else None)
    axes[0].set_xlabel("stage-1 step")
    axes[0].set_ylabel("explained variance (held out)")
    axes[0].set_title("value head fit (one line a seed)")
    axes[0].axhline(0, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=7)
    for noise, ax in zip(noises, axes[1:]):
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("training step")
        ax.set_ylabel("mean token weight (mean over heads)")
        ax.set_title(f"critic weights, noise {noise:g}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "critic.png", dpi=110)
    plt.close(fig)


def run_cell(args: argparse.Namespace, cell: tuple[float, str, int], models_dir: Path, runs_dir: Path) -> float | None:
    """Train and evaluate one grid cell unless its evaluation exists; the seconds it took (None: already done)."""
    noise, recipe, seed = cell
    name = run_name(recipe, noise, seed)
    if (runs_dir / name / "eval" / "synthetic.json").is_file():
        return None
    import torch

    torch.set_num_threads(args.threads)
    t_run = time.perf_counter()
    train_one(args, recipe, noise, seed, models_dir, runs_dir)
    n_test = resolve_config(recipe, args.env, {**args.overrides}, run_name=name)["data"]["n_test"]
    run_evaluation(name, ["synthetic"], n_samples=args.n_samples, ks=[1], temperature=args.temperature,
                   max_new_tokens=args.max_new_tokens, limit=args.limit or n_test, speculative_prompts=0,
                   seed=seed, runs_dir=runs_dir)
    seconds = time.perf_counter() - t_run
    print(f"{name}: trained and evaluated in {seconds:.0f} s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    runs_dir = out / "runs"
    models_dir = Path(args.models_dir).resolve() if args.models_dir else out / "models"
    runs_dir.mkdir(parents=True, exist_ok=True)
    print(bench_header("cpu", "fp32", threads=args.threads), flush=True)  # each run's threads, not this process's
    t0 = time.perf_counter()
    needed = ["tiny-mtp"] + (["tiny-ref"] if {"rho1", "rho1_tokenskip"} & set(args.recipes) else []) + \
        (["tiny-rm"] if "critic" in args.recipes else [])
    stage_tiny(models_dir, ids=tuple(needed), log=lambda m: print(m, flush=True))
    grid = [(n, r, s) for n in args.noise for r in args.recipes for s in args.seeds]
    if args.jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(run_cell, [args] * len(grid), grid, [models_dir] * len(grid),
                                 [runs_dir] * len(grid)))
    else:
        done = [run_cell(args, cell, models_dir, runs_dir) for cell in grid]
    rows = []
    for i, ((noise, recipe, seed), seconds) in enumerate(zip(grid, done), 1):
        name = run_name(recipe, noise, seed)
        evaluation = json.loads((runs_dir / name / "eval" / "synthetic.json").read_text())
        rows.append(collect(runs_dir / name, recipe, noise, seed, evaluation))
        print(f"[{i}/{len(grid)}] {name}: pass@1 {rows[-1]['pass@1']:.3f} noise imitation "
              f"{rows[-1]['noise_imitation']:.3f} w corrupted {_fmt_heads(rows[-1]['weight_corrupt'])} "
              f"({'already done' if seconds is None else f'{seconds:.0f} s'})", flush=True)
    agg = aggregate(rows)
    commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    trained_at = list(dict.fromkeys(r["commit"] for r in rows))  # a resumed grid may span commits: say so
    wall = time.perf_counter() - t0
    header = (f"Grid {len(args.noise)} noise levels x {len(args.recipes)} recipes x {len(args.seeds)} seeds, "
              f"env `{args.env}`, overrides {json.dumps(args.overrides)}, {args.n_samples} samples per problem at "
              f"temperature {args.temperature}; runs trained at commit(s) {', '.join(trained_at)}, tables made at "
              f"{commit}; {platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores), "
              f"{args.jobs} run(s) at once, {args.threads} thread(s) each, {wall / 60:.1f} min wall"
              f"{' (this invocation; earlier runs were reused)' if any(d is None for d in done) else ''}.")
    write_runs_csv(rows, out)
    write_tables(agg, out, header)
    write_figure(agg, out)
    write_critic_figure(rows, runs_dir, out)
    (out / "experiment.json").write_text(json.dumps({"header": header, "runs": rows, "aggregate": agg}, indent=1))
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
