"""``manifest.json``: the sha256 and size of every file of a staged directory, written on conversion and checked
on download and load."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "wmtp-manifest-v1"


class ManifestError(RuntimeError):
    """A file does not match the manifest that came with its directory."""


# ---------------------------------------------------------------------------------------- manifest
def sha256_file(path: str | Path, block: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``manifest.json`` listing sha256 and size of every file under ``directory``."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {"format": MANIFEST_FORMAT, "files": files, **(extra or {})}
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} not found: the directory was not written by convert_checkpoint")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def verify_manifest(directory: str | Path, check_hashes: bool = True) -> dict[str, Any]:
    """Raise `ManifestError` naming the first missing, resized or corrupted file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for rel, meta in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing")
        if path.stat().st_size != meta["size"]:
            raise ManifestError(f"{path}: size {path.stat().st_size} != manifest {meta['size']}")
        if check_hashes and sha256_file(path) != meta["sha256"]:
            raise ManifestError(f"{path}: sha256 does not match the manifest (corrupted or partial file)")
    return manifest


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
