"""Result tables are DataFrames, figures land beside the run, CI sizing and run lookup for the notebooks."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from wmtp_lib.eval import analysis
from wmtp_lib.config import (
    ConfigError,
    as_list,
    ci_sizing,
    default_runs_dir,
    project_path,
    resolve_config,
)
from wmtp_lib.eval.evaluation import pass_at_k
from wmtp_lib.runs import find_or_train_run


def _eval_result(per_problem_correct: list[int], n: int = 4) -> dict:
    problems = [{"id": i, "pass_at_k": {"1": pass_at_k(n, c, 1), "2": pass_at_k(n, c, 2)}}
                for i, c in enumerate(per_problem_correct)]
    summary = {f"pass@{k}": sum(p["pass_at_k"][str(k)] for p in problems) / len(problems) for k in (1, 2)}
    return {"problems": len(problems), "summary": summary, "per_problem": problems, "sandbox_isolation": "namespaces",
            "head_metrics": {"loss": [0.5, 0.7, 0.9], "accuracy": [0.8, 0.6, 0.4], "targets": [10.0, 9.0, 8.0]},
            "speculative": {"prompts": 3, "identical_to_greedy": 3, "tokens_per_forward": 2.5, "speedup": 1.2}}


def _runs():
    return [{"name": "a", "metrics": [], "summary": {"recipe": "rho1", "steps": 20, "final_loss": 1.5},
             "eval": {"synthetic": _eval_result([0, 4, 2])}},
            {"name": "b", "metrics": [], "summary": {"recipe": "mtp_baseline", "steps": 20, "final_loss": 1.2},
             "eval": {"synthetic": _eval_result([1, 1, 1])}}]


def test_pass_at_k_table_is_a_dataframe_with_exact_means_and_sorts(tmp_path):
    table = analysis.pass_at_k_table(_runs(), n_boot=200)
    assert isinstance(table, pd.DataFrame) and list(table.columns) == analysis.PASS_AT_K_COLUMNS
    row = table[(table.run == "a") & (table.k == 1)].iloc[0]
    assert row["pass@k"] == pytest.approx((0 + 1 + 0.5) / 3)  # c/n per problem for k=1
    assert row.ci95_low <= row["pass@k"] <= row.ci95_high
    ranked = table[table.k == 2].sort_values("pass@k", ascending=False)
    assert list(ranked.run) == ["a", "b"]  # a: (0 + 1 + 5/6)/3 = 0.61 > b: 0.5
    table.to_csv(tmp_path / "t.csv", index=False)
    assert pd.read_csv(tmp_path / "t.csv").shape == table.shape
    assert analysis.pass_at_k_table([{"name": "x", "eval": {}}]).empty  # no evaluations: empty, same columns


def test_run_and_speculative_tables():
    runs = analysis.runs_table(_runs())
    assert runs.sort_values("final_loss").run.tolist() == ["b", "a"]
    spec = analysis.speculative_table(_runs())
    assert spec.identical.tolist() == ["3/3", "3/3"] and spec.speedup.tolist() == [1.2, 1.2]


def test_evaluation_tables_and_head_plot_saved_beside_the_run(tmp_path):
    results = {"synthetic": _eval_result([0, 4, 2]), "mbpp": _eval_result([1, 1, 1])}
    heads = analysis.evaluation_head_metrics(results)
    assert len(heads) == 6 and heads.predicts.tolist()[:3] == ["t+1", "t+2", "t+3"]
    assert analysis.evaluation_pass_at_k(results).set_index("benchmark").loc["mbpp", "pass@1"] == pytest.approx(0.25)
    assert analysis.evaluation_speculative(results).tokens_per_forward.tolist() == [2.5, 2.5]
    fig = analysis.plot_head_metrics(results, save_to=tmp_path / "run" / "eval" / "head_metrics.png")
    assert (tmp_path / "run" / "eval" / "head_metrics.png").stat().st_size > 1000
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]


def test_scalar_notebook_parameter_is_a_one_element_list():
    assert as_list(1, "k") == [1] and as_list(0.5, "x") == [0.5]
    with pytest.raises(ConfigError, match="parameter k must be a list"):
        as_list(True, "k")
    with pytest.raises(ConfigError, match="parameter k must be a list"):
        as_list({"a": 1}, "k")


def test_ci_sizing_is_laid_over_the_environment_only_when_asked(monkeypatch):
    monkeypatch.delenv("WMTP_CI", raising=False)
    full = resolve_config("critic", "local")
    assert ci_sizing() is None and default_runs_dir() == project_path("runs")
    monkeypatch.setenv("WMTP_CI", "1")
    ci = resolve_config("critic", "local", {"train.log_every": 2})
    assert ci["train"]["steps"] == 20 < full["train"]["steps"] and ci["critic"]["stage1_max_steps"] == 10
    assert ci["train"]["log_every"] == 2  # overrides still win
    assert ci["paths"]["runs_dir"] == "runs/ci" and default_runs_dir() == project_path("runs/ci")
    assert ci["run_name"] == "critic-local-seed0" and ci["models"] == full["models"]
    monkeypatch.setenv("WMTP_CI", "0")
    assert ci_sizing() is None


def test_find_or_train_run_finds_runs_and_refuses_unknown_names(tmp_path):
    final = tmp_path / "rho1-local-seed3" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text(json.dumps({}))
    assert find_or_train_run("rho1-local-seed3", tmp_path) == tmp_path / "rho1-local-seed3"
    assert find_or_train_run(str(final), tmp_path) == final  # a model directory is used as is
    with pytest.raises(FileNotFoundError, match="my-run.*train it first: papermill notebooks/train.ipynb"):
        find_or_train_run("my-run", tmp_path)


def test_pass_at_k_table_reads_only_pass_at_k_keys_of_a_synthetic_summary():
    """evaluate.ipynb's synthetic summary also holds noise_imitation (issue 22: analysis crashed on it)."""
    runs = _runs()
    for run in runs:
        run["eval"]["synthetic"]["summary"]["noise_imitation"] = 0.25
    table = analysis.pass_at_k_table(runs, n_boot=50)
    assert sorted(set(table.k)) == [1, 2] and len(table) == 4


def test_runs_table_shows_an_interrupted_run_from_its_config_and_metrics(tmp_path):
    run = tmp_path / "rho1-local-seed0-steps50"
    run.mkdir()
    (run / "config.yaml").write_text("recipe: rho1\ntrain:\n  steps: 50\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"stage": "mtp", "step": s, "loss": 3.0 - s / 100}) + "\n"
                                               for s in (5, 10, 15)))
    done = tmp_path / "done"
    done.mkdir()
    (done / "metrics.jsonl").write_text(json.dumps({"stage": "mtp", "step": 20, "loss": 1.5}) + "\n")
    (done / "summary.json").write_text(json.dumps({"recipe": "mtp_baseline", "steps": 20, "final_loss": 1.5,
                                                   "git_commit": "a" * 40 + "-dirty", "code_dirty": True,
                                                   "code_diff_sha256": "9f3e" * 16}))
    table = analysis.runs_table([analysis.load_run(tmp_path, n) for n in analysis.discover_runs(tmp_path)])
    stopped = table.set_index("run").loc["rho1-local-seed0-steps50"]
    assert (stopped.recipe, stopped.steps, stopped.of, stopped.status) == ("rho1", 15, 50, "stopped at step 15")
    assert stopped.final_loss == pytest.approx(2.85)
    finished = table.set_index("run").loc["done"]
    assert (finished.status, finished.commit) == ("finished", "aaaaaaa+diff 9f3e9f3e")


def test_figures_are_readable(tmp_path):
    """Integer ticks on head axes, pass@k labels at 9 pt unrotated."""
    results = {"synthetic": _eval_result([0, 4, 2])}
    fig = analysis.plot_head_metrics(results)
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    fig = analysis.plot_pass_at_k(analysis.pass_at_k_table(_runs(), n_boot=50))
    labels = fig.axes[0].get_yticklabels()
    assert len(labels) == 4 and all(lb.get_fontsize() >= 9 and lb.get_rotation() == 0 for lb in labels)
