"""`minit2i encode-text` (pipelines/text_features.py) on real Ray Data with the tiny T5 loaded by
the real loading code: the cached features are what the online encoder computes, the output
mirrors its input's row groups, re-runs resume, and bad input is a clear error that loses nothing."""

from __future__ import annotations

import gc
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.train.data import DataConfig, ReadRows, build_index
from model.text_encoder import FrozenT5, TextEncoderConfig
from pipelines import manifest, storage, text_features
from tests.conftest import OUTAGE, run_cli
from tests.jobs.train.fixtures import make_dataset

L = 24   # prompt length: the longest captions ("a yellow square on the right") reach it in ByT5 bytes


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_encode_text_caches_the_online_features_mirrors_row_groups_and_resumes(ray_session, tmp_path):
    data = make_dataset(str(tmp_path / "squares"), n=20, size=8, shards=2, failed=(3,), empty_shard=True, row_group_size=4)
    out = tmp_path / "squares-t5"
    cfg = text_features.EncodeTextConfig(data=data, out=str(out), text_encoder=TextEncoderConfig("tiny-t5", prompt_length=L),
                                         batch_size=3)
    result = text_features.run(cfg)
    assert (result.shards_run, result.shards_skipped) == (3, 0)
    stats = manifest.read(str(out)).stats["encode_text"]
    assert stats["width"] == 64 and stats["rows"] == 20 and stats["prompt_length"] == L and stats["at_prompt_length"] > 0
    assert manifest.verify(str(out)) == []

    online = FrozenT5(TextEncoderConfig("tiny-t5", prompt_length=L))
    for name in ("shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"):
        src, dst = pq.ParquetFile(Path(data) / name), pq.ParquetFile(out / name)
        assert [src.metadata.row_group(g).num_rows for g in range(src.num_row_groups)] == \
               [dst.metadata.row_group(g).num_rows for g in range(dst.num_row_groups)]
        table = dst.read()
        assert table.column_names == src.schema_arrow.names + ["t5_features", "t5_tokens"]
        assert table.drop_columns(["t5_features", "t5_tokens"]).equals(src.read())
        if not table.num_rows:
            continue
        feats, mask = online(table.column("caption").to_pylist())
        for i, (blob, n) in enumerate(zip(table.column("t5_features").to_pylist(), table.column("t5_tokens").to_pylist())):
            assert n == int(mask[i].sum())
            cached = text_features.decode_features(blob, n, 64).astype(np.float32)
            np.testing.assert_allclose(cached, feats[i, :n].numpy(), rtol=2e-3, atol=2e-3)    # float16 storage

    # Re-running skips every committed shard; a lost shard is redone byte for byte.
    again = text_features.run(cfg)
    assert (again.shards_run, again.shards_skipped) == (0, 3)
    before = sha(out / "shard-00001.parquet")
    (out / "shard-00001.parquet").unlink()
    (out / "_commits" / "shard-00001.json").unlink()
    redo = text_features.run(cfg)
    assert (redo.shards_run, redo.shards_skipped) == (1, 2) and sha(out / "shard-00001.parquet") == before
    # Other settings into the same folder are refused.
    with pytest.raises(ValueError, match="encoded from other inputs or settings"):
        text_features.run(replace(cfg, text_encoder=TextEncoderConfig("tiny-t5", prompt_length=L + 8)))

    # The training reader pads the cached features back to [L, C] with the mask the encoder made.
    index = build_index(DataConfig(datasets=[str(out)], text_features=True))
    assert index.text == {"encoder": "tiny-t5", "width": 64, "prompt_length": L}
    reader = ReadRows(index, DataConfig(datasets=[str(out)], text_features=True))
    batch = reader({"data": np.arange(4)})
    assert batch["features"].shape == (4, L, 64) and batch["features"].dtype == np.float16
    feats, mask = online(list(batch["caption"]))
    np.testing.assert_array_equal(batch["text_mask"], mask.numpy())
    np.testing.assert_allclose(batch["features"].astype(np.float32), feats.numpy(), rtol=2e-3, atol=2e-3)
    # A row whose features are malformed becomes a counted skip (no image), never a crash.
    rows = [{"key": "ok", "image": b"x", "t5_features": np.zeros((2, 64), np.float16).tobytes(), "t5_tokens": 2},
            {"key": "bad", "image": b"x", "t5_features": b"\x00" * 10, "t5_tokens": 2}]
    features, text_mask = reader._features(rows)
    assert rows[0]["image"] == b"x" and rows[1]["image"] is None
    assert text_mask[0].sum() == 2 and text_mask[1].sum() == 0 and not features[1].any()
    # Training on a dataset without cached features, asking for them, is a clear error.
    with pytest.raises(ValueError, match="has no cached T5 features .*minit2i encode-text"):
        build_index(DataConfig(datasets=[data], text_features=True))


@pytest.fixture
def release_the_failed_run(caplog):
    """After the test, let the session's Ray have back what a run that failed in it held.

    Ray Data drops a failed run's actor pool, but logs the run's exception as an argument of its
    "Full stack trace" record, and the exception's traceback references the encode actor (with the
    CPU it holds on the session's instance). pytest keeps the test's log records until its teardown,
    and the traceback's reference cycle then waits for Python's cyclic collector: in a suite run the
    every-other-CPU ingest test, later on the same instance, waited its whole 60 s for that CPU."""
    yield
    caplog.get_records("call").clear()
    gc.collect()


def test_encode_text_names_a_corrupt_shard_and_keeps_what_it_committed(ray_session, tmp_path, release_the_failed_run):
    data = make_dataset(str(tmp_path / "squares"), n=12, size=8, shards=3)
    (Path(data) / "shard-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    out = tmp_path / "t5"
    cfg = text_features.EncodeTextConfig(data=data, out=str(out), text_encoder=TextEncoderConfig("tiny-t5", prompt_length=L))
    with pytest.raises(Exception, match=r"shard-00001\.parquet is not readable Parquet"):
        text_features.run(cfg)
    assert not (out / "manifest.json").exists()
    for marker in manifest.read_markers(str(out)).values():       # whatever was committed is intact
        assert sha(out / marker["shard"]) == marker["sha256"]


def test_encode_text_cli_on_s3(ray_session, tmp_path, s3_server, s3_faults, cli):
    """The command on S3, joining the session's Ray as a job on a cluster does, rides out the tests'
    outage of SlowDown from its second shard's upload on with the tests' retry budget (conftest.py)."""
    data = make_dataset("s3://test-bucket/encode/squares", n=8, size=8, shards=2)
    s3_faults.outage_on("encode/squares-t5/shard-00001.parquet", OUTAGE)
    try:
        proc = run_cli("encode-text", data, "s3://test-bucket/encode/squares-t5",
                       "text_encoder.prompt_length=16", "batch_size=4",
                       env={"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
        print(s3_faults.recovery("encode-text"))
    finally:
        s3_faults.clear()
    assert "encode-text: PUT s3://test-bucket/encode/squares-t5/shard-00001.parquet" in proc.stderr
    assert "SlowDown" in proc.stderr
    assert manifest.strays("s3://test-bucket/encode/squares-t5") == []
    assert "encode-text: 8 captions -> t5_features (tiny-t5, width 64, prompt length 16" in proc.stdout
    assert storage.exists("s3://test-bucket/encode/squares-t5/manifest.json")
    code, _, error = cli("encode-text", data, "s3://test-bucket/encode/x", "text_encoder.prompt_lenght=16")
    assert code == 2 and "prompt_lenght" in error
