"""S3 storage of staged directories and the local cache (DESIGN §5).

boto3 with the standard credential chain; ``AWS_ENDPOINT_URL`` is honoured (tests use a local S3
endpoint). A directory is uploaded file by file with its ``manifest.json`` last, so a prefix with a
manifest is complete. Downloads go to a local cache: each file is fetched in byte ranges by parallel
workers into ``<cache>/.partial/``, completed ranges survive an interruption (resume), the assembled
file is checked against the manifest's sha256 and renamed into place; a cache that already verifies is
not downloaded again.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from wmtp_lib.loaders import MANIFEST_NAME, ManifestError, read_manifest, sha256_file, verify_manifest

DEFAULT_REGION = "eu-north-1"
PART_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading slash; ends with "/" unless empty

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def key(self, rel: str) -> str:
        return f"{self.prefix}{rel}"


def parse_s3_uri(uri: str) -> S3Location:
    """``s3://bucket/some/prefix/`` → `S3Location` (the prefix always ends with ``/``)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return S3Location(bucket, prefix)


def s3_client(region: str | None = None):
    """A boto3 S3 client from the standard credential chain; ``AWS_ENDPOINT_URL`` is used when set."""
    import boto3

    kwargs: dict[str, Any] = {"region_name": region or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    return boto3.client("s3", **kwargs)


def remote_manifest(uri: str, client=None) -> dict[str, Any] | None:
    """The manifest stored under an S3 prefix, or ``None`` when there is none (nothing staged there)."""
    from botocore.exceptions import ClientError

    loc = parse_s3_uri(uri)
    client = client or s3_client()
    try:
        body = client.get_object(Bucket=loc.bucket, Key=loc.key(MANIFEST_NAME))["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NoSuchBucket"):
            return None
        raise
    return json.loads(body)


def upload_directory(local: str | Path, uri: str, client=None, workers: int = 8) -> dict[str, Any]:
    """Upload a staged directory (its manifest must verify) to ``uri``; the manifest goes last."""
    from boto3.s3.transfer import TransferConfig

    local = Path(local)
    manifest = verify_manifest(local)
    loc = parse_s3_uri(uri)
    client = client or s3_client()
    config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=workers)
    for rel in manifest["files"]:
        client.upload_file(str(local / rel), loc.bucket, loc.key(rel), Config=config)
    client.upload_file(str(local / MANIFEST_NAME), loc.bucket, loc.key(MANIFEST_NAME))
    return manifest


def _part_ranges(size: int, part_bytes: int) -> list[tuple[int, int]]:
    if size == 0:
        return []
    return [(start, min(size, start + part_bytes) - 1) for start in range(0, size, part_bytes)]


def _fetch_range(client, loc: S3Location, rel: str, start: int, end: int, dest: Path) -> None:
    body = client.get_object(Bucket=loc.bucket, Key=loc.key(rel), Range=f"bytes={start}-{end}")["Body"]
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as fh:
        shutil.copyfileobj(body, fh, length=1024 * 1024)
    if tmp.stat().st_size != end - start + 1:
        raise IOError(f"short read for {loc.key(rel)} bytes {start}-{end}")
    os.replace(tmp, dest)


def _download_file(client, loc: S3Location, rel: str, meta: dict[str, Any], cache: Path, part_bytes: int,
                   pool: ThreadPoolExecutor) -> bool:
    """Bring one file into the cache; returns False when the cached copy already matched."""
    target = cache / rel
    if target.is_file() and target.stat().st_size == meta["size"] and sha256_file(target) == meta["sha256"]:
        return False
    partial = cache / ".partial" / rel.replace("/", "__")
    partial.mkdir(parents=True, exist_ok=True)
    ranges = _part_ranges(meta["size"], part_bytes)
    # A part file only exists once its range was read in full (written to .tmp, then renamed).
    jobs = []
    for i, (start, end) in enumerate(ranges):
        part = partial / f"{i:06d}-{start}-{end}"
        if not (part.is_file() and part.stat().st_size == end - start + 1):
            jobs.append(pool.submit(_fetch_range, client, loc, rel, start, end, part))
    for job in jobs:
        job.result()
    target.parent.mkdir(parents=True, exist_ok=True)
    assembled = target.with_name(target.name + ".download")
    with open(assembled, "wb") as out:
        for i, (start, end) in enumerate(ranges):
            with open(partial / f"{i:06d}-{start}-{end}", "rb") as fh:
                shutil.copyfileobj(fh, out, length=1024 * 1024)
    if sha256_file(assembled) != meta["sha256"]:
        assembled.unlink()
        shutil.rmtree(partial)
        raise ManifestError(f"{loc.key(rel)}: downloaded bytes do not match the manifest sha256; "
                            "the S3 copy is corrupt, stage the model again")
    os.replace(assembled, target)
    shutil.rmtree(partial)
    return True


def _cache_matches(cache: Path, manifest: dict[str, Any]) -> bool:
    """True when the cache holds this exact manifest and every file verifies against it."""
    try:
        local = read_manifest(cache)
        if local["files"] != manifest["files"]:
            return False
        verify_manifest(cache)
    except ManifestError:
        return False
    return True


def download_directory(
    uri: str,
    cache: str | Path,
    client=None,
    workers: int = 8,
    part_bytes: int = PART_BYTES,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Mirror a staged S3 prefix into ``cache``, verified against its manifest; returns what happened.

    Files whose cached copy matches the manifest are not downloaded again; interrupted downloads resume
    from their completed byte ranges.
    """
    cache = Path(cache)
    client = client or s3_client()
    loc = parse_s3_uri(uri)
    manifest = remote_manifest(uri, client)
    if manifest is None:
        raise FileNotFoundError(f"{uri}{MANIFEST_NAME} not found: nothing is staged at {uri} "
                                f"(run notebooks/stage_models.ipynb for this model)")
    if (cache / MANIFEST_NAME).is_file():
        if _cache_matches(cache, manifest):
            return {"downloaded": [], "skipped": sorted(manifest["files"]), "cache": str(cache)}
        # The per-file pass below re-fetches exactly the files that do not match.
        (cache / MANIFEST_NAME).unlink()
    cache.mkdir(parents=True, exist_ok=True)
    downloaded, skipped = [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for rel, meta in sorted(manifest["files"].items()):
            fetched = _download_file(client, loc, rel, meta, cache, part_bytes, pool)
            (downloaded if fetched else skipped).append(rel)
            if progress is not None:
                progress(f"{'downloaded' if fetched else 'cached'} {rel}")
    # The manifest is written last: its presence means the cache is complete.
    tmp = cache / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cache / MANIFEST_NAME)
    partial = cache / ".partial"
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()
    return {"downloaded": downloaded, "skipped": skipped, "cache": str(cache)}
