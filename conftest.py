"""pytest for the whole project. `pytest` runs the notebooks through tests/test_notebooks.py (workflow order,
alone, and in JupyterLab); `pytest --nbmake notebooks/` executes each notebook alone, as configured here.

Notebooks run CI-sized: each nbmake item runs with ``WMTP_CI=1`` (params/ci.yaml: few steps, runs in
``runs/ci``) unless the caller set ``WMTP_CI`` itself, and counts as ``slow`` so ``pytest -m "not slow"``
stays the quick loop. ``runs/ci`` is emptied when a session starts, so a CI run never resumes a stale one.
"""

from __future__ import annotations

import os
import shutil

# Every process of the test suite (pytest's workers and what they start: training ranks, notebook kernels) exits
# without the interpreter's last garbage collections, ~2 s each (`wmtp_lib.freeze_heap_at_exit`): the suite's code
# closes what it writes. Set before anything imports the package.
os.environ["WMTP_FREEZE_AT_EXIT"] = "1"

import pytest  # noqa: E402


def _is_notebook(item: pytest.Item) -> bool:
    return item.path.suffix == ".ipynb"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    notebooks = [item for item in items if _is_notebook(item)]
    for item in notebooks:
        item.add_marker(pytest.mark.slow)
    if notebooks and not config.option.collectonly and os.environ.get("WMTP_CI", "1") != "0":
        from wmtp_lib.config import default_runs_dir

        caller = os.environ.get("WMTP_CI")
        os.environ["WMTP_CI"] = caller or "1"
        try:
            ci_runs = default_runs_dir()
        finally:
            if caller is None:
                del os.environ["WMTP_CI"]
        # runs/ci is CI scratch (params/ci.yaml); never remove anything else
        if ci_runs.name == "ci" and ci_runs.is_dir():
            shutil.rmtree(ci_runs)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Only notebook items see ``WMTP_CI=1``: unit tests resolve the real environments."""
    if not _is_notebook(item) or "WMTP_CI" in os.environ:
        yield
        return
    os.environ["WMTP_CI"] = "1"
    try:
        yield
    finally:
        del os.environ["WMTP_CI"]
