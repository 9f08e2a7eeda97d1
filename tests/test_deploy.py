"""Static checks of the cluster files, and the VESSL command run here with the local environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from train_helpers import ROOT


def _vessl():
    return yaml.safe_load((ROOT / "docker" / "vessl.yaml").read_text())


def test_dockerfile_base_has_torch_at_least_2_6():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, flags=re.M).group(1)
    m = re.match(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda", base)
    assert m, base
    assert (int(m.group(1)), int(m.group(2))) >= (2, 6)
    assert re.search(r"^USER\s+(?!root)\w+", text, flags=re.M), "the image must run as a non-root user"
    assert "pip install -e ." in text and "diff - /tmp/torch-before" in text


def test_dockerfile_copies_paths_that_exist():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, flags=re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path


def test_dockerignore_keeps_runs_caches_and_secrets_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in ("runs", "models", "datasets", ".env", ".aws", ".venv"):
        assert entry in ignored


def test_vessl_yaml_parses_and_asks_for_four_gpus():
    spec = _vessl()
    for key in ("name", "resources", "image", "run", "export", "env"):
        assert key in spec, key
    assert {"cluster", "preset"} <= set(spec["resources"])
    gpus = int(re.search(r"a100-(\d+)\.", spec["resources"]["preset"]).group(1))
    assert gpus == 4
    assert yaml.safe_load((ROOT / "params/accelerate/fsdp_4gpu.yaml").read_text())["num_processes"] == gpus
    assert "RECIPE" in spec["env"]


def test_vessl_secrets_are_references_not_values():
    env = _vessl()["env"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
        assert isinstance(env[name], dict) and set(env[name]) == {"secret"}, name


def test_vessl_command_names_existing_notebooks_and_parameters():
    import nbformat

    command = _vessl()["run"][0]["command"]
    for nb, params in re.findall(r"papermill (notebooks/\w+\.ipynb) \S+((?: -p \w+ \S+)*)", command):
        path = ROOT / nb
        assert path.is_file(), nb
        cell = next(c for c in nbformat.read(path, 4).cells if "parameters" in c.metadata.get("tags", []))
        for name in re.findall(r"-p (\w+)", params):
            assert re.search(rf"^{name}\s*=", cell.source, flags=re.M), f"{nb} has no parameter {name}"
    workdir = _vessl()["run"][0]["workdir"]
    assert workdir in (ROOT / "docker" / "Dockerfile").read_text()


def test_no_secret_values_in_committed_files():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    patterns = [re.compile(p) for p in (r"AKIA[0-9A-Z]{16}", r"hf_[A-Za-z0-9]{30,}",
                                        r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}")]
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(errors="ignore")
        for p in patterns:
            assert not p.search(text), f"{name} contains something that looks like a credential"


@pytest.mark.slow
def test_vessl_command_runs_with_local_environment(tmp_path, tiny_models):
    """The exact command of docker/vessl.yaml, with WMTP_ENV=local, in a copy of the project."""
    work = tmp_path / "wmtp"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in files:
        dst = work / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dst)
    os.symlink(tiny_models, work / "models")
    spec = _vessl()
    env = dict(os.environ, RECIPE="mtp_baseline", WMTP_ENV="local",
               PYTHONPATH=str(work) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", "-c", spec["run"][0]["command"]], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "runs" / "preflight-mtp_baseline.ipynb").is_file()
    assert (work / "runs" / "train-mtp_baseline.ipynb").is_file()
    assert (work / "runs" / "mtp_baseline-local-seed0" / "final" / "model.safetensors").is_file()
