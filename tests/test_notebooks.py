"""Notebooks through papermill where a test checks what they write or how they fail.

Every notebook is also executed by nbmake as part of `pytest` (conftest.py, CI-sized), and the README's
commands (stage, train every recipe, evaluate, analysis) run verbatim in tests/test_readme.py: the
stage → train → evaluate → analysis pipeline is checked there, not run a third time here.
"""

from __future__ import annotations

import json
import os
import sys

import nbformat
import papermill as pm
import pytest
from jupyter_client.kernelspec import KernelSpecManager

from train_helpers import ROOT

pytestmark = pytest.mark.slow
NOTEBOOKS = ("preflight", "stage_models", "train", "evaluate", "analysis")


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernel spec that runs this interpreter, so the notebooks import the wmtp_lib under test."""
    kdir = tmp_path_factory.mktemp("kernels")
    spec = kdir / "kernels" / "wmtp-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "wmtp-test", "language": "python"}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(kdir) + (os.pathsep + old if old else "")
    assert "wmtp-test" in KernelSpecManager().find_kernel_specs()
    yield "wmtp-test"
    if old is None:
        os.environ.pop("JUPYTER_PATH")
    else:
        os.environ["JUPYTER_PATH"] = old


def _run(name, out, kernel_name, **params):
    return pm.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(out), parameters=params,
                               kernel_name=kernel_name, cwd=str(out.parent), progress_bar=False)


def _outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            text.append(o.get("text", "") or json.dumps(o.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def test_each_notebook_has_one_parameters_cell_and_no_outputs():
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), name


def test_preflight_notebook_reports_and_writes_json(tmp_path, kernel_name):
    nb = _run("preflight", tmp_path / "preflight.ipynb", kernel_name, output=str(tmp_path / "preflight.json"))
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert {r["recipe"] for r in report["recipes"]} == {"mtp_baseline", "rho1", "rho1_tokenskip", "critic"}
    assert "torch" in _outputs(nb)
    for r in report["recipes"]:
        assert r["memory_per_device"]["total_gib"] is not None


def test_train_notebook_fails_on_a_failed_run(tmp_path, kernel_name):
    with pytest.raises(pm.PapermillExecutionError, match="unknown key"):
        _run("train", tmp_path / "bad.ipynb", kernel_name, recipe="rho1", overrides={"train.nope": 1})


def test_train_notebook_fails_when_training_fails(tmp_path, kernel_name):
    overrides = {"paths.models_dir": str(tmp_path / "no_models"), "paths.runs_dir": str(tmp_path / "runs"),
                 "storage.stage_tiny_if_missing": False}
    with pytest.raises(pm.PapermillExecutionError, match="training exited with code"):
        _run("train", tmp_path / "fail.ipynb", kernel_name, recipe="mtp_baseline", overrides=overrides)
    log = (tmp_path / "runs" / "mtp_baseline-local-seed0" / "train.log").read_text()
    assert "not staged at" in log
