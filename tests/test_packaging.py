"""environment.yml and pyproject.toml list the same packages; the README shows the contract commands."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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


def test_a_process_that_imports_the_package_freezes_its_heap_at_exit():
    """The exit hook runs: a hook registered before the import runs after it (last in, first out) and sees
    the heap frozen, so the interpreter's final collections have nothing to walk."""
    import subprocess
    import sys

    script = ("import atexit, gc\n"
              "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 1000))\n"
              "import wmtp_lib\n"
              "print('frozen before exit:', gc.get_freeze_count() > 0)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["frozen before exit: False", "frozen at exit: True"], out
