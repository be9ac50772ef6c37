"""pipelines/retry.py and the storage calls under it, against the loopback S3 server behind the
fault proxy (tests/fault_proxy.py): outages, dropped writes, permanent errors; and a full local disk."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import boto3
import pytest
from botocore.exceptions import ClientError

from pipelines import retry, storage
from tests.conftest import ROOT


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def test_policy_from_the_one_variable_and_errors_classified(monkeypatch):
    monkeypatch.setenv(retry.ENV, "budget=42,max_delay=3")
    p = retry.policy()
    assert (p.budget, p.first_delay, p.max_delay) == (42, 0.5, 3)
    assert retry.RetryPolicy.from_env(p.to_env()) == p
    monkeypatch.setenv(retry.ENV, "budgte=1")
    with pytest.raises(ValueError, match="unknown key 'budgte'"):
        retry.policy()
    monkeypatch.delenv(retry.ENV)
    assert retry.policy().budget == 600              # the default outlasts a 5-minute outage
    # Waits grow to max_delay and stay there; full jitter, never below a tenth of the ceiling.
    import random
    waits = [retry.RetryPolicy().delay(n, random.Random(n)) for n in range(1, 12)]
    assert all(0.05 <= w <= 30 for w in waits) and max(waits[8:]) > 3
    for err in (_client_error("SlowDown", 503), _client_error("InternalError", 500), ConnectionResetError(104, "reset"),
                TimeoutError("read timed out"), OSError("AWS Error SLOW_DOWN during PutObject operation")):
        assert retry.is_transient(err), err
    for err in (_client_error("AccessDenied", 403), _client_error("NoSuchBucket", 404), FileNotFoundError("x"),
                ValueError("bad"), OSError(28, "No space left on device")):
        assert not retry.is_transient(err), err
    assert retry.describe(_client_error("SlowDown", 503)) == "SlowDown: m (HTTP 503)"


def _wait_out(proxy, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while proxy.in_outage and time.monotonic() < deadline:
        time.sleep(0.1)


def test_storage_rides_out_an_outage_and_dropped_writes_and_names_what_failed(s3_server, s3_faults, s3_moto, capfd):
    root = "s3://test-bucket/retry"
    s3_faults.outage(3)
    try:
        with retry.using(stage="unit"):
            storage.write_bytes(f"{root}/a.bin", b"a" * 1000)        # survives 3 s of SlowDown
            err = capfd.readouterr().err
            assert f"unit: PUT {root}/a.bin (1,000 bytes) failed (SlowDown: Please reduce your request rate. (HTTP 503))" in err
            assert storage.read_bytes(f"{root}/a.bin") == b"a" * 1000
            # Half the writes land but their answers are cut: each is retried, the object is whole.
            s3_faults.drop_writes(0.5, seed=3)
            for i in range(6):
                storage.write_bytes(f"{root}/d{i}.bin", bytes([i]) * 5000)
            s3_faults.clear()
            assert s3_faults.counters.dropped_writes >= 1
            assert [storage.read_bytes(f"{root}/d{i}.bin") for i in range(6)] == [bytes([i]) * 5000 for i in range(6)]
            assert storage.open_uploads(root) == [] and storage.temp_files(root) == []
            # Longer than the budget: one error naming the stage, the object and S3's words; resumable.
            s3_faults.outage(4)
            with retry.using(policy=retry.RetryPolicy(budget=1, first_delay=0.2, max_delay=0.5)):
                with pytest.raises(retry.StorageUnavailable, match=rf"unit: GET {root}/a.bin still failing .*SlowDown"):
                    storage.read_bytes(f"{root}/a.bin")
            _wait_out(s3_faults)
            # Permanent errors are not retried.
            before = s3_faults.counters.requests
            with pytest.raises(ClientError, match="NoSuchBucket"):
                storage.write_bytes("s3://no-such-bucket/x", b"x")
            assert s3_faults.counters.requests == before + 1
    finally:
        s3_faults.clear()


def test_manifest_write_sweeps_open_uploads_and_verify_reports_strays(s3_server, s3_moto, tmp_path):
    from pipelines import manifest

    root = "s3://test-bucket/strays"
    storage.write_bytes(f"{root}/shard-00000.parquet", b"PAR1")
    entry = manifest.shard_entry(root, f"{root}/shard-00000.parquet", rows=0)
    s3 = boto3.client("s3", endpoint_url=s3_moto)
    s3.create_multipart_upload(Bucket="test-bucket", Key="strays/shard-00001.parquet")   # a cut pyarrow write
    storage.write_bytes(f"{root}/shard-00009.parquet", b"PAR1")                          # another build's shard
    assert len(storage.open_uploads(root)) == 1
    manifest.write(root, manifest.Manifest(kind="t", config={}, shards=[entry]))
    assert storage.open_uploads(root) == []                   # the closing sweep aborted it
    assert manifest.strays(root) == ["shard-00009.parquet: not in the manifest"]
    local = tmp_path / "ds"
    storage.write_bytes(str(local / "shard-00000.parquet"), b"PAR1")
    manifest.write(str(local), manifest.Manifest(kind="t", config={}, shards=[manifest.shard_entry(str(local), str(local / "shard-00000.parquet"), 0)]))
    (local / "shard-00000.parquet.tmp-1a2b3c4d").write_bytes(b"half")                     # a killed local write
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "manifest", "verify", str(local)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "STRAY shard-00000.parquet.tmp-1a2b3c4d: temporary file of an interrupted write" in proc.stdout
    assert "1 stray object(s)" in proc.stdout


def _fsize_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_is_one_line_naming_the_path_and_bytes_and_changes_nothing(tmp_path):
    out = tmp_path / "world"
    cmd = [sys.executable, "-m", "jobs.cli", "world", str(out)]
    subprocess.run([*cmd, "n=3"], cwd=ROOT, check=True, capture_output=True, timeout=120)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # The same command with more scenes, under a file-size limit below the new URL list's size.
    proc = subprocess.run([*cmd, "n=400"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=_fsize_limit(8192))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no space to write {out / 'world.tsv'}: it needs " in lines[0], lines
    assert int(lines[0].split("it needs ")[1].split(" bytes")[0].replace(",", "")) > 8192
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before       # no temp file, nothing changed


def test_the_filesystem_for_checkpoint_uploads_keeps_its_retries_in_a_worker_and_rides_out_an_outage(s3_server, s3_faults):
    """Ray Train uploads checkpoints (and Tune its experiment state) from workers with the pyarrow
    filesystem the driver built; pickled into a worker, it keeps the budget's SDK attempts."""
    import pickle

    fs = pickle.loads(pickle.dumps(storage.s3_filesystem()))
    assert isinstance(fs, storage.RetryingS3FileSystem) and fs.attempts == storage.sdk_attempts(retry.policy()) == 11
    s3_faults.outage(5)
    try:
        with fs.open_output_stream("test-bucket/retry/ckpt/model.safetensors") as f:   # a multipart upload
            f.write(b"w" * 100_000)
    finally:
        s3_faults.clear()
    assert s3_faults.counters.outage_answers >= 1
    assert storage.read_bytes("s3://test-bucket/retry/ckpt/model.safetensors") == b"w" * 100_000
    assert storage.open_uploads("s3://test-bucket/retry/ckpt") == []
