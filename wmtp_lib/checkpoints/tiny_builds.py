"""Which tiny models a directory holds, and whether they are current: read without importing torch.

A notebook asks this before every run (`wmtp_lib.launch.ensure_tiny_models`); the answer must not cost the
seconds that importing the builder (`wmtp_lib.checkpoints.tiny`: torch, transformers) does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

TINY_IDS = ("tiny-mtp", "tiny-ref", "tiny-rm")
REF_STEPS, RM_STEPS = 300, 600  # training steps of the tiny reference and reward models
PRETRAIN = dict(steps=120, batch=16, length=144, lr=3e-3, n_tasks=1200)  # the tiny base's pretraining
TINY_BUILDS = ".tiny-builds.json"  # in the models directory: model id -> the `tiny_build_id` it was built with

_PACKAGE = Path(__file__).resolve().parents[1]
# Everything a tiny model's files depend on: the builder and every package module it imports, directly or not
# (tests/test_tiny.py checks this list against the import graph), and the libraries that compute them.
BUILD_MODULES = ("checkpoints.tiny", "checkpoints.tiny_builds", "checkpoints.convert", "checkpoints.manifest",
                 "checkpoints.reward_models", "checkpoints.tokenization", "data.packing", "data.rows", "data.sample",
                 "data.synthetic", "model.heads", "model.losses", "model.packing", "registry")
BUILD_LIBRARIES = ("torch", "transformers", "tokenizers", "sentencepiece", "safetensors")


def default_steps() -> dict[str, int]:
    """Training steps of each tiny model as `stage_tiny` builds it by default."""
    return {"tiny-mtp": PRETRAIN["steps"], "tiny-ref": REF_STEPS, "tiny-rm": RM_STEPS}


def tiny_build_id(model_id: str, seed: int, steps: int) -> str:
    """What a tiny model's files depend on: the code that builds them (`BUILD_MODULES`), the versions of the
    libraries that compute them, the model, the seed and its training steps. A staged tiny model built with
    another id is stale and gets rebuilt (models/ is a cache of what this code builds)."""
    from importlib.metadata import version

    h = hashlib.sha256(json.dumps([model_id, seed, steps, [version(lib) for lib in BUILD_LIBRARIES]]).encode())
    for module in BUILD_MODULES:
        h.update((_PACKAGE / (module.replace(".", "/") + ".py")).read_bytes())
    return h.hexdigest()[:16]


def stale_or_missing(models_dir: str | Path, ids, seed: int = 0, steps: dict[str, int] | None = None) -> list[str]:
    """The tiny models of ``ids`` that `stage_tiny` would build (with ``steps``, by default its own): missing or
    stale."""
    steps = steps or default_steps()
    built = read_builds(Path(models_dir))
    return [i for i in ids if not (Path(models_dir) / i / "manifest.json").is_file()
            or built.get(i) != tiny_build_id(i, seed, steps[i])]


def read_builds(models_dir: Path) -> dict[str, str]:
    """Model id -> the build id each staged tiny model was built with (empty when none is recorded)."""
    path = Path(models_dir) / TINY_BUILDS
    return json.loads(path.read_text()) if path.is_file() else {}


def record_build(models_dir: Path, model_id: str, build: str) -> None:
    """Record ``model_id`` as built with ``build`` (written whole, then renamed: a reader never sees half)."""
    builds = {**read_builds(models_dir), model_id: build}
    tmp = Path(models_dir) / (TINY_BUILDS + ".tmp")
    tmp.write_text(json.dumps(builds, indent=1, sort_keys=True) + "\n")
    tmp.replace(Path(models_dir) / TINY_BUILDS)
