"""Cache the frozen T5's caption features beside the images (Ray Data actor pool), resumable.

    dataset shards --from_items(shard names)--> map_batches(EncodeShards, actor pool, GPU or CPU)
        each actor: read a shard row group by row group -> T5 features of the captions
                    -> output shard (input columns + t5_features + t5_tokens), then its commit marker
    driver --> manifest (last), with the encoder, width and prompt length the features were made with

Training with `data.text_features=true` then reads the features instead of running T5 in every
Train worker (jobs/train/data.py), which frees the encoder's GPU memory and compute. The output
mirrors its input row for row and row group for row group, so a run's sample order is the same
on either dataset.

What is stored: only a caption's real tokens, as float16 bytes of [tokens, width] (`t5_features`)
with the count (`t5_tokens`). The padded positions carry nothing: `FrozenT5` zeroes them and
MM-JiT replaces them with its mask token, so padding them back with zeros on read is exact. A
null caption is encoded as the empty string, as the online encoder does. Features that overflow
float16 are an error naming the row, never stored as inf.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.text_encoder import TextEncoderConfig
from pipelines import manifest as manifest_lib
from pipelines import retry, storage

COMMIT_DIR = manifest_lib.COMMIT_DIR
FEATURES_COLUMN = "t5_features"          # float16 bytes of [t5_tokens, width]
TOKENS_COLUMN = "t5_tokens"              # real tokens kept (<= prompt_length)
FEATURE_FIELDS = (pa.field(FEATURES_COLUMN, pa.binary()), pa.field(TOKENS_COLUMN, pa.int32()))


@dataclass
class EncodeTextConfig:
    data: str = ""                       # dataset folder (local or s3://) with its manifest
    out: str = ""                        # output dataset folder
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)   # the one training will name
    caption_column: str = "caption"
    batch_size: int = 64                 # captions per encoder call
    concurrency: int = 1                 # encoder actors
    num_gpus: float = 0.0                # per actor; 0 = CPU
    num_cpus: float = 1.0                # per actor


def fingerprint_of(config: EncodeTextConfig, input_manifest_sha: str) -> str:
    settings = {"encoder": config.text_encoder.name_or_path, "prompt_length": config.text_encoder.prompt_length,
                "dtype": config.text_encoder.dtype, "caption_column": config.caption_column, "input": input_manifest_sha}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def decode_features(data: bytes, tokens: int, width: int) -> np.ndarray:
    """`t5_features` bytes -> float16 [tokens, width]."""
    return np.frombuffer(data, dtype=np.float16).reshape(tokens, width)


class EncodeShards:
    """Ray Data stage: one frozen T5 per actor; each call encodes and writes whole shards."""

    def __init__(self, config: dict[str, Any], fingerprint: str):
        import torch

        from pipelines.config import from_dict
        from model.text_encoder import FrozenT5

        self.config = from_dict(EncodeTextConfig, config, where="encode-text config")
        self.fingerprint = fingerprint
        self.encoder = FrozenT5(self.config.text_encoder, "cuda" if torch.cuda.is_available() else "cpu")

    def encode(self, captions: list[str | None], where: str, keys: list) -> tuple[list[bytes], list[int]]:
        """captions -> (float16 bytes of each caption's real tokens, token counts)."""
        import torch

        blobs, counts = [], []
        step = self.config.batch_size
        for i in range(0, len(captions), step):
            feats, mask = self.encoder([c or "" for c in captions[i:i + step]])
            # One copy to the host and one finiteness check per batch (padding is zero, so whole rows can be checked).
            half = feats.to(torch.float16).cpu().numpy()
            ns = mask.sum(dim=1).tolist()
            bad = np.flatnonzero(~np.isfinite(half).all(axis=(1, 2)))
            if len(bad):
                j = int(bad[0])
                raise ValueError(f"{where}: T5 features of row {keys[i + j]!r} overflow float16 "
                                 f"(max |x| {feats[j].abs().max().item():.3g}); this encoder needs wider storage")
            blobs += [half[j, :n].tobytes() for j, n in enumerate(ns)]
            counts += ns
        return blobs, counts

    @retry.in_stage("encode-text")
    def write_shard(self, name: str) -> dict[str, Any]:
        cfg = self.config
        uri = storage.join(cfg.data, name)
        fs, path = storage.resolve(uri)
        try:
            source = pq.ParquetFile(fs.open_input_file(path))
            schema = source.schema_arrow
        except (OSError, ValueError) as err:          # ArrowInvalid is a ValueError
            raise ValueError(f"encode-text: input shard {uri} is not readable Parquet: {err}") from err
        if cfg.caption_column not in schema.names:
            raise ValueError(f"encode-text: input shard {uri} has no {cfg.caption_column!r} column (columns: {', '.join(schema.names)})")
        keep = [n for n in schema.names if n not in (FEATURES_COLUMN, TOKENS_COLUMN)]   # re-encoding replaces
        out_schema = pa.schema([schema.field(n) for n in keep] + list(FEATURE_FIELDS))
        sink = pa.BufferOutputStream()
        rows = truncated = 0
        with pq.ParquetWriter(sink, out_schema) as writer:
            for g in range(source.num_row_groups):             # one output row group per input row group
                table = source.read_row_group(g, columns=keep)
                captions = table.column(cfg.caption_column).to_pylist()
                keys = table.column("key").to_pylist() if "key" in keep else list(range(rows, rows + len(captions)))
                blobs, counts = self.encode(captions, uri, keys)
                truncated += sum(n == cfg.text_encoder.prompt_length for n in counts)
                table = table.append_column(FEATURE_FIELDS[0], pa.array(blobs, pa.binary()))
                table = table.append_column(FEATURE_FIELDS[1], pa.array(counts, pa.int32()))
                writer.write_table(table, row_group_size=max(1, table.num_rows))
                rows += table.num_rows
        data = sink.getvalue().to_pybytes()
        storage.write_bytes(storage.join(cfg.out, name), data)
        marker = {"shard": name, "rows": rows, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                  "fingerprint": self.fingerprint, "width": self.encoder.dim, "at_prompt_length": truncated}
        stem = name.rsplit(".", 1)[0]
        storage.write_bytes(storage.join(cfg.out, COMMIT_DIR, f"{stem}.json"), (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode())
        return marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"marker": np.array([json.dumps(self.write_shard(str(n))) for n in batch["shard"]], dtype=object)}


@retry.in_stage("encode-text")
def run(config: EncodeTextConfig) -> manifest_lib.StageResult:
    """Encode `config.data`'s captions into `config.out` (resuming committed shards). Ray must be up."""
    import ray
    from tqdm import tqdm

    from pipelines.config import to_dict

    if not config.data or not config.out:
        raise ValueError("encode-text needs both data (a dataset folder) and out (the output folder)")
    if storage.join(config.data, "") == storage.join(config.out, ""):
        raise ValueError(f"encode-text out must differ from data ({config.data}): shards are never rewritten in place")
    if config.batch_size < 1 or config.concurrency < 1:
        raise ValueError("encode-text batch_size and concurrency must be >= 1")
    start = time.perf_counter()
    source = manifest_lib.read(config.data)
    input_entry = manifest_lib.input_entry(storage.join(config.data, manifest_lib.MANIFEST_NAME))
    fingerprint = fingerprint_of(config, input_entry.sha256)
    names = [s.path for s in source.shards]

    manifest_uri = storage.join(config.out, manifest_lib.MANIFEST_NAME)
    markers = manifest_lib.committed_markers(config.out, fingerprint, "encoded from other inputs or settings")
    todo = [n for n in names if n not in markers]
    new = []
    if todo:
        storage.delete(manifest_uri)                      # not complete until the new manifest is written
        ds = ray.data.from_items([{"shard": n} for n in todo], override_num_blocks=len(todo)).map_batches(
            EncodeShards, fn_constructor_args=(to_dict(config), fingerprint), batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=config.concurrency),
            num_gpus=config.num_gpus or None, num_cpus=config.num_cpus)
        with tqdm(total=len(names), initial=len(names) - len(todo), desc="encode-text", unit="shard",
                  file=sys.stderr, dynamic_ncols=True, mininterval=0.5) as progress:
            for row in ds.iter_rows():
                new.append(json.loads(row["marker"]))
                progress.update(1)
    for m in new:
        markers[m["shard"]] = m
    ordered = [markers[n] for n in names]
    widths = {m["width"] for m in ordered}
    if len(widths) != 1:
        raise ValueError(f"{config.out}: shards were encoded at different widths {sorted(widths)}")
    rows = sum(m["rows"] for m in ordered)
    stats = {"encoder": config.text_encoder.name_or_path, "width": widths.pop(), "prompt_length": config.text_encoder.prompt_length,
             "encoder_dtype": config.text_encoder.dtype, "storage_dtype": "float16", "features_column": FEATURES_COLUMN,
             "tokens_column": TOKENS_COLUMN, "rows": rows,
             "at_prompt_length": sum(m["at_prompt_length"] for m in ordered)}
    manifest = manifest_lib.Manifest(
        kind="encode_text", config={k: v for k, v in to_dict(config).items() if k not in ("out", "data")},
        inputs=[input_entry],
        shards=[manifest_lib.FileEntry(path=m["shard"], sha256=m["sha256"], bytes=m["bytes"], rows=m["rows"]) for m in ordered],
        stats={**source.stats, "encode_text": stats},
    )
    uri = manifest_lib.write(config.out, manifest)
    return manifest_lib.StageResult(stats=stats, shards_run=len(new), shards_skipped=len(names) - len(todo),
                            rows_this_run=sum(m["rows"] for m in new), seconds=time.perf_counter() - start, manifest_uri=uri)


def features_of(root: str) -> dict[str, Any]:
    """The encode-text stats of a dataset folder (what its features were made with); a clear
    error when the dataset has no cached features."""
    stats = manifest_lib.read(root).stats.get("encode_text")
    if not stats:
        raise ValueError(f"data.text_features is set but dataset {root} has no cached T5 features "
                         f"(run `minit2i encode-text {root} <folder>` and train on that folder)")
    return stats


def summary(result: manifest_lib.StageResult) -> str:
    s = result.stats
    speed = result.rows_this_run / result.seconds if result.seconds > 0 else 0.0
    return (f"encode-text: {s['rows']} captions -> {s['features_column']} ({s['encoder']}, width {s['width']}, "
            f"prompt length {s['prompt_length']}, {s['at_prompt_length']} at the length limit)\n"
            f"  shards run {result.shards_run}, skipped (committed) {result.shards_skipped}; "
            f"{result.rows_this_run} rows in {result.seconds:.1f}s = {speed:.1f} rows/s\n")
