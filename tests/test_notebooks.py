"""The notebooks as a researcher uses them: committed clean, run in workflow order, run alone, and in JupyterLab.

- The committed notebooks carry no outputs and exactly the metadata JupyterLab writes, so opening one changes
  nothing (and a notebook never makes a run "dirty": wmtp_lib/provenance.py `CODE_PATHS`).
- `test_notebooks_in_workflow_order`: preflight → stage_models → train → evaluate → analysis with their default
  parameters on one shared CI-sized runs folder (``runs/ci``, params/ci.yaml), as a researcher runs them.
- `test_evaluate_and_analysis_each_alone`: the two that read earlier work, each in an empty runs folder (they
  train the default run they need). preflight, stage_models and train run first in the workflow anyway.
- `test_train_notebook_in_jupyterlab`: headless Chromium drives JupyterLab (skipped where no browser is installed).

These replace nbmake's pass over the notebooks (alphabetical: analysis before evaluate); `pytest --nbmake
notebooks/` still runs each notebook alone if wanted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import nbformat
import papermill as pm
import pytest
from ipykernel.ipkernel import IPythonKernel
from jupyter_client.kernelspec import KernelSpecManager
from train_helpers import ROOT

from wmtp_lib.config import defaults, flat_config
from wmtp_lib import launch
from wmtp_lib.notebook_files import pre_save_hook
from wmtp_lib.provenance import SessionLog, code_provenance

WORKFLOW = ("preflight", "stage_models", "train", "evaluate", "analysis")
CI_RUNS = ROOT / "runs" / "ci"  # params/ci.yaml paths.runs_dir: CI scratch
DEFAULT_RUN = "rho1-local-seed0"
# What JupyterLab writes into a notebook it opens with the project's kernel (ipykernel's kernel_info reply)
JUPYTERLAB_KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


# ------------------------------------------------------------------ committed notebooks


def test_committed_notebooks_have_one_parameters_cell_no_outputs_and_jupyterlab_metadata():
    expected_language = dict(IPythonKernel.language_info)
    for name in WORKFLOW:
        path = ROOT / "notebooks" / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        ran = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not ran, (f"{path} has outputs in cells {ran}: clear them (Edit → Clear Outputs of All Cells) and "
                         "save before committing")
        assert nb.metadata.get("kernelspec") == JUPYTERLAB_KERNELSPEC, f"{name}: JupyterLab would rewrite the kernelspec"
        language = dict(nb.metadata.get("language_info", {}))
        # the kernel's own Python version is dropped on save (pre_save_hook); the rest JupyterLab writes must match
        assert "version" not in language, f"{name}: a Python version a save from another Python would rewrite"
        expected_language.pop("version", None)
        assert language == expected_language, f"{name}: JupyterLab would rewrite language_info"
        assert set(nb.metadata) == {"kernelspec", "language_info"}, f"{name}: extra notebook metadata"
        # the Jupyter server saves through nbformat: a file in any other layout would be rewritten on save
        assert path.read_text() == nbformat.writes(nb) + "\n", f"{name}: not in the layout a save writes"


def test_pre_save_hook_strips_outputs_of_project_notebooks_only(tmp_path):
    checkout = tmp_path / "clone"
    for folder in ("notebooks", "wmtp_lib", "params", "elsewhere"):
        (checkout / folder).mkdir(parents=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1", execution_count=3, outputs=[
        nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=3)])])
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    nb.metadata["language_info"] = {"name": "python", "version": "3.12.4"}  # the kernel's Python

    class Contents:
        root_dir = str(checkout)

    def save(path: str) -> dict:
        model = {"type": "notebook", "content": json.loads(nbformat.writes(nb))}
        pre_save_hook(model=model, path=path, contents_manager=Contents())
        return model["content"]

    saved = save("notebooks/train.ipynb")
    assert saved["cells"][0]["outputs"] == [] and saved["cells"][0]["execution_count"] is None
    assert "widgets" not in saved["metadata"] and "".join(saved["cells"][0]["source"]) == "1 + 1"
    assert saved["metadata"]["language_info"] == {"name": "python"}, "a save from any Python writes the same file"
    kept = save("elsewhere/mine.ipynb")  # a researcher's own notebook keeps its outputs
    assert kept["cells"][0]["outputs"] and kept["cells"][0]["execution_count"] == 3


# ------------------------------------------------------------------ provenance


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def test_code_provenance_ignores_notebooks_and_hashes_the_code_diff(tmp_path):
    repo = tmp_path / "repo"
    (repo / "wmtp_lib").mkdir(parents=True)
    (repo / "notebooks").mkdir()
    (repo / "wmtp_lib" / "a.py").write_text("x = 1\n")
    (repo / "wmtp_lib" / "b.py").write_text("z = 1\n")
    (repo / "notebooks" / "train.ipynb").write_text("{}\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "init")
    commit = _git(repo, "rev-parse", "HEAD").strip()

    clean = code_provenance(repo)
    assert {k: clean[k] for k in ("git_commit", "code_dirty", "code_diff_sha256")} == \
        {"git_commit": commit, "code_dirty": False, "code_diff_sha256": None}
    (repo / "README.md").write_text("docs\n")  # a commit that leaves the code alone: same code tree
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "docs")
    commit = _git(repo, "rev-parse", "HEAD").strip()
    assert code_provenance(repo)["code_tree_sha256"] == clean["code_tree_sha256"]
    assert code_provenance(repo)["git_commit"] == commit
    (repo / "notebooks" / "train.ipynb").write_text('{"outputs": "an opened, executed, autosaved notebook"}\n')
    (repo / "runs").mkdir()
    (repo / "runs" / "out.ipynb").write_text("{}\n")
    assert code_provenance(repo)["code_dirty"] is False, "notebooks and runs never make a run dirty"

    (repo / "wmtp_lib" / "a.py").write_text("x = 2\n")
    first = code_provenance(repo)
    assert first["git_commit"] == commit + "-dirty" and first["code_dirty"] is True
    assert re.fullmatch(r"[0-9a-f]{64}", first["code_diff_sha256"])
    assert code_provenance(repo) == first, "the same code gives the same hash"
    # the user's git configuration changes `git diff`'s text, never the hash
    for key, value in (("diff.noprefix", "true"), ("color.ui", "always"), ("color.diff", "always"),
                       ("diff.context", "9"), ("status.relativePaths", "true"), ("core.quotepath", "false")):
        _git(repo, "config", key, value)
    assert code_provenance(repo) == first
    (repo / "wmtp_lib" / "a.py").write_text("x = 3\n")
    assert code_provenance(repo)["code_diff_sha256"] != first["code_diff_sha256"], "other content, other hash"
    (repo / "wmtp_lib" / "a.py").write_text("x = 2\n")
    (repo / "wmtp_lib" / "new.py").write_text("y = 1\n")  # an untracked module runs too
    with_new = code_provenance(repo)
    assert with_new["code_dirty"] and with_new["code_diff_sha256"] != first["code_diff_sha256"]
    (repo / "wmtp_lib" / "new.py").unlink()
    (repo / "wmtp_lib" / "b.py").unlink()  # a deleted module
    deleted = code_provenance(repo)
    assert deleted["code_dirty"] and deleted["code_diff_sha256"] not in (first["code_diff_sha256"],
                                                                         with_new["code_diff_sha256"])
    (repo / "wmtp_lib" / os.fsdecode(b"\xff.py")).write_text("w = 1\n")  # a name that is not UTF-8
    assert code_provenance(repo)["code_diff_sha256"] != deleted["code_diff_sha256"]
    assert code_provenance(repo)["code_tree_sha256"] == clean["code_tree_sha256"], "committed code unchanged"


def test_code_provenance_of_a_project_inside_a_larger_repository(tmp_path):
    outer = tmp_path / "outer"
    project = outer / "projects" / "wmtp"
    (project / "wmtp_lib").mkdir(parents=True)
    (project / "wmtp_lib" / "a.py").write_text("x = 1\n")
    (outer / "other.txt").write_text("not the project\n")
    _git(outer, "init", "-q")
    _git(outer, "add", ".")
    _git(outer, "commit", "-qm", "init")
    clean = code_provenance(project)
    assert clean["code_dirty"] is False
    (outer / "other.txt").write_text("changed outside the project\n")
    assert code_provenance(project)["code_dirty"] is False
    (project / "wmtp_lib" / "a.py").write_text("x = 2\n")
    dirty = code_provenance(project)
    (project / "wmtp_lib" / "a.py").write_text("x = 3\n")
    assert dirty["code_dirty"] and code_provenance(project)["code_diff_sha256"] != dirty["code_diff_sha256"], \
        "the changed file is read where it is (paths relative to the repository's top)"


def test_session_log_rolls_back_with_the_run_and_says_when_code_was_mixed(tmp_path):
    """Sessions are kept while their steps survive a resume (the metrics' rule); the summary names the
    finishing session's code and flags a run whose weights went through more than one version."""
    a = {"git_commit": "a" * 40, "code_dirty": False, "code_diff_sha256": None, "code_tree_sha256": "t" * 64}
    b = {"git_commit": "a" * 40 + "-dirty", "code_dirty": True, "code_diff_sha256": "d" * 64,
         "code_tree_sha256": "t" * 64}
    SessionLog(tmp_path, a).start("value", 0)  # the critic: stage 1 from scratch
    SessionLog(tmp_path, a).start("mtp", 40)   # resumed in stage 2
    SessionLog(tmp_path, b).start("mtp", 60)   # interrupted before its first checkpoint...
    log = SessionLog(tmp_path, a)
    log.start("mtp", 60)                       # ...so the next resume, from 60 again, replaces it
    assert [(s["stage"], s["step"]) for s in log.sessions()] == [("value", 0), ("mtp", 40), ("mtp", 60)]
    assert log.summary()["code_mixed"] is False and log.summary()["git_commit"] == "a" * 40
    log = SessionLog(tmp_path, b)
    log.start("mtp", 80)
    summary = log.summary()
    assert summary["code_mixed"] is True and summary["code_diff_sha256"] == "d" * 64
    assert [s["step"] for s in summary["code_sessions"]] == [0, 40, 60, 80]
    SessionLog(tmp_path, a).start("value", 0)  # a fresh start forgets every earlier session
    assert [s["step"] for s in SessionLog(tmp_path, a).sessions()] == [0]
    docs_commit = {**a, "git_commit": "c" * 40}  # resumed after a commit that left the code alone
    log = SessionLog(tmp_path, docs_commit)
    log.start("mtp", 10)
    assert log.summary()["code_mixed"] is False and log.summary()["git_commit"] == "c" * 40


# ------------------------------------------------------------------ run names, interrupt, resume rate


def test_overrides_never_take_the_default_run_name(tmp_path):
    lines: list[str] = []
    where = {"paths.runs_dir": str(tmp_path / "runs")}
    cfg, _ = launch.prepare_run("rho1", "local", None, {**where, "train.steps": 50}, log=lines.append)
    assert cfg["run_name"] == "rho1-local-seed0-steps50" and cfg["train"]["steps"] == 50
    assert "named rho1-local-seed0-steps50, not rho1-local-seed0" in lines[-1]
    cfg, _ = launch.prepare_run("rho1", "local", None, where, log=lines.append)
    assert cfg["run_name"] == DEFAULT_RUN, "where files go does not change the run"
    cfg, _ = launch.prepare_run("rho1", "local", "mine", {**where, "train.steps": 50}, log=lines.append)
    assert cfg["run_name"] == "mine"
    long = {f"weights.{k}": v for k, v in {"temperature": 0.5, "max_weight": 2.5, "keep_ratio": 0.6,
                                           "standardize": False}.items()}
    assert re.fullmatch(r"ov[0-9a-f]{8}", launch.overrides_suffix(long))
    # what tells two values apart stays in the name: sign, list items, a hyphen in a model id
    for a, b in (({"weights.temperature": 0.5}, {"weights.temperature": -0.5}),
                 ({"train.head_weights": [1, 0.5, 0.25]}, {"train.head_weights": [10.5, 0.25]}),
                 ({"models.base": "tiny-mtp"}, {"models.base": "tinymtp"})):
        assert launch.overrides_suffix(a) != launch.overrides_suffix(b), (a, b)
    assert launch.overrides_suffix({"weights.temperature": -0.5}) == "temperature-0.5"
    assert re.fullmatch(r"ov[0-9a-f]{8}", launch.overrides_suffix({"models.base": "org/model"}))
    leaves = [k.rsplit(".", 1)[-1] for k in flat_config(defaults())]
    assert len(leaves) == len(set(leaves)), "a key's last part names it in a run name: keep them unique"
    # the notebook's num_processes sets the global batch: recorded in the config, and another run's name
    cfg, _ = launch.prepare_run("rho1", "local", None, where, log=lines.append, num_processes=1)
    assert cfg["run_name"] == DEFAULT_RUN, "the environment's own count is the default run"
    # two processes on a CPU take the 2-process accelerate file: how they start is not in the name, their count is
    two = {**where, "launch.accelerate_config": "params/accelerate/cpu_2proc.yaml"}
    cfg, path = launch.prepare_run("rho1", "local", None, two, log=lines.append, num_processes=2)
    assert cfg["run_name"] == "rho1-local-seed0-num_processes2" and cfg["launch"]["num_processes"] == 2
    assert "num_processes: 2" in path.read_text()


FAKE_TRAINING = textwrap.dedent("""
    import sys, time
    if sys.argv[1] == "fresh":  # a fresh run: 3 s of model loading, then 20 steps in about 2 s
        time.sleep(3)
        first, every, pause = 5, 5, 0.1
    else:
        print("resumed from checkpoints/mtp-0000100 (stage mtp, step 100)", flush=True)
        first, every, pause = 105, 5, 0.25
    for step in range(first, 201 if sys.argv[1] != "fresh" else 101, every):
        time.sleep(pause)
        print(f"step {step}/200 loss 1.0000 lr 1.00e-04 gnorm 1.0000", flush=True)
        if step == 120 and sys.argv[1] == "hang":
            # as torch elastic starts a worker: in a session of its own, out of the launcher's process group
            import subprocess
            worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
            print(f"worker pid {worker.pid}", flush=True)
            time.sleep(600)
""")


def _fake_launch(monkeypatch, tmp_path, mode: str):
    cfg = {"paths": {"runs_dir": str(tmp_path / "runs")}, "run_name": "fake", "train": {"steps": 200},
           "launch": {"stop_grace_s": 10}}
    monkeypatch.setattr(launch, "launch_command", lambda *a: [sys.executable, "-c", FAKE_TRAINING, mode])
    return cfg


def _last_bar_rate(err: str) -> tuple[str, float]:
    bar = err.replace("\r", "\n").strip().splitlines()[-1]
    match = re.search(r"(\d+)/200 \[[^,]+, *([\d.]+) ?(step/s|s/step)", bar)
    assert match and match.group(3) == "step/s", bar
    return bar, float(match.group(2))


def test_bar_rate_counts_only_this_sessions_training_steps(tmp_path, monkeypatch, capsys):
    """The bar's rate is training speed: neither the steps before a resume nor model loading count."""
    import tqdm.auto
    import tqdm.std

    # the text bar, whatever this process imported before (ipykernel makes tqdm.auto pick the widget)
    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.std.tqdm)
    cfg = _fake_launch(monkeypatch, tmp_path, "run")
    launch.launch_training(cfg, tmp_path / "config.yaml")
    bar, rate = _last_bar_rate(capsys.readouterr().err)
    # 95 steps in about 4.75 s: 20 step/s; counting the 100 resumed steps would show about 40
    assert "200/200" in bar and rate < 30, bar
    _fake_launch(monkeypatch, tmp_path, "fresh")
    launch.launch_training(cfg, tmp_path / "config.yaml")
    bar, rate = _last_bar_rate(capsys.readouterr().err)
    # 95 steps in about 1.9 s: 50 step/s; counting the 3 s of loading would show about 20
    assert "100/200" in bar and rate > 35, bar
    log = (tmp_path / "runs" / "fake" / "train.log").read_text()
    assert log.count("==== session started") == 2 and "step 200/200" in log, "a rerun appends to the log"


def test_interrupt_stops_training_with_one_line_in_the_notebook_and_the_log(tmp_path, monkeypatch):
    cfg = _fake_launch(monkeypatch, tmp_path, "hang")
    ckpt = tmp_path / "runs" / "fake" / "checkpoints" / "mtp-0000110"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("")
    pids: list[int] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        pids.append(proc.pid)
        return proc

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    log = tmp_path / "runs" / "fake" / "train.log"
    # Kernel → Interrupt is a SIGINT to the kernel: KeyboardInterrupt in its main thread
    timer = threading.Thread(target=lambda: (_wait_for(lambda: log.is_file() and re.search(r"worker pid \d+", log.read_text()), 60),
                                             signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)))
    # a kernel turns SIGINT into KeyboardInterrupt; a pytest-xdist worker ignores SIGINT, so restore the default
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer.start()
    try:
        with pytest.raises(launch.Stopped) as stopped:
            launch.launch_training(cfg, tmp_path / "config.yaml", progress=False)
        assert not launch._group_alive(pids[0]), "the training process group is gone"
        pids.append(int(re.search(r"worker pid (\d+)", log.read_text()).group(1)))
        assert not _alive(pids[-1]), "a worker in a session of its own is stopped too"
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)
        for pid in pids:  # whatever happened above, leave no fake training behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    message = "stopped at step 120 — run the cell again to resume (from the checkpoint at step 110)"
    assert stopped.value._render_traceback_() == [message], "IPython shows this one line, no traceback"
    assert log.read_text().splitlines()[-1] == message


def test_a_run_stopped_by_stop_after_has_a_summary_that_says_so(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"stage": "mtp", "step": 5, "loss": 2.5}\n'
                                           '{"stage": "mtp", "step": 10, "loss": 2.25}\n')
    summary = launch.run_summary(run_dir)
    assert summary["finished"] is False and (summary["last_logged_step"], summary["last_logged_loss"]) == (10, 2.25)
    assert "stop_after" in summary["note"]
    (run_dir / "summary.json").write_text('{"final_loss": 2.0}')
    assert launch.run_summary(run_dir) == {"final_loss": 2.0}


def test_a_run_being_trained_cannot_be_launched_twice(tmp_path, monkeypatch):
    cfg = _fake_launch(monkeypatch, tmp_path, "run")
    run_dir = tmp_path / "runs" / "fake"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("the running training's config\n")
    with launch.run_lock(run_dir):  # another notebook's training of this run
        with pytest.raises(launch.RunBusy, match=rf"run fake is being trained by pid {os.getpid()} on ") as busy:
            launch.launch_training(cfg, tmp_path / "config.yaml", progress=False)
        assert busy.value._render_traceback_() == [str(busy.value)], "one line in the notebook, no traceback"
        with pytest.raises(launch.RunBusy):  # the notebook's first cell already: its config is not rewritten
            launch.prepare_run("rho1", "local", "fake", {"paths.runs_dir": str(tmp_path / "runs")})
    assert not (run_dir / "train.log").exists(), "refused before anything was written"
    assert (run_dir / "config.yaml").read_text() == "the running training's config\n"
    launch.launch_training(cfg, tmp_path / "config.yaml", progress=False)  # free again once it ended


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # a zombie has exited; only its parent's wait is missing
    return stat.is_file() and stat.read_text().split(")")[-1].split()[0] != "Z"


def _wait_for(condition, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"condition not met in {timeout_s} s")


def notebook_imports(name: str) -> str:
    """Every import statement in a committed notebook's code cells, as source."""
    import ast

    lines = []
    for cell in nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4).cells:
        if cell.cell_type == "code":
            code = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
            lines += [ast.unparse(node) for node in ast.walk(ast.parse(code))
                      if isinstance(node, (ast.Import, ast.ImportFrom))]
    return "\n".join(lines)


LIGHT_KERNELS = textwrap.dedent("""
    import json, sys
    def heavy():
        return sorted(m for m in ("torch", "transformers", "accelerate") if m in sys.modules)
    exec(sys.argv[2])
    from wmtp_lib.config import resolve_config
    ensure_tiny_models(resolve_config("critic", "local", {"paths.models_dir": sys.argv[1]}), log=print)
    train = heavy()
    exec(sys.argv[3])
    print(json.dumps([train, heavy()]))
""")


def test_train_and_analysis_kernels_import_no_model_code_when_the_models_are_current(tmp_path):
    """train.ipynb and analysis.ipynb only launch, read and plot: with the tiny models current, their kernels
    import neither transformers nor accelerate (about 9 s of every kernel's start here), and the train kernel
    not even torch; the staleness check reads the build record without importing the builder."""
    from wmtp_lib.checkpoints.tiny_builds import TINY_IDS, default_steps, record_build, tiny_build_id

    models = tmp_path / "models"
    for model_id in TINY_IDS:
        (models / model_id).mkdir(parents=True)
        (models / model_id / "manifest.json").write_text("{}")
        record_build(models, model_id, tiny_build_id(model_id, 0, default_steps()[model_id]))
    imports = [notebook_imports("train"), notebook_imports("analysis")]
    assert "ensure_tiny_models" in imports[0] and "find_or_train_run" in imports[1]
    proc = subprocess.run([sys.executable, "-c", LIGHT_KERNELS, str(models), *imports], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    train, analysis = json.loads(proc.stdout.splitlines()[-1])
    assert train == [] and analysis == ["torch"], proc.stdout  # analysis' bootstrap interval is torch's

    record_build(models, "tiny-ref", "another-build")
    from wmtp_lib.checkpoints.tiny_builds import stale_or_missing

    assert stale_or_missing(models, TINY_IDS) == ["tiny-ref"]


# ------------------------------------------------------------------ notebooks through papermill


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


@pytest.fixture
def ci_runs(monkeypatch):
    """An empty CI-sized runs folder (``runs/ci``) that the notebooks use with their default parameters."""
    monkeypatch.setenv("WMTP_CI", "1")
    if CI_RUNS.is_dir():
        shutil.rmtree(CI_RUNS)
    CI_RUNS.mkdir(parents=True)
    return CI_RUNS


def _run(name, out, kernel_name, **params):
    return pm.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(out), parameters=params,
                               kernel_name=kernel_name, cwd=str(ROOT / "notebooks"), progress_bar=False)


def _outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            text.append(o.get("text", "") or json.dumps(o.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def _cell_text(nb, needle: str) -> str:
    """The outputs of the first code cell whose source contains ``needle``."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and needle in c.source)
    return "\n".join(o.get("text", "") or json.dumps(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)


def _check_reads_default_run(nb) -> None:
    text = _outputs(nb)
    assert re.search(rf"reading run {DEFAULT_RUN} \(.*\): recipe rho1, 20 steps, final loss \d+\.\d+, commit [0-9a-f]{{10}}",
                     text), text[-2000:]


@pytest.mark.slow
def test_notebooks_in_workflow_order(ci_runs, kernel_name):
    """As a researcher runs them, each with its default parameters, on one runs folder."""
    out = ci_runs / "notebooks"
    out.mkdir()
    executed = {}
    for name in WORKFLOW:
        started = time.monotonic()
        executed[name] = _run(name, out / f"{name}.ipynb", kernel_name)
        print(f"{name}.ipynb: {time.monotonic() - started:.0f} s")

    report = json.loads((ci_runs / "preflight.json").read_text())
    assert {r["recipe"] for r in report["recipes"]} == {"mtp_baseline", "rho1", "rho1_tokenskip", "critic"}
    assert all(r["memory_per_device"]["total_gib"] is not None for r in report["recipes"])
    assert "torch" in _outputs(executed["preflight"])
    assert "tiny-mtp" in _outputs(executed["stage_models"])
    summary = json.loads((ci_runs / DEFAULT_RUN / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["recipe"] == "rho1" and "code_dirty" in summary
    code = code_provenance()
    assert summary["code_mixed"] is False and summary["git_commit"] == code["git_commit"]
    evaluation = json.loads((ci_runs / DEFAULT_RUN / "eval" / "synthetic.json").read_text())
    assert evaluation["evaluated_by"] == code, "the evaluation records the code that ran it"
    assert "noise_imitation" in evaluation["summary"], "the key that crashed analysis is there"
    speculative = evaluation["speculative"]  # a median of 3 paired ratios: one disturbed repeat cannot move it
    assert speculative["repeats"] == 3 and speculative["speedup"] == sorted(speculative["speedup_per_repeat"])[1]
    _check_reads_default_run(executed["evaluate"])
    _check_reads_default_run(executed["analysis"])
    table = _cell_text(executed["analysis"], "pass_at_k_table(loaded)")
    assert DEFAULT_RUN in table and "synthetic" in table, "analysis shows the evaluation evaluate.ipynb wrote"
    assert (ci_runs / "analysis_pass_at_k.png").is_file()
    for name in ("evaluate", "analysis"):
        assert "training it now" not in _outputs(executed[name]), \
            f"{name} trained again instead of reading the workflow's run"


@pytest.mark.slow
def test_evaluate_and_analysis_each_alone(ci_runs, kernel_name, tmp_path):
    """analysis.ipynb first in an empty runs folder trains the default run it needs, says so, reads it and, with
    nothing evaluated yet, shows empty pass@k and speculative tables instead of failing; evaluate.ipynb next,
    with no evaluation before it, finds that run (no second training) and evaluates it."""
    nb = _run("analysis", tmp_path / "analysis.ipynb", kernel_name)
    assert f"run {DEFAULT_RUN} is not under {ci_runs} yet: training it now" in _outputs(nb)
    _check_reads_default_run(nb)
    assert "Empty DataFrame" in _cell_text(nb, "pass_at_k_table(loaded)")
    assert "Empty DataFrame" in _cell_text(nb, "speculative_table(loaded)")
    assert not (ci_runs / "analysis_pass_at_k.png").exists() and (ci_runs / "analysis_loss.png").is_file()

    nb = _run("evaluate", tmp_path / "evaluate.ipynb", kernel_name)
    assert "training it now" not in _outputs(nb)
    _check_reads_default_run(nb)
    assert (ci_runs / DEFAULT_RUN / "eval" / "head_metrics.png").is_file()


@pytest.mark.slow
def test_train_notebook_fails_on_a_failed_run(tmp_path, kernel_name):
    with pytest.raises(pm.PapermillExecutionError, match="unknown key"):
        _run("train", tmp_path / "bad.ipynb", kernel_name, recipe="rho1", overrides={"train.nope": 1})


@pytest.mark.slow
def test_train_notebook_fails_when_training_fails(tmp_path, kernel_name):
    overrides = {"paths.models_dir": str(tmp_path / "no_models"), "paths.runs_dir": str(tmp_path / "runs"),
                 "storage.stage_tiny_if_missing": False}
    with pytest.raises(pm.PapermillExecutionError, match="training exited with code"):
        _run("train", tmp_path / "fail.ipynb", kernel_name, recipe="mtp_baseline", overrides=overrides)
    log = (tmp_path / "runs" / "mtp_baseline-local-seed0" / "train.log").read_text()
    assert "not staged at" in log


# ------------------------------------------------------------------ JupyterLab in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = ROOT / "runs" / "jupyterlab-train.png"


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:  # not listening yet
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path, monkeypatch):
    """JupyterLab as the README starts it (pre-save hook on), serving a checkout whose notebooks/ is a copy."""
    checkout = tmp_path / "wmtp"
    (checkout / "notebooks").mkdir(parents=True)
    shutil.copy2(ROOT / "notebooks" / "train.ipynb", checkout / "notebooks" / "train.ipynb")
    for folder in ("wmtp_lib", "params"):
        os.symlink(ROOT / folder, checkout / folder)
    port, token = _free_port(), "wmtp-browser-test"
    env = {**os.environ, "WMTP_CI": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"), "OMP_NUM_THREADS": "1"}
    # as a user who answered JupyterLab's "get notified about news?" toast: no toast over the screenshot
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                          "checkForUpdates": False}))
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={checkout}",
         "--ContentsManager.pre_save_hook=wmtp_lib.notebook_files.pre_save_hook"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: server.poll() is not None or _answers(f"http://127.0.0.1:{port}/api/status?token={token}"), 90)
        assert server.poll() is None, "JupyterLab exited:\n" + (tmp_path / "jupyterlab.log").read_text()[-3000:]
        yield f"http://127.0.0.1:{port}/lab?token={token}", checkout
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server shuts its kernels down
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="no browser: install Debian's chromium and chromium-driver (apt-get install -y chromium "
                           "chromium-driver, as .ci/run does) to drive JupyterLab")
def test_train_notebook_in_jupyterlab(jupyterlab, tmp_path):
    """Open train.ipynb from the file browser, set a CI-sized parameter, Run All: a live progress widget and
    the inline figure, no error output; saving writes no outputs and changes no metadata."""
    from selenium import webdriver
    from selenium.common.exceptions import (
        ElementNotInteractableException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, checkout = jupyterlab
    notebook = checkout / "notebooks" / "train.ipynb"
    committed = notebook.read_bytes()
    run_dir = CI_RUNS / f"{DEFAULT_RUN}-steps10"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # CI scratch: a stale run would resume instead of training
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    wait = WebDriverWait(driver, 60)

    def open_in_file_browser(name: str) -> None:
        item = wait.until(ec.element_to_be_clickable(
            (By.XPATH, f"//li[contains(@class, 'jp-DirListing-item')][.//span[text()='{name}']]")))
        ActionChains(driver).double_click(item).perform()

    def save() -> None:
        ActionChains(driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()

    def saved_since(mtime_ns: int) -> bool:
        """The server wrote the notebook again, completely (it writes in place: an empty file first)."""
        if notebook.stat().st_mtime_ns == mtime_ns:
            return False
        try:
            json.loads(notebook.read_text())
        except json.JSONDecodeError:
            return False
        return True

    def click(css: str, index: int = 0):
        """Click the element once JupyterLab has stopped re-rendering it (a kernel start re-renders cells)."""
        for _ in range(20):
            try:
                element = driver.find_elements(By.CSS_SELECTOR, css)[index]
                element.click()
                return element
            except (StaleElementReferenceException, ElementNotInteractableException, IndexError):
                time.sleep(0.25)
        raise AssertionError(f"{css} never became clickable")

    try:
        driver.get(url)
        open_in_file_browser("notebooks")
        open_in_file_browser("train.ipynb")
        wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']")))
        # opening and saving with the kernel started changes nothing in the committed file
        before = notebook.stat().st_mtime_ns
        click(".jp-NotebookPanel .jp-CodeCell .jp-InputPrompt")
        save()
        _wait_for(lambda: saved_since(before), 20)
        assert notebook.read_bytes() == committed, "JupyterLab rewrote the notebook on open + save"

        # the parameters cell: a CI-sized run of its own (WMTP_CI=1 in the server's environment sizes the rest)
        editor = click(".jp-NotebookPanel .jp-CodeCell .cm-content")
        ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.END).key_up(Keys.CONTROL).perform()
        ActionChains(driver).send_keys(Keys.ENTER, 'overrides = {"train.steps": 10').perform()
        source = editor.text
        assert re.search(r'overrides = \{"train\.steps": 10\}?', source), source
        if not source.rstrip().endswith("}"):
            ActionChains(driver).send_keys("}").perform()
        driver.find_element(By.XPATH, "//div[contains(@class, 'lm-MenuBar-itemLabel')][text()='Run']").click()
        driver.find_element(By.XPATH, "//div[contains(@class, 'lm-Menu-itemLabel')][text()='Run All Cells']").click()

        progress = WebDriverWait(driver, 120).until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, ".jp-OutputArea-output .widget-hprogress, .jp-OutputArea-output .widget-progress")))
        assert progress.is_displayed()
        WebDriverWait(driver, 150).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-RenderedImage img") or
                                         d.find_elements(By.CSS_SELECTOR, "[data-mime-type='application/vnd.jupyter.stderr']"))
        for figure in driver.find_elements(By.CSS_SELECTOR, ".jp-RenderedImage img"):
            driver.execute_script("arguments[0].scrollIntoView({block: 'end'})", figure)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR,
                                                       "[data-mime-type='application/vnd.jupyter.stderr']")]
        assert not errors, f"error output in the notebook (screenshot {SCREENSHOT}):\n" + "\n".join(errors)[-3000:]
        image = driver.find_element(By.CSS_SELECTOR, ".jp-RenderedImage img")
        assert image.size["width"] > 300, "the inline figure is rendered"
        text = driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook").text
        assert f"named {DEFAULT_RUN}-steps10" in text and "step 10/10 loss" in text, text[-2000:]
        assert "Error displaying widget" not in text and "Traceback" not in text
        assert (run_dir / "summary.json").is_file()

        # saving after the run writes the edit, never the outputs
        before = notebook.stat().st_mtime_ns
        save()
        _wait_for(lambda: saved_since(before), 20)
        saved = nbformat.read(notebook, as_version=4)
        assert not any(c.get("outputs") or c.get("execution_count") for c in saved.cells if c.cell_type == "code")
        assert '"train.steps": 10' in saved.cells[1].source and saved.metadata == nbformat.reads(
            committed.decode(), as_version=4).metadata
    finally:
        driver.quit()
