"""The README's commands run as written, in order, in a fresh copy of the project (issue: the first command works).

Every fenced ``bash`` block of README.md runs, unless the line just before it is
``<!-- readme-test: skip (why) -->`` (the set-up block, which `.ci/run` itself executes; a server).
``WMTP_CI=1`` sizes the runs (params/ci.yaml), and the commands get the Docker image's ``ENV`` lines, so the
executed notebooks show what they show in the image: their figures (``image/png``) and step lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import nbformat
import pytest
from train_helpers import ROOT

SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b")
BLOCK = re.compile(r"^```bash\n(.*?)^```", flags=re.M | re.S)
SECRET = "never-printed-secret-value"


def readme_blocks(text: str) -> list[tuple[str, bool]]:
    """Every ```bash block of a README with whether it runs (not marked skip on the line before)."""
    out = []
    for m in BLOCK.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((m.group(1), not SKIP.search(before)))
    return out


def dockerfile_env(text: str) -> dict[str, str]:
    """The ``ENV k=v`` settings of a Dockerfile (line continuations joined)."""
    env = {}
    joined = text.replace("\\\n", " ")
    for line in joined.splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S+)", line[4:]):
                env[key] = value
    return env


def test_readme_blocks_are_found_and_marked():
    blocks = readme_blocks((ROOT / "README.md").read_text())
    ran = [b for b, run in blocks if run]
    skipped = [b for b, run in blocks if not run]
    assert any("papermill notebooks/train.ipynb runs/train-rho1.ipynb -p recipe rho1" in b for b in ran)
    assert any(re.search(r"^pytest\b", b, flags=re.M) for b in skipped), "the set-up block is what .ci/run runs"
    assert readme_blocks("<!-- readme-test: skip (x) -->\n```bash\nls\n```\n\n```bash\npwd\n```\n") == [
        ("ls\n", False), ("pwd\n", True)]
    assert dockerfile_env("ENV A=1 \\\n    B=/tmp/x\nRUN x\nENV C=2\n") == {"A": "1", "B": "/tmp/x", "C": "2"}


def _copy_project(dst):
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)


def _png_count(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _text(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            parts.append(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"]))
            parts.append(json.dumps(o.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.slow
def test_readme_commands_run_verbatim_on_a_fresh_copy(tmp_path):
    work = tmp_path / "wmtp"
    _copy_project(work)
    assert (work / "runs").is_dir(), "a fresh clone must have runs/ (runs/.gitkeep) for papermill's outputs"
    # The project's own tiny-model cache (models/, git-ignored) is shared with the notebooks nbmake runs:
    # whichever runs first builds it (~25 s), the other finds it staged.
    (ROOT / "models").mkdir(exist_ok=True)
    os.symlink(ROOT / "models", work / "models")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env.update(dockerfile_env((work / "docker" / "Dockerfile").read_text()))
    env.update(WMTP_CI="1", AWS_SECRET_ACCESS_KEY=SECRET,
               PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"],
               PYTHONPATH=str(work) + os.pathsep + env.get("PYTHONPATH", ""))
    blocks = [b for b, run in readme_blocks((work / "README.md").read_text()) if run]
    for block in blocks:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"README block failed:\n{block}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

    check_outputs(work)


def check_outputs(work) -> None:
    """What the README's commands must leave in ``work``: figures, step lines, finished runs, no secret."""
    executed = {p.name: nbformat.read(p, as_version=4) for p in (work / "runs").glob("*.ipynb")}
    assert "train-rho1.ipynb" in executed
    for name, nb in executed.items():
        text = _text(nb)
        assert SECRET not in text, name
        source = nb.metadata["papermill"]["input_path"]
        if source.endswith(("train.ipynb", "evaluate.ipynb", "analysis.ipynb")):
            assert _png_count(nb) >= 1, f"{name}: no figure rendered with the image's environment"
        if source.endswith("train.ipynb"):
            steps = re.findall(r"step (\d+)/(\d+) loss", text)
            if steps:
                assert steps[-1][0] == steps[-1][1], f"{name}: the last step line is not the last step"
            else:  # a run that is already complete resumes at its last step and trains nothing
                resumed = re.search(r"resumed from \S+ \(stage mtp, step (\d+)\)", text)
                assert resumed and int(resumed.group(1)) == 20, f"{name}: step lines missing from the saved notebook"

    runs = work / "runs" / "ci"
    finished = [d for d in runs.iterdir() if (d / "summary.json").is_file()]
    assert finished, "no run finished under runs/ci"
    for run in finished:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 20 and run.name.startswith(summary["recipe"]), run.name
        assert (run / "final" / "model.safetensors").is_file() and (run / "curves.png").is_file()
        if (run / "eval").is_dir():
            assert (run / "eval" / "head_metrics.png").is_file()
