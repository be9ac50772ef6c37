"""A small generated training dataset in the data contract: coloured squares, exact captions.

Fetch-style Parquet shards (key, url, alt_text, caption, image, sizes, sha256, status, ...) with
small row groups, plus a manifest written last through pipelines.manifest.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines import manifest as manifest_lib
from pipelines import storage

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


def square_png(i: int, size: int) -> tuple[bytes, str]:
    """A deterministic image of one coloured square on a grey ground, and its caption."""
    rng = np.random.default_rng(i)
    name = list(COLOURS)[i % len(COLOURS)]
    w, h = size + (i % 3) * 4, size                    # a few non-square images to exercise the crop
    arr = np.full((h, w, 3), 128, dtype=np.uint8)
    s = size // 2
    x, y = rng.integers(0, w - s + 1), rng.integers(0, h - s + 1)
    arr[y:y + s, x:x + s] = COLOURS[name]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    pos = "left" if x + s / 2 < w / 2 else "right"
    return buf.getvalue(), f"a {name} square on the {pos}"


def make_dataset(root: str, n: int = 64, size: int = 32, shards: int = 4, prefix: str = "",
                 failed: tuple[int, ...] = (), corrupt: tuple[int, ...] = (), empty_shard: bool = False,
                 row_group_size: int = 8) -> str:
    """Write `n` rows over `shards` shards (+ an empty one if asked) and the manifest; returns root.

    Rows in `failed` are failed fetches (null image, status "failed"); rows in `corrupt` carry
    bytes that are not an image but claim success (a bad shard the trainer must survive).
    """
    entries = []
    per = -(-n // shards)
    schema = pa.schema([("key", pa.string()), ("url", pa.string()), ("alt_text", pa.string()), ("caption", pa.string()),
                        ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
                        ("original_width", pa.int32()), ("original_height", pa.int32()), ("sha256", pa.string()),
                        ("status", pa.string()), ("status_class", pa.string()), ("error", pa.string())])
    for s in range(shards + int(empty_shard)):
        rows = []
        for i in range(s * per, min(n, (s + 1) * per)) if s < shards else []:
            data, caption = square_png(i, size)
            status, image, error = "success", data, ""
            if i in failed:
                status, image, error = "failed", None, "HTTP 404"
            elif i in corrupt:
                image = b"\x89PNG\r\n\x1a\n this is not really a png"
            w, h = Image.open(io.BytesIO(data)).size
            rows.append(dict(key=f"{prefix}{i:06d}", url=f"http://127.0.0.1/{i}.png", alt_text=caption, caption=caption,
                             image=image, width=w, height=h, original_width=w, original_height=h,
                             sha256=hashlib.sha256(image).hexdigest() if image else "", status=status,
                             status_class="ok" if status == "success" else "http_4xx", error=error))
        uri = storage.join(root, f"shard-{s:05d}.parquet")
        table = pa.Table.from_pylist(rows, schema=schema)
        fs, path = storage.resolve(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            pq.write_table(table, f, row_group_size=row_group_size)
        entries.append(manifest_lib.shard_entry(root, uri, len(rows)))
    man = manifest_lib.Manifest(kind="fetch", config={"generated": "coloured squares", "n": n, "size": size},
                                shards=entries, stats={"rows": n, "failed": len(failed)})
    manifest_lib.write(root, man)
    return root


def make_world_dataset(root: str, n: int = 48, size: int = 32, shards: int = 2, relation_fraction: float = 0.3) -> str:
    """`n` synthetic-world scenes (pipelines/world.py: exact captions the world checker reads) as
    fetch-style shards with a manifest, for the critic, which labels samples with that checker."""
    from pipelines.world import WorldConfig, image_bytes, make_scene

    config = WorldConfig(seed=3, size=size, relation_fraction=relation_fraction)
    entries = []
    per = -(-n // shards)
    for s in range(shards):
        rows = [{"key": f"{i:06d}", "caption": make_scene(i, config).caption, "image": image_bytes(i, config),
                 "status": "success"} for i in range(s * per, min(n, (s + 1) * per))]
        uri = storage.join(root, f"shard-{s:05d}.parquet")
        fs, path = storage.resolve(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            pq.write_table(pa.Table.from_pylist(rows), f, row_group_size=8)
        entries.append(manifest_lib.shard_entry(root, uri, len(rows)))
    manifest_lib.write(root, manifest_lib.Manifest(kind="fetch", config={"generated": "synthetic world", "n": n},
                                                   shards=entries, stats={"rows": n}))
    return root


def wandb_offline_history(run_file: str) -> tuple[str, list[dict]]:
    """(run id, history rows) of an offline W&B run file (`run-<id>.wandb`).

    wandb >= 0.20 reads these only in its Go core, so this reads the file here: a 7-byte header
    (":W&B", magic, version), then LevelDB's log format (32 KiB blocks of records with a 7-byte
    header: crc32, length, type FULL/FIRST/MIDDLE/LAST) whose payloads are `Record` protobufs.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    block, pos, payload, run, rows = 32768, 7, b"", None, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:                        # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:                      # zero-filled rest of a block
            pos += block - pos % block
            continue
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                                 # FULL or LAST: one record complete
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            which = record.WhichOneof("record_type")
            if which == "run":
                run = record.run.run_id
            elif which == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return run, rows


# --------------------------------------------------------------------------------------------
# Tiny training runs and what they leave behind
# --------------------------------------------------------------------------------------------

G = 8  # global batch of every tiny run


def tiny(tmp, data: str, name: str, *overrides: str):
    """The tiny run config every training test uses (debug preset, depth 1, 16px, tiny T5, 2 workers
    unless overridden), with its checkpoints, logs and trace under `tmp`."""
    from jobs.train.config import TrainConfig
    from pipelines import config as config_lib
    from tests.conftest import ROOT

    return config_lib.load(TrainConfig, ROOT / "jobs/configs/debug.yaml", [
        f"name={name}", f"storage_path={tmp / 'runs'}", f"data.datasets=[{data}]", f"data.batch_size={G}",
        *TINY, f"logging.trace_dir={tmp / 'trace' / name}", f"logging.dir={tmp / 'logs' / name}",
        "scaling.max_failures=0", *overrides])


# The settings of `tiny` that decide what a run computes (a `tune schedule` trial sets the same).
TINY = ["model.overrides={depth: 1, image_size: 16}", "text_encoder.prompt_length=16", "denoiser.caption_dropout=0.1",
        "optim.lr=2e-3", "optim.warmup_steps=4", "ema.decays=[0.0, 0.999]", "checkpoint.every=4", "logging.every=4",
        "logging.sample_every=0"]


def trace(trace_dir) -> dict[int, dict[int, dict]]:
    """step -> rank -> the last logged entry (a step re-done after a restart overwrites)."""
    import json
    from pathlib import Path

    steps: dict[int, dict[int, dict]] = {}
    for path in sorted(Path(trace_dir).glob("keys-rank*.jsonl")):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            steps.setdefault(e["step"], {})[e["rank"]] = e
    return steps


def step_losses(steps) -> list[float]:
    """The run's loss per step: the mean of the workers' losses, as the loop all-reduces it."""
    return [float(np.mean([e["loss"] for e in steps[s].values()])) for s in sorted(steps)]


def expected_keys(data: str, steps: range) -> list[list[str]]:
    """The keys each step must see, recomputed from the manifests, the seed and the order function."""
    from jobs.train.data import DataConfig, build_index, epoch_order, steps_per_epoch

    cfg = DataConfig(datasets=[data], batch_size=G, partitions=2)     # every run here: 2 streams
    index = build_index(cfg)
    keys = [pq.read_table(storage.resolve(s)[1], columns=["key"]).column("key").to_pylist() for s in index.shards]
    spe = steps_per_epoch(index, G)
    out = []
    for s in steps:
        epoch, within = divmod(s, spe)
        gids = epoch_order(index, cfg, epoch)[within * G:(within + 1) * G]
        out.append([keys[sid][row] for sid, row, _ in index.rows[gids]])
    return out


def assert_no_repeats_no_gaps(data: str, steps: dict, total: int) -> None:
    assert sorted(steps) == list(range(total)), "every step ran exactly once in the final record"
    seen = [sum((steps[s][r]["keys"] for r in sorted(steps[s])), []) for s in range(total)]
    assert seen == expected_keys(data, range(total))


def tensorboard_steps(log_dir, tag: str = "loss") -> list[int]:
    """The steps TensorBoard shows for `tag` (its reader applies the writers' purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def latest(run_dir):
    """The checkpoint folder with the highest step in a run folder."""
    import json
    from pathlib import Path

    return max((p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()),
               key=lambda p: json.loads((p / "train_state.json").read_text())["step"])
