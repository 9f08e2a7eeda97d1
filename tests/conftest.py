"""Shared fixtures: tiny random models built on the spot."""

from __future__ import annotations

import os

# One compute thread in every test process and in what it starts (training, notebooks' kernels): pytest runs
# two workers on two cores, and a process with more threads than its share of cores spins instead of computing.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"  # MKL reads its own first; torch sizes its pool from it

import pytest  # noqa: E402

# torch is imported by the test modules, not here: pytest-xdist's controller process only hands out files, and
# importing torch and transformers in it (about 10 s on one core) would delay both workers' start. Every torch
# imported after this point reads OMP_NUM_THREADS=1.


@pytest.fixture
def tiny_mtp():
    import torch
    from tiny_models import tiny_config

    from wmtp_lib.model.heads import MTPModel

    torch.manual_seed(0)
    return MTPModel(tiny_config()).eval()


@pytest.fixture(scope="session")
def s3_endpoint():
    from s3_server import moto_s3_server

    with moto_s3_server() as url:
        yield url


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Point boto3 at the local endpoint with throwaway credentials and a fresh bucket."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    bucket = f"wmtp-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="eu-north-1").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-north-1"})
    return bucket


@pytest.fixture(scope="session")
def tiny_models():
    """The embedded default models in the project's model cache ``models/`` (git-ignored), built there once when
    missing or stale: the notebooks and the README's commands, which pytest also runs, read the same directory,
    so a test session builds them (about 90–110 s on 2 cores) once, not twice. Tests only read them."""
    from wmtp_lib.checkpoints.tiny import stage_tiny
    from wmtp_lib.registry import PROJECT_ROOT

    root = PROJECT_ROOT / "models"
    stage_tiny(root, log=lambda m: None)  # builds only what is missing or stale (`tiny_build_id`)
    return root


def python_corpus(max_chars: int = 1_500_000) -> list[str]:
    """Lines of the Python standard library's own source: a real code corpus available offline."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
            lines.append(line)
            total += len(line) + 1
        if total >= max_chars:
            break
    return lines


@pytest.fixture(scope="session")
def llama_spm(tmp_path_factory):
    """A SentencePiece ``tokenizer.model`` trained with Llama-2's settings on Python code (trained once)."""
    from wmtp_lib.checkpoints.tokenization import train_llama_sentencepiece

    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    return train_llama_sentencepiece(python_corpus(), path, vocab_size=2000)


# The longest files (seconds of work on 2 idle cores, measured at 6d39c50), in the order `--dist loadfile
# --no-loadscope-reorder` hands them out: training (which builds the tiny models, ~100 s of both cores) on one
# worker; the sandbox, which needs no model, on the other while the build runs, then the notebooks (which wait
# for the models); the rest go to whichever worker runs short; a long file last would leave one worker alone.
LONGEST_FIRST = ("test_train.py",  # ~290 with the tiny models' build (~100)
                 "test_sandbox.py",  # ~50, no model
                 "test_notebooks.py",  # ~170 of work: workflow order, each alone, JupyterLab (they share runs/ci)
                 "test_deploy.py",  # ~65
                 "test_experiment.py",  # ~63
                 "test_scale.py", "test_base_load.py", "test_readme.py", "test_tiny.py")


def pytest_collection_modifyitems(config, items):
    """The longest test files first, in `LONGEST_FIRST`'s order (`--dist loadfile` hands out whole files in
    collection order), so the short files fill in beside them and neither worker waits alone at the end."""
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)
