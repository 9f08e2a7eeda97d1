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


def run_training(config_path, processes: int = 1, accelerate_config: str | None = None, check: bool = True):
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


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))
