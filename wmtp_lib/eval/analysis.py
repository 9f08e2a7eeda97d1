"""Tables (pandas DataFrames) and figures for `notebooks/evaluate.ipynb` and `notebooks/analysis.ipynb`.

Curves, token weights, pass@k with bootstrap CIs across runs; per-head metrics and self-speculative
decoding of one evaluation. Tables are DataFrames so they sort, filter and ``.to_csv()``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from wmtp_lib.config import read_yaml
from wmtp_lib.eval.bootstrap import bootstrap_ci

PASS_AT_K_COLUMNS = ["run", "benchmark", "k", "pass@k", "ci95_low", "ci95_high", "problems"]


def discover_runs(runs_dir: str | Path) -> list[str]:
    """Every run under ``runs_dir`` that has a metrics log."""
    root = Path(runs_dir)
    return sorted(p.name for p in root.iterdir() if (p / "metrics.jsonl").is_file()) if root.is_dir() else []


def load_run(runs_dir: str | Path, name: str) -> dict[str, Any]:
    """A run's metrics, summary (empty while unfinished), resolved config and evaluations."""
    d = Path(runs_dir) / name
    metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
    config = read_yaml(d / "config.yaml") if (d / "config.yaml").is_file() else {}
    evals = {p.stem: json.loads(p.read_text()) for p in sorted((d / "eval").glob("*.json"))} \
        if (d / "eval").is_dir() else {}
    return {"name": name, "metrics": metrics, "summary": summary, "config": config, "eval": evals}


RUNS_COLUMNS = ["run", "recipe", "steps", "of", "status", "final_loss", "commit", "w_noisy", "w_clean"]


def runs_table(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: recipe, steps trained (of those planned), finished or stopped, final loss, commit, and
    the noisy/clean mean token weights. An unfinished run (no summary yet) is read from its config and
    metrics, so an interrupted run shows its recipe and the step it reached."""
    rows = []
    for r in runs:
        summary, config = r["summary"], r.get("config", {})
        mtp = [m for m in r["metrics"] if m.get("stage") == "mtp"]
        last = mtp[-1] if mtp else {}
        planned = summary.get("steps") or config.get("train", {}).get("steps")
        rows.append({"run": r["name"], "recipe": summary.get("recipe") or config.get("recipe"),
                     "steps": last.get("step", 0), "of": planned,
                     "status": "finished" if summary else f"stopped at step {last.get('step', 0)}",
                     "final_loss": summary.get("final_loss", last.get("loss")),
                     "commit": short_commit(summary),
                     "w_noisy": summary.get("weight_noisy", last.get("weight_noisy")),
                     "w_clean": summary.get("weight_clean", last.get("weight_clean"))})
    return pd.DataFrame(rows, columns=RUNS_COLUMNS)


def short_commit(summary: dict[str, Any]) -> str | None:
    """``abc1234``, ``abc1234+diff 9f3e…`` when the code that ran differed from the commit, `` (mixed)`` after
    it when the run's sessions ran different code (the last session's is shown), None if unknown."""
    commit = summary.get("git_commit")
    if not commit:
        return None
    short = commit.split("-")[0][:7]
    if summary.get("code_dirty") or commit.endswith("-dirty"):
        diff = summary.get("code_diff_sha256")
        short = f"{short}+diff {diff[:8]}" if diff else f"{short}-dirty"
    # trained by more than one version of the code (resumed after an edit): the last one, marked
    return short + " (mixed)" if summary.get("code_mixed") else short


def pass_at_k_table(runs: list[dict[str, Any]], n_boot: int = 2000) -> pd.DataFrame:
    """One row per (run, benchmark, k): mean pass@k over problems with a 95% bootstrap interval."""
    rows = []
    for run in runs:
        for bench, res in run["eval"].items():
            # the summary also holds other means (synthetic: noise_imitation); only pass@k keys are rows
            for key in [key for key in res["summary"] if key.startswith("pass@")]:
                k = key.split("@")[1]
                values = [p["pass_at_k"][k] for p in res["per_problem"]]
                mean, lo, hi = bootstrap_ci(values, n_boot=n_boot)
                rows.append({"run": run["name"], "benchmark": bench, "k": int(k), "pass@k": mean,
                             "ci95_low": lo, "ci95_high": hi, "problems": len(values)})
    return pd.DataFrame(rows, columns=PASS_AT_K_COLUMNS)


def speculative_table(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (run, benchmark): accepted tokens per forward, wall-clock speed-up, prompts equal to greedy."""
    rows = []
    for run in runs:
        for bench, res in run["eval"].items():
            s = res.get("speculative")
            if s:
                rows.append({"run": run["name"], "benchmark": bench, "tokens_per_forward": s["tokens_per_forward"],
                             "speedup": s["speedup"], "identical": f"{s['identical_to_greedy']}/{s['prompts']}"})
    return pd.DataFrame(rows, columns=["run", "benchmark", "tokens_per_forward", "speedup", "identical"])


def plot_curves(runs: list[dict[str, Any]], save_to: str | Path | None = None):
    """Loss and per-head final loss across runs."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.legend(fontsize=8)
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
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=100)
    return fig


def plot_pass_at_k(table: pd.DataFrame, save_to: str | Path | None = None):
    """Bars of `pass_at_k_table` with their 95% bootstrap intervals."""
    import matplotlib.pyplot as plt

    # horizontal bars: run names stay readable (9 pt, unrotated) however many rows there are
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.4 * len(table)))
    labels = [f"{r.run}  {r.benchmark} pass@{r.k}" for r in table.itertuples()]
    means = table["pass@k"]
    err = [means - table["ci95_low"], table["ci95_high"] - means]
    ax.barh(range(len(table)), means, xerr=err, capsize=3)
    ax.set_yticks(range(len(table)), labels, fontsize=9)
    ax.invert_yaxis()  # first row on top, as in the table
    ax.set_xlim(0, 1)
    ax.set_xlabel("pass@k")
    ax.set_title("pass@k with 95% bootstrap CI over problems")
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=100)
    return fig


# ------------------------------------------------------------------ one evaluation (evaluate.ipynb)


def evaluation_pass_at_k(results: dict[str, Any]) -> pd.DataFrame:
    """`run_evaluation` results → one row per benchmark: problems, pass@k columns, sandbox level."""
    return pd.DataFrame([{"benchmark": b, "problems": r["problems"], **r["summary"], "sandbox": r["sandbox_isolation"]}
                         for b, r in results.items()])


def evaluation_head_metrics(results: dict[str, Any]) -> pd.DataFrame:
    """One row per (benchmark, head k): held-out loss and top-1 accuracy for token t+k+1."""
    rows = [{"benchmark": b, "head": h, "predicts": f"t+{h + 1}", "loss": loss, "top1": r["head_metrics"]["accuracy"][h]}
            for b, r in results.items() for h, loss in enumerate(r["head_metrics"]["loss"])]
    return pd.DataFrame(rows, columns=["benchmark", "head", "predicts", "loss", "top1"])


def evaluation_speculative(results: dict[str, Any]) -> pd.DataFrame:
    """One row per benchmark that ran the self-speculative decoding report."""
    return pd.DataFrame([{"benchmark": b, **r["speculative"]} for b, r in results.items() if r.get("speculative")])


def plot_head_metrics(results: dict[str, Any], save_to: str | Path | None = None):
    """Loss and top-1 accuracy of head k on held-out data, one line per benchmark."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    table = evaluation_head_metrics(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for bench, rows in table.groupby("benchmark", sort=False):
        axes[0].plot(rows["head"], rows["loss"], "o-", label=bench)
        axes[1].plot(rows["head"], rows["top1"], "o-", label=bench)
    axes[0].set_title("loss of head k")
    axes[1].set_title("top-1 accuracy of head k")
    for ax in axes:
        ax.set_xlabel("head k (predicts t+k+1)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.tight_layout()
    if save_to:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_to, dpi=100)
    return fig
