"""The embedded experiment's command, as a smoke run: 1 noise level x 2 recipes x 1 seed, a few steps."""

from __future__ import annotations

import csv
import importlib
import json

import pytest
from train_helpers import ROOT

pytestmark = pytest.mark.slow


def _experiment_module(monkeypatch):
    # importable by name (not only loaded from its file): --jobs workers are spawned processes that unpickle
    # `experiment.run_cell`, and spawn hands them this process's sys.path
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module("experiment")


def test_smoke_grid_writes_table_figure_and_token_weights(tmp_path, tiny_models, monkeypatch):
    experiment = _experiment_module(monkeypatch)
    out = tmp_path / "grid"
    assert experiment.main(["--out", str(out), "--smoke", "--models-dir", str(tiny_models), "--jobs", "2"]) == 0

    result = json.loads((out / "experiment.json").read_text())
    runs, agg = result["runs"], result["aggregate"]
    assert [(r["recipe"], r["noise"], r["seed"]) for r in runs] == [("mtp_baseline", 0.4, 0), ("rho1", 0.4, 0)]
    for a in agg:
        for metric in ("pass@1", "noise_imitation"):
            assert 0.0 <= a[metric + "_lo"] <= a[metric] <= a[metric + "_hi"] <= 1.0
        assert a["seeds"] == 1 and a["pass@1_seed_sd"] == 0.0
    base_agg, rho1_agg = agg  # the difference to the baseline is paired over the same problems
    assert rho1_agg["problems"] == 4 and rho1_agg["families"] == len(set(runs[0]["per_problem_family"]))
    assert len(runs[1]["weight_corrupt_final"]) == 4
    assert base_agg["d_pass@1"] is None and base_agg["d_noise_imitation"] is None
    for metric in ("pass@1", "noise_imitation"):
        assert rho1_agg["d_" + metric] == pytest.approx(rho1_agg[metric] - base_agg[metric])
        assert rho1_agg["d_" + metric + "_lo"] <= rho1_agg["d_" + metric] <= rho1_agg["d_" + metric + "_hi"]
    for r in runs:
        assert len(r["per_problem_pass@1"]) == len(r["per_problem_imitation"]) == 4
        assert r["n_samples"] == 2
    base, rho1 = runs
    # uniform weights log no statistics; rho1 logs every head's weight on each token group
    assert all(base[f"weight_{g}"] == [] for g in experiment.GROUPS)
    assert len(rho1["weight_corrupt"]) == len(rho1["weight_clean_slot"]) == 4
    assert all(w is not None and w > 0 for w in rho1["weight_corrupt_rest"])

    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("Grid 1 noise levels x 2 recipes x 1 seeds")
    assert "2 run(s) at once, 1 thread(s) each" in table[0] and "runs trained at commit(s) " in table[0]
    assert len([line for line in table if line.startswith("| `")]) == 2 + 2  # the grid, then per family
    assert any(line.startswith("Per family") for line in table)
    with open(out / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["recipe"] for r in rows] == ["mtp_baseline", "rho1"] and "weight_corrupt_head3" in rows[0]
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = [json.loads(x) for x in (out / "runs" / "rho1-noise0.4-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(m["weight_corrupt_rest"]) == 4 for m in metrics)

    # the same cell alone, one at a time, gives the same numbers: --jobs changes the wall time only (rho1's run,
    # the one with weight statistics; each run is its own process either way)
    serial = tmp_path / "serial"
    assert experiment.main(["--out", str(serial), "--smoke", "--models-dir", str(tiny_models), "--recipes", "rho1"]) == 0
    again = json.loads((serial / "experiment.json").read_text())["runs"]
    keys = ("final_loss", "per_problem_pass@1", "per_problem_imitation", "weight_corrupt", "heldout_head_loss")
    assert [[r[k] for k in keys] for r in again] == [[rho1[k] for k in keys]]


def test_interval_resamples_families_and_pairs_the_difference(monkeypatch):
    experiment = _experiment_module(monkeypatch)
    families = ["a", "a", "b", "b", "c", "c"]
    base = [[0.0, 0.0, 0.5, 0.5, 1.0, 1.0]] * 3  # families differ a lot, seeds not at all
    shifted = [[v + 0.1 for v in run] for run in base]
    mean, lo, hi = experiment.seeds_families_ci(base, families)
    assert mean == 0.5 and lo < 0.25 and hi > 0.75  # which families were tested matters
    d, d_lo, d_hi = experiment.seeds_families_ci(shifted, families, base)
    assert (d, d_lo, d_hi) == pytest.approx((0.1, 0.1, 0.1))  # paired: the family effect cancels
    noisy_seeds = [[v + e for v in run] for run, e in zip(shifted, (-0.05, 0.0, 0.05))]
    d, d_lo, d_hi = experiment.seeds_families_ci(noisy_seeds, families, base)
    assert d == pytest.approx(0.1) and d_lo < 0.07 and d_hi > 0.13  # the seeds' spread is in the interval
