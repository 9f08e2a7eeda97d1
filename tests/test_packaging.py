"""environment.yml and pyproject.toml list the same packages; the README shows the contract commands."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _normalise(req: str) -> str:
    return req.replace(" ", "").lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = [r for r in pip_section if not r.startswith("-e")]
    assert sorted(map(_normalise, listed)) == sorted(map(_normalise, wanted)), (
        "environment.yml pip section and pyproject.toml dependencies differ: "
        f"only in yml {sorted(set(map(_name, listed)) - set(map(_name, wanted)))}, "
        f"only in pyproject {sorted(set(map(_name, wanted)) - set(map(_name, listed)))}"
    )


def test_torch_floor_is_2_6():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.6" in deps


def _setup_block() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Set up and test"):]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()


def test_readme_shows_setup_and_test_commands():
    block = _setup_block()
    assert 'uv pip install -e ".[dev]"' in block and block[-1] == "pytest"
    assert "papermill notebooks/train.ipynb" in (ROOT / "README.md").read_text()


def test_ci_runs_readme_commands():
    """`.ci/run` executes the README's set-up block, line for line (quieter, through `python -m`)."""
    def plain(line: str) -> str:
        return re.sub(r"^python -m ", "", line.split("  #")[0].replace("--quiet ", "").strip())

    ci = {plain(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()}
    missing = [line for line in _setup_block() if plain(line) not in ci]
    assert not missing, f".ci/run does not run the README's set-up lines {missing}"




def _exit_state(script: str, **env: str) -> list[str]:
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != "WMTP_FREEZE_AT_EXIT"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**environ, **env}).stdout.split("\n")[:-1]


def test_the_heap_is_frozen_at_exit_only_where_asked(tmp_path):
    """Under WMTP_FREEZE_AT_EXIT=1 a hook registered before the import runs after the package's (last in, first
    out) and sees the heap frozen; without it nothing is frozen, and a file a script leaves open in its globals
    (a reference cycle, finalized only by those last collections) still gets its data."""
    probe = ("import atexit, gc\n"
             "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 1000))\n"
             "import wmtp_lib\n"
             "print('frozen before exit:', gc.get_freeze_count() > 0)\n")
    assert _exit_state(probe, WMTP_FREEZE_AT_EXIT="1") == ["frozen before exit: False", "frozen at exit: True"]
    assert _exit_state(probe) == ["frozen before exit: False", "frozen at exit: False"]
    log = tmp_path / "metrics.jsonl"
    # the function makes the globals a cycle (globals -> function -> globals), as in any script
    _exit_state(f"import wmtp_lib\nlog = open({str(log)!r}, 'a')\ndef write(s): log.write(s)\nwrite('step 1')\n")
    assert log.read_text() == "step 1"


def test_the_training_entry_freezes_its_heap_after_training_returns(monkeypatch):
    import atexit
    import gc
    import runpy

    from wmtp_lib.train import loop

    events = []
    monkeypatch.setattr(loop, "main", lambda: events.append("trained") or 0)
    monkeypatch.setattr(atexit, "register", lambda f, *args: events.append(f))
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("wmtp_lib.train", run_name="__main__")
    assert stop.value.code == 0 and events == ["trained", gc.freeze]
