"""`minit2i manifest show|verify|diff` (jobs/manifest_cli.py over pipelines/manifest.py), run as the
real CLI on small real Parquet datasets."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import manifest, storage
from tests.conftest import run_cli


def _build(root, rows_per_shard=(3, 2), config=None, offset=0):
    """A dataset folder written the way the pipelines write one: shards, then the manifest."""
    root.mkdir()
    (root / "urls.tsv").write_text("http://a/1.jpg\tone\n")
    shards = []
    for i, n in enumerate(rows_per_shard):
        path = root / f"shard-{i:05d}.parquet"
        pq.write_table(pa.table({"key": [f"{i}{j:04d}" for j in range(n)], "v": [offset + j for j in range(n)]}), path)
        shards.append(manifest.shard_entry(str(root), str(path), n))
    m = manifest.Manifest(kind="fetch", config=config or {"shard_size": 3, "image_size": 512},
                          inputs=[manifest.input_entry(str(root / "urls.tsv"))], shards=shards,
                          stats={"fetch": {"rows": sum(rows_per_shard), "success_rate": 0.5}})
    manifest.write(str(root), m)
    return str(root)


def test_show_and_verify(tmp_path):
    root = _build(tmp_path / "a")
    shown = run_cli("manifest", "show", root).stdout
    for needle in ("kind      fetch", "shards    2   rows 5", "shard_size = 3", "fetch.success_rate = 0.5",
                   "shard-00001.parquet  rows 2", "urls.tsv  sha256"):
        assert needle in shown, needle
    raw = json.loads(run_cli("manifest", "show", root, "json=true").stdout)
    assert raw["kind"] == "fetch" and len(raw["shards"]) == 2
    assert "2 shards, 0 problem(s): OK" in run_cli("manifest", "verify", root).stdout

    # Same size, different bytes: caught by the hash, reported per shard, exit status 1.
    path = tmp_path / "a" / "shard-00000.parquet"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    (tmp_path / "a" / "shard-00001.parquet").unlink()
    bad = run_cli("manifest", "verify", root, check=False)
    assert bad.returncode == 1
    assert "MISMATCH shard-00000.parquet: sha256" in bad.stdout and "MISMATCH shard-00001.parquet: missing" in bad.stdout


def test_diff_is_readable(tmp_path):
    a = _build(tmp_path / "a")
    out = run_cli("manifest", "diff", a, a)
    assert out.stdout.splitlines()[2] == "identical: same inputs, config, code version and shard hashes"

    b = _build(tmp_path / "b", rows_per_shard=(3, 2, 4), config={"shard_size": 4, "image_size": 512}, offset=1)
    d = run_cli("manifest", "diff", a, b, check=False)
    assert d.returncode == 1
    lines = d.stdout.splitlines()
    assert "config.shard_size: 3 -> 4" in lines
    assert "rows: 5 -> 9" in lines
    assert "shards added (1): shard-00002.parquet" in lines
    assert "shards changed (2): shard-00000.parquet, shard-00001.parquet" in lines
    assert "stats.fetch.rows: 5 -> 9" in lines


def test_missing_manifest_is_a_clean_error(tmp_path):
    (tmp_path / "partial").mkdir()
    proc = run_cli("manifest", "verify", tmp_path / "partial", check=False)
    assert proc.returncode == 2
    assert "error: no manifest.json in" in proc.stderr and "incomplete" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_manifest_has_no_timestamps_and_is_byte_stable(tmp_path):
    root = _build(tmp_path / "a")
    first = storage.read_bytes(storage.join(root, "manifest.json"))
    manifest.write(root, manifest.read(root))
    assert storage.read_bytes(storage.join(root, "manifest.json")) == first


def test_local_manifest_write_needs_no_s3_client(tmp_path, monkeypatch):
    # A local dataset folder has no multipart uploads to abort: writing its manifest must not build an
    # S3 client (boto3 is absent from some GPU images; a bare `import boto3` failed there).
    def no_client():
        raise AssertionError("an S3 client was built for a local folder")

    monkeypatch.setattr(storage, "s3_client", no_client)
    root = _build(tmp_path / "local")
    assert storage.abort_uploads(root) == []
    assert manifest.read(root).kind == "fetch"
