"""S3 storage of staged directories and the local cache (DESIGN §5).

boto3 with the standard credential chain; ``AWS_ENDPOINT_URL`` is honoured (tests use a local S3
endpoint). A directory is uploaded file by file with its ``manifest.json`` last, so a prefix with a
manifest is complete. Downloads go to a local cache: each file is fetched in byte ranges by parallel
workers into ``<cache>/.partial/``, completed ranges survive an interruption (resume), the assembled
file is checked against the manifest's sha256 and renamed into place. A cache that already holds the
manifest is checked by file sizes on every launch (seconds for 27 GB) and re-hashed in full only on demand
(``rehash=True``, or ``python -m wmtp_lib.checkpoints verify DIR``) or when a size does not match. Transfers
show byte progress (tqdm). ``python -m wmtp_lib.checkpoints pull-run`` brings one earlier run back from S3 with
only its newest complete checkpoint (what ``docker/vessl.yaml`` does before a job).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from wmtp_lib.checkpoints.manifest import (
    MANIFEST_NAME,
    ManifestError,
    read_manifest,
    sha256_file,
    verify_manifest,
)

DEFAULT_REGION = "eu-north-1"
PART_BYTES = 64 * 1024 * 1024
COPY_BYTES = 1024 * 1024


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


def byte_bar(total: int, desc: str):
    """A tqdm bar in bytes; boto3's transfer callbacks and the range readers call its ``update(n)``.

    At most one refresh in 5 s, so a log file that receives the bar (training's stdout) stays short.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, mininterval=5.0)


def upload_directory(local: str | Path, uri: str, client=None, workers: int = 8) -> dict[str, Any]:
    """Upload a staged directory (its manifest must verify) to ``uri``; the manifest goes last."""
    from boto3.s3.transfer import TransferConfig

    local = Path(local)
    manifest = verify_manifest(local)
    loc = parse_s3_uri(uri)
    client = client or s3_client()
    config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=workers)
    with byte_bar(sum(m["size"] for m in manifest["files"].values()), f"upload {uri}") as bar:
        for rel in manifest["files"]:
            client.upload_file(str(local / rel), loc.bucket, loc.key(rel), Config=config, Callback=bar.update)
    client.upload_file(str(local / MANIFEST_NAME), loc.bucket, loc.key(MANIFEST_NAME))
    return manifest


def _part_ranges(size: int, part_bytes: int) -> list[tuple[int, int]]:
    if size == 0:
        return []
    return [(start, min(size, start + part_bytes) - 1) for start in range(0, size, part_bytes)]


def _fetch_range(client, loc: S3Location, rel: str, start: int, end: int, dest: Path,
                 on_bytes: Callable[[int], Any] = lambda n: None) -> None:
    body = client.get_object(Bucket=loc.bucket, Key=loc.key(rel), Range=f"bytes={start}-{end}")["Body"]
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as fh:
        while chunk := body.read(COPY_BYTES):
            fh.write(chunk)
            on_bytes(len(chunk))
    if tmp.stat().st_size != end - start + 1:
        raise IOError(f"short read for {loc.key(rel)} bytes {start}-{end}")
    os.replace(tmp, dest)


def _download_file(client, loc: S3Location, rel: str, meta: dict[str, Any], cache: Path, part_bytes: int,
                   pool: ThreadPoolExecutor, on_bytes: Callable[[int], Any]) -> bool:
    """Bring one file into the cache; returns False when the cached copy already matched (size and sha256)."""
    target = cache / rel
    if target.is_file() and target.stat().st_size == meta["size"] and sha256_file(target) == meta["sha256"]:
        on_bytes(meta["size"])
        return False
    partial = cache / ".partial" / rel.replace("/", "__")
    partial.mkdir(parents=True, exist_ok=True)
    ranges = _part_ranges(meta["size"], part_bytes)
    # A part file only exists once its range was read in full (written to .tmp, then renamed).
    jobs = []
    for i, (start, end) in enumerate(ranges):
        part = partial / f"{i:06d}-{start}-{end}"
        if not (part.is_file() and part.stat().st_size == end - start + 1):
            jobs.append(pool.submit(_fetch_range, client, loc, rel, start, end, part, on_bytes))
        else:
            on_bytes(end - start + 1)
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


def _cache_matches(cache: Path, manifest: dict[str, Any], rehash: bool) -> bool:
    """True when the cache holds this exact manifest and every file has its size (and sha256 if ``rehash``)."""
    try:
        local = read_manifest(cache)
        if local["files"] != manifest["files"]:
            return False
        verify_manifest(cache, check_hashes=rehash)
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
    rehash: bool = False,
) -> dict[str, Any]:
    """Mirror a staged S3 prefix into ``cache``, verified against its manifest; returns what happened.

    A complete cache of the same manifest is accepted when every size matches (``rehash=True`` also
    re-hashes every file); otherwise each file is checked by size and sha256 and only mismatching files are
    fetched, resuming interrupted downloads from their completed byte ranges. Progress is a bar in bytes.
    """
    cache = Path(cache)
    client = client or s3_client()
    loc = parse_s3_uri(uri)
    manifest = remote_manifest(uri, client)
    if manifest is None:
        raise FileNotFoundError(f"{uri}{MANIFEST_NAME} not found: nothing is staged at {uri} "
                                f"(run notebooks/stage_models.ipynb for this model)")
    if (cache / MANIFEST_NAME).is_file():
        if _cache_matches(cache, manifest, rehash):
            return {"downloaded": [], "skipped": sorted(manifest["files"]), "cache": str(cache)}
        # The per-file pass below re-fetches exactly the files that do not match.
        (cache / MANIFEST_NAME).unlink()
    cache.mkdir(parents=True, exist_ok=True)
    downloaded, skipped = [], []
    total = sum(meta["size"] for meta in manifest["files"].values())
    with ThreadPoolExecutor(max_workers=workers) as pool, byte_bar(total, f"download {uri}") as bar:
        for rel, meta in sorted(manifest["files"].items()):
            fetched = _download_file(client, loc, rel, meta, cache, part_bytes, pool, bar.update)
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


# ------------------------------------------------------------------------------------ earlier runs
CHECKPOINT_DIR = re.compile(r"^checkpoints/((mtp|value)-(\d+))/")


def _newest_complete_checkpoint(keys: list[str]) -> str | None:
    """Name of the checkpoint a resume would load: newest complete ``mtp-*``, else newest complete ``value-*``."""
    complete = {m.group(1): (m.group(2), int(m.group(3))) for k in keys
                if (m := CHECKPOINT_DIR.match(k)) and k == f"checkpoints/{m.group(1)}/COMPLETE"}
    for stage in ("mtp", "value"):
        steps = [(step, name) for name, (st, step) in complete.items() if st == stage]
        if steps:
            return max(steps)[1]
    return None


def pull_run(uri: str, dest: str | Path, client=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Bring one earlier run (``s3://…/runs/<run>/``) into ``dest`` for a resume, with only its newest checkpoint.

    Older checkpoints (model + optimizer state, tens of GB each at 7B) are left in S3. Files already in
    ``dest`` with the same size are kept. A prefix with nothing under it is a first launch: nothing to pull.
    """
    loc = parse_s3_uri(uri)
    client = client or s3_client()
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.prefix):
        for obj in page.get("Contents", []):
            objects[obj["Key"][len(loc.prefix):]] = obj["Size"]
    if not objects:
        log(f"no earlier run at {uri}: starting fresh")
        return {"downloaded": [], "skipped": [], "left_in_s3": [], "checkpoint": None}
    keep = _newest_complete_checkpoint(list(objects))
    wanted = {rel: size for rel, size in objects.items()
              if not (m := CHECKPOINT_DIR.match(rel)) or m.group(1) == keep}
    dest = Path(dest)
    todo = {rel: size for rel, size in wanted.items()
            if not ((dest / rel).is_file() and (dest / rel).stat().st_size == size)}
    with byte_bar(sum(todo.values()), f"pull {uri}") as bar:
        for rel in sorted(todo):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            tmp = dest / (rel + ".download")
            client.download_file(loc.bucket, loc.key(rel), str(tmp), Callback=bar.update)
            os.replace(tmp, dest / rel)
    left = sorted({m.group(1) for rel in objects if (m := CHECKPOINT_DIR.match(rel)) and m.group(1) != keep})
    log(f"pulled {uri} -> {dest}: {len(todo)} files ({sum(todo.values()) / 2**30:.2f} GiB), "
        f"{len(wanted) - len(todo)} already here, checkpoint {keep or 'none'}; left in S3: {left or 'nothing'}")
    return {"downloaded": sorted(todo), "skipped": sorted(set(wanted) - set(todo)), "left_in_s3": left,
            "checkpoint": keep}
