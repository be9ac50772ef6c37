"""Training data: Parquet dataset folders -> a seeded, recorded sample order -> Ray Data -> batches.

The order is the contract that makes resume exact. From the manifests we know every shard's row
count; the driver lists the usable rows (a `status` column, when a shard has one, drops failed
fetches without reading any image bytes) and gives each a global row id. Epoch e's order is a
seeded function of (seed, e, mix weights, row lists) only, so it never has to be stored. A run
consumes that infinite stream in global batches of G samples: step s uses positions
[s*G, (s+1)*G) and worker r of W takes the contiguous slice [r*G/W, (r+1)*G/W) of them. The only
state a checkpoint needs is the step, and because the positions depend on G but not on W, a
resumed run (same or different number of workers) continues exactly where the last one stopped.

Why each worker builds its own small Ray Data pipeline instead of `get_dataset_shard`: Ray Train's
dataset split hands blocks to whichever worker asks first, so which rows a worker sees is not
reproducible, and a restarted split starts from row 0. Here each worker streams exactly its slice
of the recorded order, from the resumed step on, through the same class-based stages
(`ReadRows` -> `DecodeCrop`, in one `LoadImages` actor) on Ray's CPU workers, and reads batches with `iter_torch_batches`.

A row whose image turns out to be null or not decodable stays in its slot (so steps stay aligned
across workers and restarts) with `valid = False`: the loss ignores it and it is counted as a skip.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from pipelines import manifest as manifest_lib
from pipelines import storage


@dataclass
class DataConfig:
    datasets: list[str] = field(default_factory=list)    # dataset folders (local or s3://), each with manifest.json
    weights: list[float] | None = None                   # mix weights, one per dataset (share of each epoch); None = by size
    caption_column: str = "caption"                      # text column the encoder reads
    features_column: str | None = None                   # cached T5 features [L*C] (skips the online encoder)
    mask_column: str | None = None                       # cached T5 mask [L] that goes with features_column
    batch_size: int = 8                                  # GLOBAL batch: samples per optimiser step over all workers
    seed: int = 0                                        # seeds the sample order (and the noise, in the step)
    shuffle_window: int = 0                              # shards shuffled together; 0 = the whole dataset
    steps_per_block: int = 4                             # optimiser steps per Ray Data block (pipelining grain)
    decode_actors: int = 1                               # LoadImages actors (read + decode) per train worker
    decode_cpus: float = 0.5                             # CPUs reserved per LoadImages actor
    row_group_cache: int = 16                            # Parquet row groups each ReadRows actor keeps


# --------------------------------------------------------------------------------------------
# The index: which rows exist, and the seeded order over them
# --------------------------------------------------------------------------------------------

@dataclass
class Index:
    """Every usable row of the run's datasets, as (dataset, shard, row-in-shard) triples."""
    shards: list[str]              # shard URIs; position = shard id
    shard_dataset: np.ndarray      # [num_shards] dataset id of each shard
    rows: np.ndarray               # [R, 2] int64: (shard id, row within the shard), grouped by dataset
    dataset_rows: list[np.ndarray] # per dataset: global row ids into `rows`
    weights: np.ndarray            # [num_datasets] normalised mix weights
    fingerprint: str               # hash of the manifests' shard digests and the weights

    @property
    def num_rows(self) -> int:
        return len(self.rows)


def _usable_rows(uri: str, expected: int | None) -> np.ndarray:
    """Row numbers of a shard worth training on; reads only the small `status` column if any."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
    except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) on garbage
        raise ValueError(f"training shard {uri} is not a readable Parquet file: {err}") from err
    n = pf.metadata.num_rows
    if expected is not None and n != expected:
        raise ValueError(f"training shard {uri} has {n} rows but its manifest says {expected}: the dataset changed after its manifest was written")
    names = pf.schema_arrow.names
    if "image" not in names:
        raise ValueError(f"training shard {uri} has no 'image' column (columns: {', '.join(names)})")
    if "status" in names and n:
        status = pf.read(columns=["status"]).column("status").to_numpy(zero_copy_only=False)
        return np.flatnonzero(status == "success")
    return np.arange(n)


def build_index(cfg: DataConfig) -> Index:
    """Read the manifests (a missing one is a clear error) and list the usable rows."""
    if not cfg.datasets:
        raise ValueError("data.datasets is empty: give one or more dataset folders (each with a manifest.json)")
    if cfg.weights is not None and len(cfg.weights) != len(cfg.datasets):
        raise ValueError(f"data.weights has {len(cfg.weights)} entries for {len(cfg.datasets)} datasets")
    import hashlib

    shards, shard_dataset, rows, dataset_rows = [], [], [], []
    h = hashlib.sha256()
    start = 0
    for d, root in enumerate(cfg.datasets):
        if not storage.exists(root):
            raise FileNotFoundError(f"training dataset {root} does not exist")
        man = manifest_lib.read(root)
        count = 0
        for entry in man.shards:
            uri = storage.join(root, entry.path)
            if not storage.exists(uri):
                raise FileNotFoundError(f"training dataset {root}: shard {entry.path} is listed in the manifest but missing")
            usable = _usable_rows(uri, entry.rows)
            sid = len(shards)
            shards.append(uri)
            shard_dataset.append(d)
            rows.append(np.stack([np.full(len(usable), sid), usable], axis=1).astype(np.int64))
            count += len(usable)
            h.update(f"{d}:{entry.path}:{entry.sha256}\n".encode())
        if count == 0:
            raise ValueError(f"training dataset {root} has no usable rows (every image failed or the shards are empty)")
        dataset_rows.append(np.arange(start, start + count, dtype=np.int64))
        start += count
    sizes = np.array([len(r) for r in dataset_rows], dtype=np.float64)
    weights = np.array(cfg.weights, dtype=np.float64) if cfg.weights is not None else sizes
    if (weights <= 0).any():
        raise ValueError(f"data.weights must all be > 0, got {list(weights)}")
    weights = weights / weights.sum()
    h.update(json.dumps(weights.round(12).tolist()).encode())
    return Index(shards, np.array(shard_dataset), np.concatenate(rows), dataset_rows, weights, h.hexdigest()[:16])


def epoch_order(index: Index, seed: int, epoch: int, window: int = 0) -> np.ndarray:
    """Global row ids of epoch `epoch`, a pure function of (index, seed, epoch, window).

    An epoch holds as many samples as the index has rows; dataset d fills a share `weights[d]` of
    them, cycling through its rows (so a small, up-weighted set repeats and a large, down-weighted
    one is subsampled). Within a dataset, shards are shuffled and rows are shuffled within windows
    of `window` consecutive shards (0 = all), which keeps a batch's reads local on big datasets.
    """
    rng = np.random.default_rng([seed, epoch])
    total = index.num_rows
    counts = np.floor(index.weights * total).astype(np.int64)
    counts[: total - counts.sum()] += 1                     # hand out the rounding remainder
    streams = []
    for d, ids in enumerate(index.dataset_rows):
        shard_of = index.rows[ids, 0]
        shard_ids = np.unique(shard_of)
        rng.shuffle(shard_ids)
        w = len(shard_ids) if window <= 0 else window
        parts = []
        for i in range(0, len(shard_ids), w):
            chunk = ids[np.isin(shard_of, shard_ids[i:i + w])]
            parts.append(rng.permutation(chunk))
        seq = np.concatenate(parts)
        streams.append(np.resize(seq, counts[d]))            # np.resize cycles when counts[d] > len(seq)
    labels = rng.permutation(np.repeat(np.arange(len(streams)), counts))   # which dataset fills each slot
    order = np.empty(total, dtype=np.int64)
    for d, seq in enumerate(streams):
        order[labels == d] = seq
    return order


def steps_per_epoch(index: Index, global_batch: int) -> int:
    spe = index.num_rows // global_batch                     # the last partial batch of an epoch is dropped
    if spe == 0:
        raise ValueError(f"the training data has {index.num_rows} usable rows, fewer than one global batch of {global_batch}")
    return spe


def worker_rows(index: Index, cfg: DataConfig, first_step: int, last_step: int, rank: int, world: int) -> np.ndarray:
    """This worker's global row ids for steps [first_step, last_step), across epochs. [steps * b]"""
    G = cfg.batch_size
    if G % world:
        raise ValueError(f"data.batch_size {G} must be divisible by the number of workers {world}")
    b = G // world
    spe = steps_per_epoch(index, G)
    parts = []
    step = first_step
    while step < last_step:
        epoch, first = divmod(step, spe)
        n = min(spe - first, last_step - step)
        order = epoch_order(index, cfg.seed, epoch, cfg.shuffle_window)[: spe * G].reshape(spe, G)   # [spe, G]
        parts.append(order[first:first + n, rank * b:(rank + 1) * b].reshape(-1))
        step += n
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Ray Data stages (class-based: built once per actor, then called per batch)
# --------------------------------------------------------------------------------------------

class ReadRows:
    """global row ids -> key, image bytes, caption (and cached text features) from the shards.

    Reads only the Parquet row groups a batch needs and keeps the last few (LRU), since the
    shuffled order revisits the same row groups within a shuffle window.
    """

    def __init__(self, index: Index, cfg: DataConfig):
        self.index = index
        self.columns = ["key", "image", cfg.caption_column] + [c for c in (cfg.features_column, cfg.mask_column) if c]
        self.cfg = cfg
        self.cache: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self.files: dict[int, object] = {}

    def _file(self, sid: int):
        import pyarrow.parquet as pq

        if sid not in self.files:
            fs, path = storage.resolve(self.index.shards[sid])
            pf = pq.ParquetFile(fs.open_input_file(path))
            missing = [c for c in self.columns if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"training shard {self.index.shards[sid]} lacks column(s) {missing} (set data.caption_column?)")
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
            self.files[sid] = (pf, starts)
        return self.files[sid]

    def _row(self, sid: int, row: int) -> dict:
        pf, starts = self._file(sid)
        rg = int(np.searchsorted(starts, row, side="right") - 1)
        if (sid, rg) not in self.cache:
            self.cache[(sid, rg)] = pf.read_row_group(rg, columns=self.columns).to_pydict()
            if len(self.cache) > self.cfg.row_group_cache:
                self.cache.popitem(last=False)
        self.cache.move_to_end((sid, rg))
        group = self.cache[(sid, rg)]
        i = row - starts[rg]
        return {c: group[c][i] for c in self.columns}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gids = batch["data"]
        rows = [self._row(int(s), int(r)) for s, r in self.index.rows[gids]]
        out = {
            "gid": gids,
            "key": np.array([str(r["key"]) for r in rows], dtype=object),
            "image": np.array([r["image"] for r in rows], dtype=object),
            "caption": np.array([r[self.cfg.caption_column] or "" for r in rows], dtype=object),
        }
        if self.cfg.features_column:
            out["features"] = np.stack([np.asarray(r[self.cfg.features_column], dtype=np.float32) for r in rows])
            out["text_mask"] = np.stack([np.asarray(r[self.cfg.mask_column], dtype=bool) for r in rows])
        return out


def decode_crop(data: bytes, size: int) -> np.ndarray:
    """Image bytes -> [3, size, size] float32 in [-1, 1]: shorter side to `size`, centre crop."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.float32)                                # [H, W, 3]
    return arr.transpose(2, 0, 1) / 127.5 - 1.0                              # [3, H, W]


class DecodeCrop:
    """image bytes -> float32 [B, 3, S, S] in [-1, 1]; a null or corrupt image gives valid=False."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        images = np.zeros((n, 3, self.size, self.size), dtype=np.float32)
        valid = np.zeros(n, dtype=bool)
        for i, data in enumerate(batch["image"]):
            if data is None:
                continue
            try:
                images[i] = decode_crop(data, self.size)
                valid[i] = True
            except Exception:  # noqa: BLE001 - any undecodable image is one counted skip, never a crash
                pass
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(image=images, valid=valid)
        return out


class LoadImages:
    """ReadRows then DecodeCrop in one actor: one process per train worker instead of two."""

    def __init__(self, index: Index, cfg: DataConfig, size: int):
        self.read = ReadRows(index, cfg)
        self.decode = DecodeCrop(size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.decode(self.read(batch))


def _collate(batch: dict[str, np.ndarray]) -> dict:
    import torch

    out = {k: torch.tensor(batch[k]) for k in ("image", "valid", "gid", "features", "text_mask") if k in batch}
    out["key"] = [str(k) for k in batch["key"]]
    out["caption"] = [str(c) for c in batch["caption"]]
    return out


# Rows per pipeline: one pipeline usually covers the whole run; a very long run is cut into
# pipelines of this many rows so the id list stays small (8M int64 = 64 MB).
MAX_PIPELINE_ROWS = 1 << 23


def iter_batches(index: Index, cfg: DataConfig, image_size: int, start_step: int, end_step: int, rank: int, world: int):
    """Yield (step, batch) for this worker for steps [start_step, end_step).

    batch: image [b, 3, S, S] in [-1, 1], valid [b], key/caption lists, gid [b] (global row ids).
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True       # the order is the contract
    ctx.enable_progress_bars = False
    b = cfg.batch_size // world
    step = start_step
    while step < end_step:
        last = min(end_step, step + max(1, MAX_PIPELINE_ROWS // b))
        gids = worker_rows(index, cfg, step, last, rank, world)                 # [(last - step) * b]
        block = b * cfg.steps_per_block
        ds = ray.data.from_numpy([gids[i:i + block] for i in range(0, len(gids), block)]).map_batches(
            LoadImages, fn_constructor_args=(index, cfg, image_size), batch_size=b,
            compute=ray.data.ActorPoolStrategy(size=cfg.decode_actors), num_cpus=cfg.decode_cpus)
        for batch in ds.iter_torch_batches(batch_size=b, collate_fn=_collate, prefetch_batches=2):
            yield step, batch
            step += 1
