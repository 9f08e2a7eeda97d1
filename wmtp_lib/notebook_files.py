"""What JupyterLab saves into a WMTP checkout's ``notebooks/``: sources and metadata, never outputs.

Opening and running a notebook in JupyterLab must leave the committed file as it was (outputs belong to the
session, and to the executed copies papermill writes under ``runs/``). The README starts JupyterLab with
``--ContentsManager.pre_save_hook=wmtp_lib.notebook_files.pre_save_hook`` (no set-up step of its own; an
editable install cannot place a Jupyter config file in the environment). The committed notebooks carry the
metadata JupyterLab writes (kernelspec "Python 3 (ipykernel)", ``language_info`` but the kernel's Python
version, which the hook drops), so a save changes nothing else; tests/test_notebooks.py fails on committed
outputs or on metadata JupyterLab would rewrite, and a notebook never makes a run "dirty"
(`wmtp_lib.provenance.CODE_PATHS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def is_project_notebook(path: Path) -> bool:
    """A notebook in the ``notebooks/`` folder of a WMTP checkout (beside ``wmtp_lib/`` and ``params/``)."""
    folder = path.parent
    return folder.name == "notebooks" and (folder.parent / "wmtp_lib").is_dir() and (folder.parent / "params").is_dir()


def strip_outputs(nb: dict[str, Any]) -> dict[str, Any]:
    """Drop what running a notebook adds: outputs, execution counts, execution timings, saved widget state, the
    kernel's Python version."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cell.get("metadata", {}).pop("execution", None)
    nb.get("metadata", {}).pop("widgets", None)
    # the running kernel's Python version: the notebooks run on any supported Python, and a save from another
    # one would otherwise change the committed file
    nb.get("metadata", {}).get("language_info", {}).pop("version", None)
    return nb


def pre_save_hook(model: dict[str, Any], path: str, contents_manager: Any, **kwargs: Any) -> None:
    """Jupyter server pre-save hook: a project notebook is saved without outputs; any other file as it is."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    full = Path(contents_manager.root_dir) / path.lstrip("/")
    if is_project_notebook(full.resolve()):
        strip_outputs(model["content"])
