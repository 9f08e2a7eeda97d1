"""Staging models and datasets once: Hub / S3 / local / tiny → converted directory (+ manifest) → S3."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from wmtp_lib.checkpoints.convert import TOKENIZER_FILES, convert_checkpoint
from wmtp_lib.checkpoints.manifest import verify_manifest, write_manifest
from wmtp_lib.checkpoints.tokenization import load_tokenizer, tokenizer_files_present
from wmtp_lib.registry import ModelEntry, Registry, load_registry

SOURCES = ("hf", "s3", "local", "tiny")
DESTS = ("local", "s3")


class StagingError(RuntimeError):
    """A model or dataset could not be staged; the message says what to do."""


# Never fetched: optimizer / ZeRO / trainer state that some repos keep beside the weights.
_TRAINING_STATE = re.compile(r"optim|zero_|global_step|mp_rank|scheduler|rng_state|trainer_state|training_args",
                             re.IGNORECASE)
_SMALL_FILES = ("config.json", "params.json", "tokenizer.model", "v_head.json") + TOKENIZER_FILES


def select_repo_files(files: list[str], subfolder: str | None = None,
                      root_files: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """From a Hub repo listing, the (small files, weight files) that staging converts.

    Small files: config, ``params.json`` and tokenizer files of the model folder (plus ``root_files``).
    Weights: ``*.safetensors`` (+ index) when the folder has them, else ``*.bin`` (+ index), else
    ``*.pth``/``*.pt``; never optimizer, ZeRO or trainer state, and nothing from deeper folders.
    """
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    here = [f for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]
            and not _TRAINING_STATE.search(f[len(prefix):])]
    small = [f for f in here if f[len(prefix):] in _SMALL_FILES] + [f for f in root_files if f in files]
    weights: list[str] = []
    for suffixes in ((".safetensors", ".safetensors.index.json"), (".bin", ".bin.index.json"), (".pth", ".pt")):
        weights = [f for f in here if f.endswith(suffixes)]
        if any(not f.endswith(".index.json") for f in weights):
            break
    return sorted(set(small)), sorted(weights)


def _hub_error(repo: str, exc: Exception, token: str | None) -> StagingError:
    """One line that says what is wrong: missing repo, gated access, or anything else."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return StagingError(f"{repo} is gated: accept its licence on huggingface.co and export HF_TOKEN of that "
                            f"account ({'set' if token else 'HF_TOKEN is not set'})")
    if isinstance(exc, RepositoryNotFoundError):
        return StagingError(f"{repo} does not exist on the Hugging Face Hub (or is private): check hf_repo in "
                            "params/models.yaml")
    hint = "" if token else " HF_TOKEN is not set: gated repos (e.g. Meta's) need it."
    return StagingError(f"download of {repo} failed: {type(exc).__name__}: {exc}.{hint}")


def _progress_bars_on(log: Callable[[str], None]) -> None:
    """Hub downloads show tqdm byte progress (stderr, kept by papermill) unless the environment turned it off."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    if are_progress_bars_disabled():
        enable_progress_bars()
    if are_progress_bars_disabled():
        log("Hub byte progress is off (HF_HUB_DISABLE_PROGRESS_BARS is set); unset it to see it")


def hub_download(repo: str, subfolder: str | None, root_files: tuple[str, ...], dst: Path,
                 tokenizer_from: tuple[str, tuple[str, ...]] | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Download what staging converts from a Hub repo, tokenizer files first.

    The tokenizer files are fetched and the tokenizer built the way every later path builds it
    (`load_tokenizer`: a ``tokenizer.model`` converted and proven equal to SentencePiece wherever the
    repo has one) before the first weight byte moves. ``tokenizer_from`` = (repo, files) fetches the
    tokenizer from another repo (Starling has none). HF_TOKEN comes from the environment.
    """
    from huggingface_hub import HfApi, snapshot_download

    token = os.environ.get("HF_TOKEN") or None
    _progress_bars_on(log)
    try:
        listing = HfApi(token=token).list_repo_files(repo)
        small, weights = select_repo_files(listing, subfolder, root_files)
        if weights:
            snapshot_download(repo_id=repo, allow_patterns=small, local_dir=str(dst), token=token)
    except Exception as exc:  # the Hub raises many types; all end here with the fix spelled out
        raise _hub_error(repo, exc, token) from exc
    if not weights:
        raise StagingError(f"{repo}{'/' + subfolder if subfolder else ''} has no weight files to convert "
                           f"(listing: {listing[:12]})")
    if tokenizer_from is not None:
        try:
            snapshot_download(repo_id=tokenizer_from[0], allow_patterns=list(tokenizer_from[1]),
                              local_dir=str(dst / ".tokenizer_source"), token=token)
        except Exception as exc:  # as above
            raise _hub_error(tokenizer_from[0], exc, token) from exc
    src = dst / subfolder if subfolder else dst
    for name in root_files:
        if (dst / name).is_file() and not (src / name).is_file():
            shutil.copy(dst / name, src / name)
    if tokenizer_from is not None:
        for name in tokenizer_from[1]:
            shutil.copy(dst / ".tokenizer_source" / name, src / Path(name).name)
        shutil.rmtree(dst / ".tokenizer_source")
    if tokenizer_files_present(src):
        # the tokenizer the model will train with: tokenizer.model converted exactly wherever there is one
        # (CodeLlama ships tokenizer.json too, which is not what we read), else tokenizer.json
        tok = load_tokenizer(src)
        which = "tokenizer.model" if (src / "tokenizer.model").is_file() else "tokenizer.json"
        log(f"{repo}: tokenizer checked from {which} ({len(tok)} tokens) before the weights")
    log(f"{repo}: downloading {len(weights)} weight files: {', '.join(weights)}")
    try:
        snapshot_download(repo_id=repo, allow_patterns=weights, local_dir=str(dst), token=token)
    except Exception as exc:  # as above
        raise _hub_error(repo, exc, token) from exc
    return src


def tokenizer_repo_files(entry: ModelEntry, reg: Registry) -> tuple[str, tuple[str, ...]] | None:
    """(Hub repo, files) holding the tokenizer of a model whose repo has none (registry ``tokenizer_source``)."""
    if entry.tokenizer_source == "own":
        return None
    source = reg.model(entry.tokenizer_source)
    if not source.hf_repo:
        raise StagingError(f"{entry.id}: tokenizer_source {source.id} has no hf_repo to fetch the tokenizer from")
    files = source.hf_root_files or ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return source.hf_repo, tuple(files)


def stage_model(model_id: str, source: str, dest: str, models_dir: str | Path, registry: Registry | None = None,
                local_path: str | Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Bring one registry model into ``models_dir/<id>`` (converted + manifest), then to S3 if ``dest='s3'``."""
    if source not in SOURCES:
        raise StagingError(f"source must be one of {SOURCES}, got {source!r}")
    if dest not in DESTS:
        raise StagingError(f"dest must be one of {DESTS}, got {dest!r}")
    reg = registry or load_registry()
    entry = reg.model(model_id)
    models_dir = Path(models_dir)
    target = models_dir / model_id
    if source == "tiny":
        if entry.format != "tiny":
            raise StagingError(f"{model_id} is not a tiny model (format {entry.format}); use source hf, s3 or local")
        from wmtp_lib.checkpoints.tiny import stage_tiny

        stage_tiny(models_dir, ids=(model_id,), log=log)
    elif source == "s3":
        from wmtp_lib.checkpoints.storage import download_directory

        if not entry.s3:
            raise StagingError(f"{model_id} has no s3 path in params/models.yaml")
        result = download_directory(entry.s3, target, progress=log)
        log(f"{model_id}: {len(result['downloaded'])} files downloaded from {entry.s3}")
    else:
        if (target / "manifest.json").is_file():
            verify_manifest(target)
            log(f"{model_id}: already converted at {target} (manifest verified)")
        else:
            with tempfile.TemporaryDirectory(dir=models_dir if models_dir.exists() else None) as tmp:
                if source == "hf":
                    if not entry.hf_repo:
                        raise StagingError(f"{model_id} has no hf_repo in params/models.yaml")
                    log(f"{model_id}: downloading {entry.hf_repo}" + (f"/{entry.hf_subfolder}" if entry.hf_subfolder else ""))
                    src = hub_download(entry.hf_repo, entry.hf_subfolder, entry.hf_root_files, Path(tmp) / "hub",
                                       tokenizer_from=tokenizer_repo_files(entry, reg), log=log)
                else:
                    if local_path is None:
                        raise StagingError("source 'local' needs local_path (a Meta or Hugging Face directory)")
                    src = Path(local_path)
                models_dir.mkdir(parents=True, exist_ok=True)
                convert_checkpoint(src, target)
                log(f"{model_id}: converted {src} -> {target}")
    manifest = verify_manifest(target)
    if dest == "s3":
        from wmtp_lib.checkpoints.storage import upload_directory

        if not entry.s3:
            raise StagingError(f"{model_id} has no s3 path in params/models.yaml")
        upload_directory(target, entry.s3)
        log(f"{model_id}: uploaded {len(manifest['files'])} files to {entry.s3}")
    size = sum(f["size"] for f in manifest["files"].values())
    return {"id": model_id, "local": str(target), "s3": entry.s3 if dest == "s3" else None, "bytes": size,
            "files": len(manifest["files"])}


def _write_jsonl(rows, path: Path) -> int:
    n = 0
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=str) + "\n")
            n += 1
    return n


def stage_dataset(dataset_id: str, source: str, dest: str, datasets_dir: str | Path,
                  registry: Registry | None = None, local_path: str | Path | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Hub dataset repo (parquet/JSON per split) or a local folder → ``<split>.jsonl`` + manifest (→ S3)."""
    reg = registry or load_registry()
    entry = reg.dataset(dataset_id)
    if entry.format in ("humaneval", "synthetic"):
        raise StagingError(f"{dataset_id} needs no staging ({entry.format} ships with the project)")
    target = Path(datasets_dir) / dataset_id
    if source == "s3":
        from wmtp_lib.checkpoints.storage import download_directory

        download_directory(entry.s3, target, progress=log)
    elif not (target / "manifest.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            if source == "hf":
                from huggingface_hub import snapshot_download

                root = Path(snapshot_download(repo_id=entry.hf_repo, repo_type="dataset", local_dir=str(Path(tmp) / "hub"),
                                              token=os.environ.get("HF_TOKEN") or None))
            elif source == "local":
                if local_path is None:
                    raise StagingError("source 'local' needs local_path")
                root = Path(local_path)
            else:
                raise StagingError(f"dataset source must be hf, s3 or local, got {source!r}")
            out = Path(tmp) / "out"
            out.mkdir()
            splits = _collect_splits(root, entry.hf_config)
            if not splits:
                raise StagingError(f"no parquet/json/jsonl split files found under {root}")
            for split, files in splits.items():
                n = _write_jsonl(_read_rows(files), out / f"{split}.jsonl")
                log(f"{dataset_id}/{split}: {n} rows")
            write_manifest(out, {"dataset": dataset_id})
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(out, target)
    manifest = verify_manifest(target)
    if dest == "s3":
        from wmtp_lib.checkpoints.storage import upload_directory

        upload_directory(target, entry.s3)
    return {"id": dataset_id, "local": str(target), "files": sorted(manifest["files"])}


_SPLIT_NAMES = ("train", "test", "validation", "valid", "prompt")


def _collect_splits(root: Path, config: str | None) -> dict[str, list[Path]]:
    files = [p for p in root.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json") and p.is_file()
             and p.name != "manifest.json" and not p.name.startswith(".")]
    if config:
        scoped = [p for p in files if config in p.relative_to(root).parts]
        files = scoped or files
    splits: dict[str, list[Path]] = {}
    for p in sorted(files):
        name = next((s for s in _SPLIT_NAMES if p.name.startswith(s) or p.stem == s), None)
        if name is None:
            continue
        splits.setdefault("validation" if name == "valid" else name, []).append(p)
    return splits


def _read_rows(files: list[Path]):
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            yield from pq.read_table(f).to_pylist()
        elif f.suffix == ".jsonl":
            with open(f) as fh:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)
        else:
            data = json.loads(f.read_text())
            yield from (data if isinstance(data, list) else data.get("data", []))
