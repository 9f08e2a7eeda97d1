"""Static checks of the cluster files, and the VESSL command run here with the local environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

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
    assert "pip install --no-deps -e ." in text and "diff - /tmp/torch-before" in text


def _instructions(text: str) -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    lines = [line for line in text.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [" ".join(line.split()) for line in lines]


def test_dockerfile_keeps_the_inline_backend_installs_dependencies_first_and_runs_tini():
    steps = _instructions((ROOT / "docker" / "Dockerfile").read_text())
    assert not any("MPLBACKEND" in s for s in steps if s.startswith("ENV")), "a forced backend hides notebook plots"
    deps = next(i for i, s in enumerate(steps) if s.startswith("RUN") and "pip install -r /tmp/requirements.lock" in s)
    lock = next(i for i, s in enumerate(steps) if s.startswith("COPY") and "docker/requirements.lock" in s)
    code = next(i for i, s in enumerate(steps) if s.startswith("COPY") and "wmtp_lib" in s)
    assert lock < deps < code, "dependencies must be installed in a layer before the code is copied"
    assert not any(s.startswith("COPY") and ("wmtp_lib" in s or "notebooks" in s) for s in steps[:deps])
    assert any(s.startswith("RUN apt-get") and " tini " in s + " " for s in steps)
    assert steps[[s.split()[0] for s in steps].index("ENTRYPOINT")] == 'ENTRYPOINT ["/usr/bin/tini", "--"]'


def test_lock_pins_every_runtime_dependency_of_a_resolved_environment():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock_text = (ROOT / "docker" / "requirements.lock").read_text()
    pins = dict(line.split("==") for line in lock_text.splitlines() if line and not line.startswith("#"))
    assert all(re.fullmatch(r"[A-Za-z0-9][\w.\-]*", v) for v in pins.values()), "every line must be name==version"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        if name == "torch":
            assert name not in pins, "torch comes from the base image; the lock must not replace it"
            continue
        assert name in pins, f"{name} is a dependency but not in docker/requirements.lock: regenerate it"
        assert dep.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} does not satisfy {dep}"
    # the lock is what docker/lock.py derives from this (resolved) environment: same distributions
    proc = subprocess.run([sys.executable, str(ROOT / "docker" / "lock.py")], capture_output=True, text=True, check=True)
    derived = {line.split("==")[0] for line in proc.stdout.splitlines() if line and not line.startswith("#")}
    assert derived == set(pins), f"regenerate docker/requirements.lock: {sorted(derived ^ set(pins))}"


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


def test_vessl_pulls_only_the_run_it_resumes_and_keeps_logs():
    spec = _vessl()
    imports = spec.get("import", {}) or {}
    assert not any(str(v).rstrip("/").endswith("/runs") for v in imports.values()), "never import all of runs/"
    command = spec["run"][0]["command"]
    assert 'pull-run "s3://wmtp/runs/${RUN_NAME}/" "runs/${RUN_NAME}"' in command
    assert '-p run_name "${RUN_NAME}"' in command
    papermills = re.findall(r"^\s*papermill .*$", command, flags=re.M)
    assert papermills and all("--log-output" in line for line in papermills)


def test_vessl_secrets_are_references_not_values():
    env = _vessl()["env"]
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
        assert isinstance(env[name], dict) and set(env[name]) == {"secret"}, name


def test_vessl_command_names_existing_notebooks_and_parameters():
    import nbformat

    command = _vessl()["run"][0]["command"]
    for nb, params in re.findall(r"papermill (?:--\S+ )*(notebooks/\w+\.ipynb) \S+((?: -p \w+ \S+)*)", command):
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
def test_vessl_command_runs_with_local_environment(tmp_path, tiny_models, s3_endpoint):
    """The exact command of docker/vessl.yaml, with WMTP_ENV=local (CI-sized), in a copy of the project.

    The S3 endpoint is the local test server; bucket ``wmtp`` has no earlier run, so the pull starts fresh.
    """
    import boto3

    work = tmp_path / "wmtp"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split("\n")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            dst = work / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst)
    os.symlink(tiny_models, work / "models")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="eu-north-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    if "wmtp" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket="wmtp", CreateBucketConfiguration={"LocationConstraint": "eu-north-1"})
    spec = _vessl()
    env = dict(os.environ, RECIPE="mtp_baseline", WMTP_ENV="local", WMTP_CI="1", AWS_ENDPOINT_URL=s3_endpoint,
               AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="eu-north-1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=str(work) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", "-c", spec["run"][0]["command"]], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no earlier run at s3://wmtp/runs/mtp_baseline-local-seed0/" in proc.stdout
    assert (work / "runs" / "preflight-mtp_baseline.ipynb").is_file()
    assert (work / "runs" / "train-mtp_baseline.ipynb").is_file()
    assert re.search(r"step 20/20 loss", proc.stderr + proc.stdout), "--log-output streams step lines to the job log"
    assert (work / "runs" / "ci" / "mtp_baseline-local-seed0" / "final" / "model.safetensors").is_file()
