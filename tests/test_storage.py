"""Upload, download, resume and skip against a real S3 endpoint on 127.0.0.1."""

from __future__ import annotations

import os

import pytest

from wmtp_lib.checkpoints import storage
from wmtp_lib.checkpoints.manifest import ManifestError, verify_manifest, write_manifest


def _staged_dir(tmp_path, big: int = 300_000):
    d = tmp_path / "staged"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(big))
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "tokenizer.json").write_text("{}")
    write_manifest(d)
    return d


class CountingClient:
    """Wraps a boto3 client to count ranged GETs (what a download really fetched)."""

    def __init__(self, client, fail_after: int | None = None):
        self._client = client
        self.ranges: list[tuple[str, str]] = []
        self.fail_after = fail_after

    def get_object(self, **kw):
        if "Range" in kw:
            if self.fail_after is not None and len(self.ranges) >= self.fail_after:
                raise ConnectionError("simulated network drop")
            self.ranges.append((kw["Key"], kw["Range"]))
        return self._client.get_object(**kw)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_upload_then_download_round_trip(tmp_path, s3_env):
    src = _staged_dir(tmp_path)
    uri = f"s3://{s3_env}/models/tiny/"
    storage.upload_directory(src, uri)
    assert storage.remote_manifest(uri)["files"].keys() == {"model.safetensors", "config.json", "sub/tokenizer.json"}
    cache = tmp_path / "cache"
    result = storage.download_directory(uri, cache, part_bytes=64 * 1024)
    assert sorted(result["downloaded"]) == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    verify_manifest(cache)
    assert (cache / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert not (cache / ".partial").exists()


def test_verified_cache_is_not_downloaded_again(tmp_path, s3_env):
    uri = f"s3://{s3_env}/models/tiny/"
    storage.upload_directory(_staged_dir(tmp_path), uri)
    cache = tmp_path / "cache"
    storage.download_directory(uri, cache)
    client = CountingClient(storage.s3_client())
    result = storage.download_directory(uri, cache, client=client)
    assert result["downloaded"] == [] and client.ranges == []


class RecordingBar:
    """Stands in for the tqdm byte bar: records its total and every update."""

    bars: list["RecordingBar"] = []

    def __init__(self, total, desc):
        self.total, self.desc, self.updates = total, desc, []
        RecordingBar.bars.append(self)

    def update(self, n):
        self.updates.append(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_launch_checks_sizes_and_rehashes_only_on_demand_or_mismatch(tmp_path, s3_env, monkeypatch):
    uri = f"s3://{s3_env}/models/tiny/"
    src = _staged_dir(tmp_path)
    storage.upload_directory(src, uri)
    cache = tmp_path / "cache"
    storage.download_directory(uri, cache)
    hashed = []
    real_sha = storage.sha256_file
    monkeypatch.setattr(storage, "sha256_file", lambda p: hashed.append(p) or real_sha(p))
    import wmtp_lib.checkpoints.manifest as manifest
    monkeypatch.setattr(manifest, "sha256_file", lambda p: hashed.append(p) or real_sha(p))
    # a same-size corruption passes the launch check (sizes only, no hashing) ...
    data = bytearray((cache / "model.safetensors").read_bytes())
    data[5] ^= 1
    (cache / "model.safetensors").write_bytes(bytes(data))
    client = CountingClient(storage.s3_client())
    assert storage.download_directory(uri, cache, client=client)["downloaded"] == [] and hashed == []
    # ... and is found and fetched again when a full re-hash is asked for
    result = storage.download_directory(uri, cache, client=client, rehash=True)
    assert result["downloaded"] == ["model.safetensors"] and len(hashed) >= 3
    assert {k for k, _ in client.ranges} == {"models/tiny/model.safetensors"}
    verify_manifest(cache)
    # a size mismatch is caught by the launch check, and only that file is fetched again
    (cache / "config.json").write_text('{"a": 12}')
    client = CountingClient(storage.s3_client())
    assert storage.download_directory(uri, cache, client=client)["downloaded"] == ["config.json"]
    assert {k for k, _ in client.ranges} == {"models/tiny/config.json"}
    verify_manifest(cache)


def test_transfers_report_byte_progress(tmp_path, s3_env, monkeypatch):
    monkeypatch.setattr(storage, "byte_bar", RecordingBar)
    RecordingBar.bars = []
    uri = f"s3://{s3_env}/models/tiny/"
    src = _staged_dir(tmp_path)
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and p.name != "manifest.json")
    storage.upload_directory(src, uri)
    storage.download_directory(uri, tmp_path / "cache", part_bytes=64 * 1024)
    up, down = RecordingBar.bars
    assert up.total == down.total == size
    assert sum(up.updates) == size and sum(down.updates) == size
    assert len(down.updates) > 4  # ranges of 64 KiB: several updates for the 300 kB file


def test_pull_run_brings_only_the_newest_complete_checkpoint(tmp_path, s3_env):
    client = storage.s3_client()
    files = {"config.yaml": b"x: 1\n", "metrics.jsonl": b"{}\n",
             "checkpoints/mtp-0000100/model.distcp": os.urandom(5000), "checkpoints/mtp-0000100/COMPLETE": b"100",
             "checkpoints/mtp-0000200/model.distcp": os.urandom(7000), "checkpoints/mtp-0000200/COMPLETE": b"200",
             "checkpoints/mtp-0000300/model.distcp": os.urandom(100),  # being written when the job stopped
             "checkpoints/value-0000040/model.distcp": b"v", "checkpoints/value-0000040/COMPLETE": b"40"}
    for rel, body in files.items():
        client.put_object(Bucket=s3_env, Key=f"runs/r1/{rel}", Body=body)
    dest = tmp_path / "runs" / "r1"
    result = storage.pull_run(f"s3://{s3_env}/runs/r1/", dest, log=lambda m: None)
    assert result["checkpoint"] == "mtp-0000200"
    assert result["left_in_s3"] == ["mtp-0000100", "mtp-0000300", "value-0000040"]
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == ["checkpoints/mtp-0000200/COMPLETE", "checkpoints/mtp-0000200/model.distcp", "config.yaml",
                   "metrics.jsonl"]
    assert (dest / "checkpoints/mtp-0000200/model.distcp").read_bytes() == files["checkpoints/mtp-0000200/model.distcp"]
    again = storage.pull_run(f"s3://{s3_env}/runs/r1/", dest, log=lambda m: None)
    assert again["downloaded"] == [] and len(again["skipped"]) == 4
    fresh = storage.pull_run(f"s3://{s3_env}/runs/never/", tmp_path / "runs" / "never", log=lambda m: None)
    assert fresh["checkpoint"] is None and not (tmp_path / "runs" / "never").exists()


def test_interrupted_download_resumes_from_completed_parts(tmp_path, s3_env):
    uri = f"s3://{s3_env}/models/tiny/"
    src = _staged_dir(tmp_path, big=10 * 65536)  # 10 parts of 64 KiB
    storage.upload_directory(src, uri)
    cache = tmp_path / "cache"
    dropping = CountingClient(storage.s3_client(), fail_after=4)
    with pytest.raises(ConnectionError):
        storage.download_directory(uri, cache, client=dropping, workers=1, part_bytes=65536)
    assert not (cache / "manifest.json").exists()  # incomplete caches have no manifest
    done = len(dropping.ranges)
    resumed = CountingClient(storage.s3_client())
    storage.download_directory(uri, cache, client=resumed, workers=1, part_bytes=65536)
    big_parts = [r for k, r in resumed.ranges if k.endswith("model.safetensors")]
    assert done >= 1
    assert len(big_parts) == 10 - sum(1 for k, _ in dropping.ranges if k.endswith("model.safetensors"))
    assert (cache / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    verify_manifest(cache)


def test_missing_prefix_names_uri_and_staging(tmp_path, s3_env):
    with pytest.raises(FileNotFoundError, match=r"s3://.*/models/absent/manifest.json.*stage_models"):
        storage.download_directory(f"s3://{s3_env}/models/absent/", tmp_path / "c")


def test_corrupt_remote_object_is_refused(tmp_path, s3_env):
    uri = f"s3://{s3_env}/models/tiny/"
    src = _staged_dir(tmp_path)
    storage.upload_directory(src, uri)
    client = storage.s3_client()
    client.put_object(Bucket=s3_env, Key="models/tiny/config.json", Body=b'{"a": 2}')
    with pytest.raises(ManifestError, match="config.json"):
        storage.download_directory(uri, tmp_path / "cache")
    assert not (tmp_path / "cache" / "config.json").exists()


def test_upload_refuses_unverified_directory(tmp_path, s3_env):
    src = _staged_dir(tmp_path)
    (src / "config.json").write_text('{"a": 3}')
    with pytest.raises(ManifestError):
        storage.upload_directory(src, f"s3://{s3_env}/models/bad/")


def test_parse_s3_uri():
    loc = storage.parse_s3_uri("s3://wmtp/models/mtp-7b")
    assert (loc.bucket, loc.prefix, loc.uri) == ("wmtp", "models/mtp-7b/", "s3://wmtp/models/mtp-7b/")
    with pytest.raises(ValueError, match="not an s3"):
        storage.parse_s3_uri("/local/path")
