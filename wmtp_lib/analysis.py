"""Cross-run analysis for `notebooks/analysis.ipynb`: curves, weights, pass@k with bootstrap CIs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wmtp_lib.evaluation import bootstrap_ci


def discover_runs(runs_dir: str | Path) -> list[str]:
    """Every run under ``runs_dir`` that has a metrics log."""
    root = Path(runs_dir)
    return sorted(p.name for p in root.iterdir() if (p / "metrics.jsonl").is_file()) if root.is_dir() else []


def load_run(runs_dir: str | Path, name: str) -> dict[str, Any]:
    d = Path(runs_dir) / name
    metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
    evals = {p.stem: json.loads(p.read_text()) for p in sorted((d / "eval").glob("*.json"))} \
        if (d / "eval").is_dir() else {}
    return {"name": name, "metrics": metrics, "summary": summary, "eval": evals}


def pass_at_k_table(runs: list[dict[str, Any]], n_boot: int = 2000) -> list[dict[str, Any]]:
    """One row per (run, benchmark, k): mean pass@k over problems with a 95% bootstrap interval."""
    rows = []
    for run in runs:
        for bench, res in run["eval"].items():
            for key in res["summary"]:
                k = key.split("@")[1]
                values = [p["pass_at_k"][k] for p in res["per_problem"]]
                mean, lo, hi = bootstrap_ci(values, n_boot=n_boot)
                rows.append({"run": run["name"], "benchmark": bench, "k": int(k), "pass@k": mean,
                             "ci95_low": lo, "ci95_high": hi, "problems": len(values)})
    return rows


def speculative_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        for bench, res in run["eval"].items():
            s = res.get("speculative")
            if s:
                rows.append({"run": run["name"], "benchmark": bench, "tokens_per_forward": s["tokens_per_forward"],
                             "speedup": s["speedup"], "identical": f"{s['identical_to_greedy']}/{s['prompts']}"})
    return rows


def plot_curves(runs: list[dict[str, Any]], save_to: str | Path | None = None):
    """Loss and per-head final loss across runs."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for run in runs:
        mtp = [r for r in run["metrics"] if r.get("stage") == "mtp"]
        if not mtp:
            continue
        axes[0].plot([r["step"] for r in mtp], [r["loss"] for r in mtp], label=run["name"])
        axes[1].plot(range(len(mtp[-1]["head_loss"])), mtp[-1]["head_loss"], "o-", label=run["name"])
    axes[0].set_title("training loss (sum over heads)")
    axes[0].set_xlabel("step")
    axes[1].set_title("final per-head loss")
    axes[1].set_xlabel("head k (predicts t+k+1)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=100)
    return fig


def plot_weights(runs: list[dict[str, Any]], save_to: str | Path | None = None):
    """Weight mean/std and noisy-vs-clean mean weight over training, per weighted run."""
    import matplotlib.pyplot as plt

    weighted = [r for r in runs if any("weight_mean" in m for m in r["metrics"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for run in weighted:
        recs = [m for m in run["metrics"] if "weight_mean" in m]
        steps = [m["step"] for m in recs]
        axes[0].plot(steps, [m["weight_std"] for m in recs], label=f"{run['name']} std")
        if "weight_noisy" in recs[0]:
            ratio = [m["weight_noisy"] / m["weight_clean"] for m in recs if m.get("weight_clean")]
            axes[1].plot(steps[: len(ratio)], ratio, label=run["name"])
    axes[0].set_title("token-weight std")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_title("mean weight noisy / clean samples")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=100)
    return fig


def plot_pass_at_k(rows: list[dict[str, Any]], save_to: str | Path | None = None):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    labels = [f"{r['run']}\n{r['benchmark']} pass@{r['k']}" for r in rows]
    means = [r["pass@k"] for r in rows]
    err = [[m - r["ci95_low"] for m, r in zip(means, rows)], [r["ci95_high"] - m for m, r in zip(means, rows)]]
    ax.bar(range(len(rows)), means, yerr=err, capsize=3)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=6)
    ax.set_title("pass@k with 95% bootstrap CI over problems")
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=100)
    return fig


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table (no extra dependency)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
