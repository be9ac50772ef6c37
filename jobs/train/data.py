"""Training data: Parquet dataset folders -> a seeded, recorded sample order -> Ray Data -> batches.

The order is the contract that makes resume exact. From the manifests we know every shard's row
count; the driver lists the usable rows (a `status` column, when a shard has one, drops failed
fetches without reading any image bytes) and gives each a global row id. Epoch e's order is a
seeded function of (seed, e, global batch, partitions, shuffle block, mix weights, row lists)
only, so it never has to be stored. A run consumes that stream in global batches of G samples:
step s uses positions [s*G, (s+1)*G) and worker r of W takes the contiguous slice
[r*G/W, (r+1)*G/W) of them. The only state a checkpoint needs is the step, and because the
positions do not depend on W, a resumed run (same or different number of workers) continues
exactly where the last one stopped.

The order is also built for reading. A Parquet file can only be read a whole row group at a time
(64-256 rows, up to ~100 MB of images), so a fully shuffled order that takes one row from each
of G row groups per step would read every row group once per row it uses. Instead:
- the G positions of a step are cut into P partitions (streams) of G/P; the run's row groups are
  dealt to the streams, so a row group is only ever read by the worker that owns its stream
  (P = the number of workers by default, recorded in checkpoints);
- within a stream, row groups come in a seeded random order, datasets are interleaved by their
  mix weights, and rows are shuffled within blocks of `shuffle_rows` consecutive positions.
`ReadRows` knows its worker's plan, so it reads each row group once per block and keeps only the
rows this worker will take from it in the next two blocks (see `ReadRows`). A block mixes the
rows of ~shuffle_rows/rows-per-group row groups drawn at random from the whole dataset, and a
global batch draws from P blocks at once; raise `shuffle_rows` for more mixing, at the cost of
reader memory (about 2 x shuffle_rows x P/W encoded images per worker).

Why each worker builds its own small Ray Data pipeline instead of `get_dataset_shard`: Ray Train's
dataset split hands blocks to whichever worker asks first, so which rows a worker sees is not
reproducible, and a restarted split starts from row 0. Here each worker streams exactly its slice
of the recorded order, from the resumed step on: `ReadRows` (one actor: Parquet I/O and the
row cache) -> `DecodeCrop` (a pool of CPU actors) -> `iter_torch_batches` in the Train worker.

Images travel as uint8 [S, S, 3], as decoded (a quarter of float32's bytes through the object
store and host-to-device copies, and no transpose on the CPU); the train step moves the channels
first and scales to [-1, 1] on its device (`to_model_range`).

A row whose image turns out to be null or not decodable stays in its slot (so steps stay aligned
across workers and restarts) with `valid = False`: the loss ignores it and it is counted as a skip.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace

import numpy as np

from jobs.train.feedback import Attributes, Decisions, FeedbackConfig, crop_scales, filter_stream, read_attributes, scores_digest
from jobs.train.feedback import settings as feedback_settings
from pipelines import manifest as manifest_lib
from pipelines import storage


@dataclass
class DataConfig:
    datasets: list[str] = field(default_factory=list)    # dataset folders (local or s3://), each with manifest.json
    weights: list[float] | None = None                   # mix weights, one per dataset (share of each epoch); None = by size
    caption_column: str = "caption"                      # text column the encoder reads
    text_features: bool = False                          # read cached T5 features (`minit2i encode-text`) instead of encoding online
    batch_size: int = 8                                  # GLOBAL batch: samples per optimiser step over all workers
    seed: int = 0                                        # seeds the sample order (and the noise, in the step)
    partitions: int = 0                                  # streams per global batch; 0 = the first run's worker count (recorded)
    shuffle_rows: int = 1024                             # rows shuffled together within a stream (reader memory ~ 2x this)
    steps_per_block: int = 4                             # optimiser steps per Ray Data block (pipelining grain)
    decode_actors: int = 1                               # DecodeCrop actors per train worker; 0 = the reader decodes
    decode_cpus: float = 0.5                             # CPUs reserved per DecodeCrop actor
    read_cpus: float = 0.25                              # CPUs reserved for the worker's ReadRows actor
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)   # statistics / critic sampling (jobs/train/feedback.py)


# --------------------------------------------------------------------------------------------
# The index: which rows exist, and the seeded order over them
# --------------------------------------------------------------------------------------------

@dataclass
class Index:
    """Every usable row of the run's datasets, as (shard, row-in-shard, row group) triples.

    It travels to every train worker and reader actor, so it is kept small: int32 triples (12 bytes
    a row, ~120 MB for CC12M's 10M rows) and each dataset's rows as one contiguous range of global
    row ids. Global row ids (positions in the order) stay int64.
    """
    shards: list[str]              # shard URIs; position = shard id
    shard_dataset: np.ndarray      # [num_shards] dataset id of each shard
    rows: np.ndarray               # [R, 3] int32: (shard id, row within the shard, unit id), grouped by dataset
    units: np.ndarray              # [U, 3] int64: (shard id, row group, first row of the group in the shard)
    dataset_starts: np.ndarray     # [num_datasets + 1] int64: dataset d's global row ids are [starts[d], starts[d+1])
    weights: np.ndarray            # [num_datasets] normalised mix weights
    fingerprint: str               # hash of the manifests' shard digests and the weights
    text: dict | None = None       # with data.text_features: the cached features' encoder, width, prompt_length
    attrs: Attributes | None = None  # with data.feedback: each row's attribute values

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def dataset_rows(self) -> list[np.ndarray]:
        """Per dataset: its global row ids (made on demand)."""
        return [np.arange(a, b, dtype=np.int64) for a, b in zip(self.dataset_starts[:-1], self.dataset_starts[1:])]


def _usable_rows(uri: str, expected: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(usable row numbers, first row of each row group) of a shard; reads only `status` if any."""
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
    starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])[:-1]
    if "status" in names and n:
        status = pf.read(columns=["status"]).column("status").to_numpy(zero_copy_only=False)
        return np.flatnonzero(status == "success"), starts
    return np.arange(n), starts


INT32_MAX = np.iinfo(np.int32).max


def build_index(cfg: DataConfig) -> Index:
    """Read the manifests (a missing one is a clear error) and list the usable rows."""
    if not cfg.datasets:
        raise ValueError("data.datasets is empty: give one or more dataset folders (each with a manifest.json)")
    if cfg.weights is not None and len(cfg.weights) != len(cfg.datasets):
        raise ValueError(f"data.weights has {len(cfg.weights)} entries for {len(cfg.datasets)} datasets")
    import hashlib

    shards, shard_dataset, rows, units, dataset_starts, shard_rows = [], [], [], [], [0], []
    h = hashlib.sha256()
    num_units = 0
    for d, root in enumerate(cfg.datasets):
        if not storage.exists(root):
            raise FileNotFoundError(f"training dataset {root} does not exist")
        man = manifest_lib.read(root)
        count = 0
        for entry in man.shards:
            uri = storage.join(root, entry.path)
            if not storage.exists(uri):
                raise FileNotFoundError(f"training dataset {root}: shard {entry.path} is listed in the manifest but missing")
            usable, starts = _usable_rows(uri, entry.rows)
            shard_rows.append((uri, usable))
            sid = len(shards)
            shards.append(uri)
            shard_dataset.append(d)
            group = np.searchsorted(starts, usable, side="right") - 1                 # row group of each usable row
            first_unit, num_units = num_units, num_units + len(starts)
            if max(sid, num_units, len(usable) and int(usable[-1])) >= INT32_MAX:
                raise ValueError(f"training shard {uri}: shard, row group or row number past {INT32_MAX}, the index's int32 limit")
            units.append(np.stack([np.full(len(starts), sid), np.arange(len(starts)), starts], axis=1).astype(np.int64).reshape(-1, 3))
            rows.append(np.stack([np.full(len(usable), sid), usable, first_unit + group], axis=1).astype(np.int32).reshape(-1, 3))
            count += len(usable)
            h.update(f"{d}:{entry.path}:{entry.sha256}\n".encode())
        if count == 0:
            raise ValueError(f"training dataset {root} has no usable rows (every image failed or the shards are empty)")
        dataset_starts.append(dataset_starts[-1] + count)
    text = _cached_text(cfg) if cfg.text_features else None
    sizes = np.diff(dataset_starts).astype(np.float64)
    weights = np.array(cfg.weights, dtype=np.float64) if cfg.weights is not None else sizes
    if (weights <= 0).any():
        raise ValueError(f"data.weights must all be > 0, got {list(weights)}")
    weights = weights / weights.sum()
    h.update(json.dumps(weights.round(12).tolist()).encode())
    attrs = read_attributes(shard_rows, cfg.caption_column) if cfg.feedback.active else None
    return Index(shards, np.array(shard_dataset), np.concatenate(rows), np.concatenate(units),
                 np.array(dataset_starts, dtype=np.int64), weights, h.hexdigest()[:16], text, attrs)


def _cached_text(cfg: DataConfig) -> dict:
    """What every dataset's cached T5 features were made with; they must all agree."""
    from pipelines.text_features import features_of

    found = {root: features_of(root) for root in cfg.datasets}
    keys = ("encoder", "width", "prompt_length")
    kinds = {tuple(f[k] for k in keys) for f in found.values()}
    if len(kinds) > 1:
        raise ValueError("data.datasets hold T5 features made differently (encoder, width, prompt length): "
                         + "; ".join(f"{root}: {tuple(f[k] for k in keys)}" for root, f in found.items()))
    return {k: next(iter(found.values()))[k] for k in keys}


def with_partitions(cfg: DataConfig, world: int) -> DataConfig:
    """The config with `partitions` resolved: 0 (auto) becomes the number of workers."""
    return cfg if cfg.partitions else replace(cfg, partitions=world)


def order_settings(cfg: DataConfig) -> dict:
    """What, besides the data fingerprint, fixes the order: recorded in and checked against checkpoints."""
    out = {"seed": cfg.seed, "global_batch": cfg.batch_size, "partitions": cfg.partitions, "shuffle_rows": cfg.shuffle_rows}
    if cfg.feedback.active:
        out["feedback"] = feedback_settings(cfg.feedback)
    return out


def _unit_major(index: Index, ids: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """n row ids of one dataset, whole row groups in seeded random order, cycling with fresh orders."""
    unit_of = index.rows[ids, 2]                           # non-decreasing along ids
    unit_ids = np.unique(unit_of)
    rank = np.zeros(unit_ids.max() + 1, dtype=np.int64)
    parts, have = [], 0
    while have < n:
        rank[rng.permutation(unit_ids)] = np.arange(len(unit_ids))
        parts.append(ids[np.argsort(rank[unit_of], kind="stable")])
        have += len(ids)
    return np.concatenate(parts)[:n]


def epoch_order(index: Index, cfg: DataConfig, epoch: int, scores: np.ndarray | None = None) -> np.ndarray:
    """Global row ids of epoch `epoch`: [steps_per_epoch * G], a pure function of its inputs
    (with data.feedback, also of the critic's `scores` in effect: see `feedback_epoch`)."""
    if cfg.feedback.active:
        return feedback_epoch(index, cfg, epoch, scores)[0]
    spe = steps_per_epoch(index, cfg.batch_size)
    return _streams(index, cfg, epoch).reshape(cfg.partitions, spe, -1).transpose(1, 0, 2).reshape(-1)


def _streams(index: Index, cfg: DataConfig, epoch: int, reserve: int = 0) -> np.ndarray:
    """The plain order's P streams of epoch `epoch`: [P, steps_per_epoch * G / P]. `reserve` k > 0
    gives the k-th reserve order of the epoch (another draw of the same layout), which feedback
    takes candidates from once a stream's own rows are used up.

    Dataset d fills a share `weights[d]` of each stream, cycling through its rows when it is
    up-weighted and subsampled when down-weighted; see the module docstring for the layout.
    """
    G, P, B = cfg.batch_size, cfg.partitions, cfg.shuffle_rows
    if P < 1 or G % P:
        raise ValueError(f"data.partitions must be >= 1 and divide data.batch_size {G}, got {P}")
    if B < 1:
        raise ValueError(f"data.shuffle_rows must be >= 1, got {B}")
    g = G // P
    spe = steps_per_epoch(index, G)
    n = spe * g                                              # rows per stream per epoch
    rng = np.random.default_rng([cfg.seed, epoch] + ([reserve] if reserve else []))
    counts = np.floor(index.weights * n).astype(np.int64)
    counts[: n - counts.sum()] += 1                          # hand out the rounding remainder
    pieces = [_unit_major(index, ids, rng, P * c).reshape(P, c) for ids, c in zip(index.dataset_rows, counts)]
    streams = np.empty((P, n), dtype=np.int64)
    block = np.arange(n) // B
    for j in range(P):
        labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))    # which dataset fills each slot
        for d, piece in enumerate(pieces):
            streams[j, labels == d] = piece[j]
        streams[j] = streams[j, np.lexsort((rng.random(n), block))]             # shuffle within blocks of B
    return streams


# Feedback orders of recent (epoch, critic version)s: the loop, its readers and the critic ask for
# the same epoch several times, and one costs a Python pass over its positions.
_FEEDBACK_CACHE: dict[tuple, tuple[np.ndarray, Decisions]] = {}
MAX_RESERVES = 64           # reserve orders a stream may draw on before the filter gives up (never near)


def feedback_epoch(index: Index, cfg: DataConfig, epoch: int, scores: np.ndarray | None) -> tuple[np.ndarray, Decisions]:
    """(row ids [steps_per_epoch * G], what was decided) of epoch `epoch` with data.feedback.

    Stream j is filtered from its plain stream, then the reserve orders' stream j, by
    jobs/train/feedback.py's rules with a generator seeded by (seed, epoch, j): a pure function
    of (seed, epoch, data, settings, scores), so every worker and every resume computes the same.
    """
    import json

    key = (index.fingerprint, id(index), json.dumps(order_settings(cfg), sort_keys=True), epoch, scores_digest(scores))
    if key in _FEEDBACK_CACHE:
        return _FEEDBACK_CACHE[key]
    spe = steps_per_epoch(index, cfg.batch_size)
    reserves = {0: _streams(index, cfg, epoch)}
    P, n = reserves[0].shape

    def candidates(j: int):
        for k in range(MAX_RESERVES + 1):
            if k not in reserves:
                reserves[k] = _streams(index, cfg, epoch, reserve=k)
            yield reserves[k][j]

    out, total = np.empty((P, n), dtype=np.int64), Decisions()
    for j in range(P):
        out[j], dec = filter_stream(candidates(j), n, cfg.feedback, index.attrs, scores,
                                    np.random.default_rng([cfg.seed, epoch, j, 0xFEED]))
        total.add(dec)
    result = out.reshape(P, spe, -1).transpose(1, 0, 2).reshape(-1), total
    if len(_FEEDBACK_CACHE) >= 8:
        _FEEDBACK_CACHE.pop(next(iter(_FEEDBACK_CACHE)))
    _FEEDBACK_CACHE[key] = result
    return result


def epoch_crops(cfg: DataConfig, epoch: int, n: int) -> np.ndarray:
    """[n] crop scales of epoch `epoch`'s positions (1.0 = the full centre crop), seeded by (seed, epoch)."""
    return crop_scales(cfg.feedback.stats, np.random.default_rng([cfg.seed, epoch, 0xC209]), n)


def steps_per_epoch(index: Index, global_batch: int) -> int:
    spe = index.num_rows // global_batch                     # the last partial batch of an epoch is dropped
    if spe == 0:
        raise ValueError(f"the training data has {index.num_rows} usable rows, fewer than one global batch of {global_batch}")
    return spe


def worker_rows(index: Index, cfg: DataConfig, first_step: int, last_step: int, rank: int, world: int,
                scores: np.ndarray | None = None, crops: bool = False) -> np.ndarray:
    """This worker's global row ids for steps [first_step, last_step), across epochs. [steps * b]
    `scores`: the critic's, in effect for these steps; `crops`: the positions' crop scales instead."""
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
        order = (epoch_crops(cfg, epoch, spe * G) if crops else epoch_order(index, cfg, epoch, scores)).reshape(spe, G)
        parts.append(order[first:first + n, rank * b:(rank + 1) * b].reshape(-1))
        step += n
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Ray Data stages (class-based: built once per actor, then called per batch)
# --------------------------------------------------------------------------------------------

class ReadRows:
    """Plan positions (or, without a plan, global row ids) -> key, image bytes, caption, features.

    With a plan (this worker's row ids for the pipeline's steps, recomputed from the order), the
    first time a row group is needed it is read once, and every row this worker takes from it
    within the next `horizon` plan positions is kept (by plan position) until it is served; rows
    needed later are read again then. The order keeps a row group's rows within one block of its
    stream, so with horizon = two blocks each row group is read about once per block it spans.
    Without a plan, rows of one call are grouped by row group, each read once. Parquet readers
    are kept open per shard. `group_reads` counts row-group reads (the benchmark reports it).
    """

    def __init__(self, index: Index, cfg: DataConfig, plan: tuple[int, int, int, int] | None = None,
                 scores: np.ndarray | None = None):
        self.index = index
        self.cfg = cfg
        self.columns = ["key", "image", cfg.caption_column]
        if cfg.text_features:
            from pipelines.text_features import FEATURES_COLUMN, TOKENS_COLUMN

            self.columns += [FEATURES_COLUMN, TOKENS_COLUMN]
        self.files: dict[int, object] = {}
        self.held: dict[int, dict] = {}
        self.group_reads = 0
        self.plan, self.horizon, self.crops = None, 0, None
        if plan is not None:
            first, last, rank, world = plan
            self.plan = worker_rows(index, cfg, first, last, rank, world, scores)
            if cfg.feedback.stats.enabled and cfg.feedback.stats.crop_std > 0:
                self.crops = worker_rows(index, cfg, first, last, rank, world, crops=True)
            rows_per_stream = cfg.batch_size // cfg.partitions
            self.horizon = 2 * -(-cfg.shuffle_rows // rows_per_stream) * (cfg.batch_size // world)

    def _file(self, sid: int):
        import pyarrow.parquet as pq

        if sid not in self.files:
            fs, path = storage.resolve(self.index.shards[sid])
            pf = pq.ParquetFile(fs.open_input_file(path))
            missing = [c for c in self.columns if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"training shard {self.index.shards[sid]} lacks column(s) {missing} (set data.caption_column? "
                                 f"cached T5 features come from `minit2i encode-text`)")
            self.files[sid] = pf
        return self.files[sid]

    def _fill(self, plan: np.ndarray, p: int, horizon: int, held: dict) -> None:
        """Read the row group of plan[p]; hold its rows at every position in [p, p + horizon)."""
        unit_of = self.index.rows[:, 2]
        u = unit_of[plan[p]]
        window = plan[p:p + horizon]
        qs = [p + int(i) for i in np.flatnonzero(unit_of[window] == u) if p + int(i) not in held]
        sid, group, first_row = self.index.units[u]
        table = self._file(int(sid)).read_row_group(int(group), columns=self.columns)
        self.group_reads += 1
        picked = table.take(self.index.rows[plan[qs], 1] - first_row).to_pydict()
        for k, q in enumerate(qs):
            held[q] = {c: picked[c][k] for c in self.columns}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.plan is None:
            plan, positions, held, horizon = batch["data"], range(len(batch["data"])), {}, len(batch["data"])
        else:
            plan, positions, held, horizon = self.plan, batch["data"], self.held, self.horizon
        rows = []
        for p in positions:
            p = int(p)
            if p not in held:
                self._fill(plan, p, horizon, held)
            rows.append(held.pop(p))
        if self.cfg.text_features:
            features, text_mask = self._features(rows)
        out = {
            "gid": np.asarray(plan)[np.asarray(positions, dtype=np.int64)],
            "key": np.array([str(r["key"]) for r in rows], dtype=object),
            "image": np.array([r["image"] for r in rows], dtype=object),
            "caption": np.array([r[self.cfg.caption_column] or "" for r in rows], dtype=object),
        }
        if self.cfg.text_features:
            out["features"], out["text_mask"] = features, text_mask
        if self.crops is not None:
            out["crop"] = self.crops[np.asarray(positions, dtype=np.int64)]
        return out

    def _features(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Cached features -> float16 [n, L, C] zero-padded (exact: padding carries nothing) and mask [n, L].
        A row whose features are missing or malformed loses its image, so DecodeCrop counts it as a skip."""
        from pipelines.text_features import FEATURES_COLUMN, TOKENS_COLUMN, decode_features

        L, C = self.index.text["prompt_length"], self.index.text["width"]
        features = np.zeros((len(rows), L, C), dtype=np.float16)
        mask = np.zeros((len(rows), L), dtype=bool)
        for i, r in enumerate(rows):
            n = r[TOKENS_COLUMN]
            if r[FEATURES_COLUMN] is None or n is None or not 0 <= n <= L or len(r[FEATURES_COLUMN]) != 2 * n * C:
                r["image"] = None            # unusable features: the row becomes a counted skip, like a corrupt image
                continue
            features[i, :n] = decode_features(r[FEATURES_COLUMN], n, C)
            mask[i, :n] = True
        return features, mask


def decode_crop(data: bytes, size: int, crop: float = 1.0) -> np.ndarray:
    """Image bytes -> [size, size, 3] uint8 (HWC, as decoded): the centre square of side
    crop x the shorter side, resized to `size` (crop 1: shorter side to `size`, centre crop)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        scale = size / (crop * min(w, h))
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im.draft("RGB", (nw, nh))                          # JPEG: decode at a reduced DCT scale when much larger
        if im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != (nw, nh):
            im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        if im.size != (size, size):
            im = im.crop((left, top, left + size, top + size))
        return np.asarray(im)


def to_model_range(images):
    """uint8 torch images [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1], the denoiser's
    layout and range. On a GPU this runs after the (4x smaller) uint8 copy."""
    return images.movedim(-1, -3) / 127.5 - 1.0


class DecodeCrop:
    """image bytes -> uint8 [B, S, S, 3]; a null or corrupt image gives zeros and valid=False."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        images = np.empty((n, self.size, self.size, 3), dtype=np.uint8)
        valid = np.zeros(n, dtype=bool)
        crops = batch["crop"] if "crop" in batch else np.ones(n)
        for i, data in enumerate(batch["image"]):
            try:
                if data is None:
                    raise ValueError("no image")
                images[i] = decode_crop(data, self.size, float(crops[i]))
                valid[i] = True
            except Exception:  # noqa: BLE001 - any undecodable image is one counted skip, never a crash
                images[i] = 0
        out = {k: v for k, v in batch.items() if k not in ("image", "crop")}
        out.update(image=images, valid=valid)
        return out


class ReadDecode:
    """ReadRows then DecodeCrop in one actor (data.decode_actors = 0): the same rows and pixels as the
    two stages, one process per train worker instead of two. For small images on few CPUs (the
    debug preset, a laptop), where a second actor costs more to start than its decoding saves."""

    def __init__(self, index: Index, cfg: DataConfig, plan: tuple[int, int, int, int] | None, scores: np.ndarray | None,
                 size: int):
        self.read = ReadRows(index, cfg, plan, scores)
        self.decode = DecodeCrop(size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.decode(self.read(batch))


def _collate_class():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        """numpy batch -> torch tensors (image stays uint8) and lists of strings."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict:
            import warnings

            import torch

            with warnings.catch_warnings():        # zero-copy views of Ray's read-only buffers; nothing writes to them
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                out = {k: torch.from_numpy(batch[k]) for k in ("image", "valid", "gid", "features", "text_mask") if k in batch}
            out["key"] = [str(k) for k in batch["key"]]
            out["caption"] = [str(c) for c in batch["caption"]]
            return out

    return Collate()


# Rows per pipeline: one pipeline usually covers the whole run; a very long run is cut into
# pipelines of this many rows so the plan stays small (8M int64 = 64 MB in the reader).
MAX_PIPELINE_ROWS = 1 << 23


def iter_batches(index: Index, cfg: DataConfig, image_size: int, start_step: int, end_step: int, rank: int, world: int,
                 scores: np.ndarray | None = None):
    """Yield (step, batch) for this worker for steps [start_step, end_step); cfg.partitions resolved;
    `scores`: the critic's, in effect for these steps (data.feedback.critic).

    batch: image uint8 [b, S, S, 3], valid [b], key/caption lists, gid [b] (global row ids).
    """
    import pyarrow as pa
    import ray
    import torch

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True       # the order is the contract
    ctx.enable_progress_bars = False
    b = cfg.batch_size // world
    step = start_step
    while step < end_step:
        last = min(end_step, step + max(1, MAX_PIPELINE_ROWS // b))
        n = (last - step) * b
        block = b * cfg.steps_per_block
        # The positions, one block per `steps_per_block` steps, built here: from_blocks computes their
        # metadata in this process, where from_numpy runs a 1-CPU task per block, which waits for
        # ever when the Train workers and their data actors hold every CPU (a 2-core laptop).
        ds = ray.data.from_blocks([pa.table({"data": np.arange(i, min(n, i + block))}) for i in range(0, n, block)])
        plan = (step, last, rank, world)
        if cfg.decode_actors:
            # The one reader runs blocks in order; several queued at once keep it ahead of decoding
            # (with Ray Data's default of 2 in flight the decode actors waited on it half the time).
            ds = (ds.map_batches(ReadRows, fn_constructor_args=(index, cfg, plan, scores), batch_size=None,
                                 compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=4 * cfg.decode_actors + 4),
                                 num_cpus=cfg.read_cpus)
                    .map_batches(DecodeCrop, fn_constructor_args=(image_size,), batch_size=b,
                                 compute=ray.data.ActorPoolStrategy(size=cfg.decode_actors), num_cpus=cfg.decode_cpus))
        else:
            ds = ds.map_batches(ReadDecode, fn_constructor_args=(index, cfg, plan, scores, image_size), batch_size=None,
                                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.read_cpus)
        # Prefetch two blocks: the decode actors never wait on the consumer between blocks.
        for batch in ds.iter_torch_batches(batch_size=b, collate_fn=_collate_class(), prefetch_batches=2 * cfg.steps_per_block,
                                           pin_memory=torch.cuda.is_available()):
            yield step, batch
            step += 1
