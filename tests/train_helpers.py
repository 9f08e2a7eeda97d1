"""Run the training entry as a subprocess on a resolved config (as accelerate launch would)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from wmtp_lib.config import resolve_config, write_config

ROOT = Path(__file__).resolve().parents[1]


def make_config(tmp_path, recipe, models_dir, name, overrides=None):
    over = {"paths.models_dir": str(models_dir), "paths.runs_dir": str(tmp_path / "runs"),
            "paths.datasets_dir": str(tmp_path / "datasets"), "train.log_every": 5, "data.n_train": 400}
    over.update(overrides or {})
    cfg = resolve_config(recipe, "local", over, run_name=name)
    path = write_config(cfg, tmp_path / f"{name}.yaml")
    return cfg, path


def run_training(config_path, processes: int = 1, accelerate_config: str | None = None, check: bool = True,
                 fresh_interpreter: bool = False):
    """Train from a config file and return its exit code and output, as `subprocess.run` does.

    One process: the training entry's ``main`` runs in a forked child of this test process, so each run does not
    pay a fresh interpreter's imports (about 9 s of torch and transformers on this machine); the child starts with
    a copy of this process's state, runs with its own stdout/stderr and ends with ``main``'s exit code, as
    ``python -m wmtp_lib.train`` would (``fresh_interpreter=True`` runs exactly that, as does a process that has
    initialised CUDA, which a forked child cannot use). Several processes go through ``accelerate launch``."""
    import torch

    if processes == 1 and accelerate_config is None and not fresh_interpreter and not torch.cuda.is_initialized():
        proc = _forked_main(["--config", str(config_path)])
    else:
        if processes == 1 and accelerate_config is None:
            cmd = [sys.executable, "-m", "wmtp_lib.train", "--config", str(config_path)]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   accelerate_config or str(ROOT / "params/accelerate/cpu_2proc.yaml"),
                   "-m", "wmtp_lib.train", "--config", str(config_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _forked_main(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``wmtp_lib.train.loop.main(argv)`` in a forked child, its output captured: the training entry without a new
    interpreter. An uncaught exception prints its traceback and exits 1, as the interpreter would."""
    import os
    import tempfile
    import time
    import traceback

    from wmtp_lib.train.loop import main

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.chdir(ROOT)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                code = main(argv)
            except SystemExit as exc:  # as the interpreter maps it: None is 0, a message is printed and 1
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(["wmtp_lib.train", *argv], timeout)
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["wmtp_lib.train", *argv], os.waitstatus_to_exitcode(status),
                                           out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))
