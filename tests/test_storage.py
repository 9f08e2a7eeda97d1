"""Upload, download, resume and skip against a real S3 endpoint on 127.0.0.1."""

from __future__ import annotations

import os

import pytest

from wmtp_lib import storage
from wmtp_lib.loaders import ManifestError, verify_manifest, write_manifest


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


def test_corrupted_cache_file_is_fetched_again(tmp_path, s3_env):
    uri = f"s3://{s3_env}/models/tiny/"
    src = _staged_dir(tmp_path)
    storage.upload_directory(src, uri)
    cache = tmp_path / "cache"
    storage.download_directory(uri, cache)
    data = bytearray((cache / "model.safetensors").read_bytes())
    data[5] ^= 1
    (cache / "model.safetensors").write_bytes(bytes(data))
    client = CountingClient(storage.s3_client())
    result = storage.download_directory(uri, cache, client=client)
    assert result["downloaded"] == ["model.safetensors"]
    assert {k for k, _ in client.ranges} == {"models/tiny/model.safetensors"}
    verify_manifest(cache)


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
