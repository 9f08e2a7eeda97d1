"""Finding the run that evaluate.ipynb and analysis.ipynb work on, training the default one when missing.

On a fresh checkout (or in CI) there are no runs yet; rather than fail, the notebooks train the run they
were asked for when its name is a local default (``<recipe>-local-seed<N>``: tiny models, CPU) and say so.
Any other missing run is an error that says how to train it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from wmtp_lib.config import RECIPES, ci_active, default_runs_dir, project_path

LOCAL_RUN = re.compile(rf"({'|'.join(RECIPES)})-local-seed(\d+)")


def run_is_finished(runs_dir: Path, run: str) -> bool:
    return (runs_dir / run / "final" / "config.json").is_file()


def find_or_train_run(run: str, runs_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The directory of ``run`` under ``runs_dir`` (default: `default_runs_dir`), trained now if it is missing.

    ``run`` may also be a model directory (returned as is). Only local default names are trained here.
    """
    from wmtp_lib.launch import ensure_tiny_models, launch_training, prepare_run

    root = project_path(runs_dir) if runs_dir else default_runs_dir()
    if run_is_finished(root, run):
        return root / run
    if (Path(run) / "config.json").is_file():
        return Path(run)
    match = LOCAL_RUN.fullmatch(run)
    if match is None:
        raise FileNotFoundError(f"run {run!r} is not finished under {root} (no final/) and is not a model directory; "
                                f"train it first: papermill notebooks/train.ipynb runs/train.ipynb -p run_name {run} ...")
    recipe, seed = match.group(1), int(match.group(2))
    log(f"run {run} is not under {root} yet: training it now (recipe {recipe}, local environment"
        f"{', CI-sized by WMTP_CI=1' if ci_active() else ''})")
    cfg, config_path = prepare_run(recipe, "local", run, {"seed": seed, "paths.runs_dir": str(root)})
    ensure_tiny_models(cfg, log=log)
    return launch_training(cfg, config_path)


def describe_run(run_dir: str | Path) -> str:
    """One line saying which run a notebook reads: name, recipe, steps, final loss, commit (and diff hash).

    ``run_dir`` may also be a plain model directory (no run around it), which is said instead.
    """
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return f"reading the model directory {run_dir} (not a run: no summary.json, so no recipe, steps or commit)"
    s = json.loads(summary_path.read_text())
    loss = "n/a" if s.get("final_loss") is None else f"{s['final_loss']:.4f}"
    commit = s.get("git_commit")
    if commit is None:
        code = "commit unknown (not a git checkout)"
    elif s.get("code_dirty") or commit.endswith("-dirty"):
        diff = s.get("code_diff_sha256")
        code = f"commit {commit.split('-')[0][:10]} with uncommitted code changes" + (f" (diff {diff[:12]})" if diff else "")
    else:
        code = f"commit {commit[:10]}"
    if s.get("code_mixed"):
        from wmtp_lib.provenance import code_versions

        code += (f" (its sessions ran {len(code_versions(s.get('code_sessions', [])))} versions of the code: "
                 f"{run_dir / 'provenance.jsonl'})")
    return (f"reading run {run_dir.name} ({run_dir}): recipe {s.get('recipe')}, {s.get('steps')} steps, "
            f"final loss {loss}, {code}")
