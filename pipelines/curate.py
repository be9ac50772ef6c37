"""Curate MiniT2I's finetune set (~120K pairs) from BLIP3o-60K, the DALL-E 3 set and ShareGPT-4o-Image.

Two Ray Data passes over the raw releases with one global step on the driver between them:

  scan    (Ray Data)  read units -> rows -> decode check (Pillow, decompression-bomb guard) -> image
                      filters -> caption filters (T5 tokens) -> attributes, eval-prompt overlap.
                      Image bytes stop here: ~1 KB of metadata per row reaches the driver.
  decide  (driver)    order rows by (source, origin, pos); duplicate keys, exact duplicates (sha256
                      of decoded pixels), near duplicates (pHash Hamming distance), contamination,
                      mix weights; plan which kept row goes to which shard.
  write   (Ray Data)  each read unit is read again and its kept rows written to pre-named shards.
  record  (driver)    dropped.parquet, then manifest.json last.

Why re-read rather than materialise: the releases are 100+ GB of images; holding them in the
object store across a global step (or shuffling them into a sort) would spill all of it to disk,
while re-reading one unit is a sequential read. The write pass checks every image's sha256
against the scan, so a source that changed in between fails the build instead of mixing versions.

Why the output is byte-identical whatever the parallelism: Ray Data returns blocks in no fixed
order, so nothing downstream depends on block order. The driver sorts the scan by (source, origin,
pos) - the position of a row inside its file, fixed by the file's bytes - and every decision
(which duplicate is kept, which shard a row lands in) is made in that order. Shards are written
with pyarrow directly, one unit's kept rows in order into names fixed by the plan, with fixed
writer settings, so neither block sizes nor worker counts can change a byte. A shard never spans
two units (a unit's last shard may be short): that keeps the write pass a per-unit stream, no shuffle.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import to_dict
from pipelines import manifest as manifest_lib
from pipelines import retry, storage
from pipelines.contamination import ContaminationConfig, PromptIndex, load_prompts
from pipelines.sources import ROW_SCHEMA, SOURCES, ReadUnit, read_unit
from pipelines.sources import blip3o, dalle3, sharegpt4o
from pipelines.sources.blip3o import Blip3oConfig
from pipelines.sources.dalle3 import Dalle3Config
from pipelines.sources.sharegpt4o import ShareGPT4oConfig


# ----------------------------------------------------------------------------- configs

@dataclass
class SourcesConfig:
    blip3o: Blip3oConfig = field(default_factory=Blip3oConfig)
    dalle3: Dalle3Config = field(default_factory=Dalle3Config)
    sharegpt4o: ShareGPT4oConfig = field(default_factory=ShareGPT4oConfig)


@dataclass(frozen=True)
class FilterConfig:
    tokenizer: str = "google/flan-t5-large"  # T5 tokenizer counting caption tokens (local dir or hub id)
    max_caption_tokens: int = 256            # MiniT2I's T5 prompt length; longer captions are dropped, not cut
    min_side: int = 512                      # shorter image side in pixels (the model trains at 512x512)
    max_aspect: float = 2.0                  # long side / short side
    max_pixels: int = 8192 * 8192            # more pixels is treated as a decompression bomb, never decoded


@dataclass
class DedupConfig:
    near_threshold: int = 4   # max Hamming distance of 64-bit pHashes for near duplicates; -1 = off

    def __post_init__(self):
        if not -1 <= int(self.near_threshold) <= 31:
            raise ValueError(f"dedup.near_threshold must be in [-1, 31], got {self.near_threshold}")


@dataclass
class ParallelismConfig:
    """How the work is spread over Ray; never changes a byte of the output (not in the manifest)."""

    blocks: int = 0          # Ray Data blocks over the read units (0 = one per unit)
    concurrency: int = 4     # parallel tasks (or actors) per stage
    batch_size: int = 64     # rows per map batch
    read_rows: int = 256     # rows per block a reader yields


@dataclass
class CurateConfig:
    output: str = ""                  # dataset folder, local path or s3:// (not in the manifest)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    contamination: ContaminationConfig = field(default_factory=ContaminationConfig)
    shard_rows: int = 1000            # rows per shard (a unit's last shard may hold fewer)
    overwrite: bool = False           # replace a dataset already in `output`
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)

    def __post_init__(self):
        for src in (self.sources.blip3o, self.sources.dalle3, self.sources.sharegpt4o):
            for name in ("paths", "images"):
                if isinstance(getattr(src, name, None), str):  # `key=one/path` on the command line
                    setattr(src, name, [getattr(src, name)])
            if float(src.weight) < 0:
                raise ValueError(f"source mix weights must be >= 0, got {src.weight}")
        if int(self.shard_rows) < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}")


# Config keys that say where and how fast, not what: left out of the manifest so a rebuild into
# another folder, or with other parallelism, gives byte-identical manifests.
NOT_RECORDED = ("output", "overwrite", "parallelism")

# Drop reasons in the order they are checked; a row gets the first that applies.
REASONS: dict[str, str] = {
    "image_not_fetched": "the release gives a URL, not image bytes (run minit2i fetch first)",
    "image_missing": "no image for the caption",
    "decode_error": "image bytes Pillow cannot decode (corrupt, truncated, unknown format)",
    "decompression_bomb": "more than filters.max_pixels pixels",
    "too_small": "shorter side below filters.min_side",
    "bad_aspect": "long/short side above filters.max_aspect",
    "caption_empty": "no caption, or only whitespace",
    "caption_too_long": "caption over filters.max_caption_tokens T5 tokens",
    "duplicate_key": "(source, origin, key) already seen",
    "duplicate_exact": "same decoded pixels as an earlier row",
    "duplicate_near": "pHash within dedup.near_threshold of an earlier kept row",
    "eval_contamination": "caption contains an evaluation prompt (contamination.drop)",
}

# Aspect-ratio buckets (width:height) for balanced sampling: the transformable attribute of
# D-JEPA·T2I's statistical-analysis sampling. A row goes to the nearest bucket in log space.
ASPECT_BUCKETS = ("1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1")

# Caption attributes for balanced sampling (D-JEPA·T2I tracks entities, attributes and styles;
# the colour, count and position words follow GenEval's task tags). Matched as whole words.
ATTRIBUTE_WORDS: dict[str, tuple[str, ...]] = {
    "color": ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
              "gray", "grey", "gold", "golden", "silver", "beige", "teal", "turquoise", "violet", "cyan"),
    "count": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
              "single", "pair", "couple", "dozen", "several", "multiple", "many"),
    "spatial": ("left", "right", "above", "below", "under", "beneath", "behind", "beside", "next to",
                "in front of", "on top of", "between", "inside", "near", "top", "bottom", "center"),
    "style": ("photo", "photograph", "photorealistic", "realistic", "painting", "oil painting",
              "watercolor", "sketch", "drawing", "illustration", "cartoon", "anime", "3d render",
              "render", "digital art", "pixel art", "minimalist", "vintage", "cinematic", "abstract",
              "surreal", "comic", "poster", "logo"),
}
_ATTRIBUTE_RE = {
    cat: re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(ws, key=len, reverse=True)) + r")\b")
    for cat, ws in ATTRIBUTE_WORDS.items()
}

ATTR_COLUMNS = tuple(f"attr_{cat}" for cat in ATTRIBUTE_WORDS)
_LIST = pa.list_(pa.string())

# One row of the scan: everything the driver needs to decide, without the image bytes.
SCAN_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("origin", pa.string()), ("pos", pa.int64()),
    ("sha256", pa.string()),          # of the stored image bytes
    ("pixel_sha256", pa.string()),    # of the decoded RGB pixels (exact-duplicate key)
    ("phash", pa.string()),           # 64-bit perceptual hash, hex (imagehash.phash)
    ("width", pa.int32()), ("height", pa.int32()), ("aspect_bucket", pa.string()),
    ("caption", pa.string()), ("caption_t5_tokens", pa.int32()),
    ("caption_from", pa.string()),    # the release field a fallback caption came from (DALL-E 3 synthetic_caption)
    *[(c, _LIST) for c in ATTR_COLUMNS],
    ("eval_overlap", pa.float64()),   # share of the best-matching eval prompt's n-grams in the caption
    ("eval_prompt", pa.string()),     # that prompt (null when no prompt file or no overlap)
    ("reason", pa.string()), ("detail", pa.string()),  # first drop reason (null = passes) + detail
])

# The curated shard rows (the data contract's curate schema, plus pixel_sha256 and eval_overlap).
OUTPUT_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("origin", pa.string()),
    ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("sha256", pa.string()), ("pixel_sha256", pa.string()), ("phash", pa.string()),
    ("caption", pa.string()), ("caption_t5_tokens", pa.int32()), ("aspect_bucket", pa.string()),
    *[(c, _LIST) for c in ATTR_COLUMNS],
    ("eval_overlap", pa.float64()), ("mix_weight", pa.float64()),
])
PLAN_SCHEMA = pa.schema([("pos", pa.int64()), ("shard", pa.int64()),
                         *[f for f in OUTPUT_SCHEMA if f.name != "image"]])
DROPPED_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("origin", pa.string()), ("pos", pa.int64()),
    ("reason", pa.string()), ("duplicate_of", pa.string()), ("detail", pa.string()),
])
ROW_GROUP_ROWS = 64  # rows per Parquet row group: ~64-128 MB of 1-2 MB images, one read for a loader


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def row_id(row: dict[str, Any]) -> str:
    return f"{row['source']}/{row['origin']}/{row['key']}"


# ----------------------------------------------------------------------------- per-row checks

def aspect_bucket(width: int, height: int) -> str:
    ratio = math.log(width / height)
    return min(ASPECT_BUCKETS, key=lambda b: abs(ratio - math.log(int(b.split(":")[0]) / int(b.split(":")[1]))))


def caption_attributes(caption: str) -> dict[str, list[str]]:
    text = caption.lower()
    return {f"attr_{cat}": sorted(set(rx.findall(text))) for cat, rx in _ATTRIBUTE_RE.items()}


def _message(err: Exception) -> str:
    """An error message without object addresses (`<_io.BytesIO object at 0x7f..>`): details are
    written to dropped.parquet, which must be byte-identical across rebuilds."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<image bytes>", str(err))[:200]


def inspect_image(data: bytes, filters: FilterConfig) -> dict[str, Any]:
    """Decode once; returns the image fields, with `reason`/`detail` set when it fails a check."""
    import imagehash
    from PIL import Image

    out: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest()}
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that, both while reading the header;
    # the warning is made an error so nothing above the limit is ever decoded.
    Image.MAX_IMAGE_PIXELS = filters.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                rgb = img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return {**out, "reason": "decompression_bomb", "detail": _message(err)}
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, ... on bad bytes
        return {**out, "reason": "decode_error", "detail": f"{type(err).__name__}: {_message(err)}"}
    w, h = rgb.size
    out.update(
        width=w, height=h, aspect_bucket=aspect_bucket(w, h),
        pixel_sha256=hashlib.sha256(f"{w}x{h}:".encode() + rgb.tobytes()).hexdigest(),
        phash=str(imagehash.phash(rgb)),
    )
    if min(w, h) < filters.min_side:
        out.update(reason="too_small", detail=f"{w}x{h}")
    elif max(w, h) / min(w, h) > filters.max_aspect:
        out.update(reason="bad_aspect", detail=f"{w}x{h}")
    return out


# ----------------------------------------------------------------------------- scan stages

def scan_units(batch: pa.Table, read_rows: int) -> Iterator[pa.Table]:
    """Read units -> raw rows, yielded `read_rows` at a time so one big tar never is one huge block."""
    for unit in batch.to_pylist():
        rows = []
        for r in read_unit(ReadUnit.from_dict(unit)):
            rows.append(r)
            if len(rows) == read_rows:
                yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def check_images(batch: pa.Table, filters: FilterConfig) -> pa.Table:
    """Raw rows -> scan rows: decode check and image filters; the image bytes are dropped here."""
    out = []
    for r in batch.to_pylist():
        row = {name: None for name in SCAN_SCHEMA.names}
        row.update(key=r["key"], source=r["source"], origin=r["origin"], pos=r["pos"], caption=r["caption"],
                   caption_from=r["caption_from"])
        if r["image"] is None:
            row["reason"] = "image_not_fetched" if r["url"] else "image_missing"
            row["detail"] = r["url"] or r["note"]  # the URL to fetch, or the member that is missing
        else:
            row.update(inspect_image(r["image"], filters))
        out.append(row)
    return pa.Table.from_pylist(out, schema=SCAN_SCHEMA)


class CaptionCheck:
    """Caption filters, T5 token counts, attributes and eval-prompt overlap."""

    def __init__(self, filters: FilterConfig, prompts: tuple[str, ...], ngram: int):
        from model.text_encoder import load_tokenizer

        self.tokenizer = load_tokenizer(filters.tokenizer)
        self.max_tokens = filters.max_caption_tokens
        self.index = PromptIndex(list(prompts), ngram) if prompts else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from model.text_encoder import count_tokens

        rows = batch.to_pylist()
        for r in rows:
            r["caption"] = (r["caption"] or "").strip() or None
        present = [r for r in rows if r["caption"]]
        counts = count_tokens(self.tokenizer, [r["caption"] for r in present]) if present else []
        for r, n in zip(present, counts):
            r["caption_t5_tokens"] = n
        for r in rows:
            if r["caption"] is None:
                if r["reason"] is None:
                    r["reason"] = "caption_empty"
                continue
            if r["reason"] is None and r["caption_t5_tokens"] > self.max_tokens:
                r["reason"], r["detail"] = "caption_too_long", f"{r['caption_t5_tokens']} tokens"
            r.update(caption_attributes(r["caption"]))
            r["eval_overlap"] = 0.0
            if self.index is not None:
                overlap, pid = self.index.best(r["caption"])
                r["eval_overlap"], r["eval_prompt"] = overlap, (self.index.prompts[pid] if pid >= 0 else None)
        return pa.Table.from_pylist(rows, schema=SCAN_SCHEMA)


@functools.lru_cache(maxsize=2)
def _caption_check(filters: FilterConfig, prompts: tuple[str, ...], ngram: int) -> CaptionCheck:
    return CaptionCheck(filters, prompts, ngram)


def check_captions(batch: pa.Table, filters: FilterConfig, prompts: tuple[str, ...], ngram: int) -> pa.Table:
    """CaptionCheck as a Ray task. Tasks rather than an actor pool: a tokenizer loads in about a
    second and Ray reuses task workers, so a per-process cache loads it once per worker while the
    stage fuses with the decode check and no actors are held idle for the whole scan."""
    return _caption_check(filters, prompts, ngram)(batch)


# ----------------------------------------------------------------------------- global step

class HammingIndex:
    """Finds an earlier 64-bit hash within `t` bits, without comparing against every hash.

    Pigeonhole: split the bits into t+1 bands; two hashes differing in at most t bits agree
    exactly on at least one band, so only hashes sharing a band value are compared. Hand-written
    because imagehash has no index and this is 20 lines; a BK-tree would do too.
    """

    def __init__(self, t: int, bits: int = 64):
        self.t = t
        edges = [round(i * bits / (t + 1)) for i in range(t + 2)]
        self.bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self.tables: list[dict[int, list[int]]] = [defaultdict(list) for _ in self.bands]
        self.hashes: list[int] = []
        self.ids: list[str] = []

    def find(self, h: int) -> str | None:
        """The earliest added id within t bits of h (earliest = first in the global order)."""
        candidates = set()
        for table, (shift, mask) in zip(self.tables, self.bands):
            candidates.update(table.get((h >> shift) & mask, ()))
        for i in sorted(candidates):
            if (h ^ self.hashes[i]).bit_count() <= self.t:
                return self.ids[i]
        return None

    def add(self, h: int, id_: str) -> None:
        for table, (shift, mask) in zip(self.tables, self.bands):
            table[(h >> shift) & mask].append(len(self.hashes))
        self.hashes.append(h)
        self.ids.append(id_)


def decide(rows: list[dict[str, Any]], cfg: CurateConfig) -> None:
    """Global drop decisions, in place, over rows already sorted by (source, origin, pos).

    Deterministic whatever the block order: the order is a total order fixed by the inputs, and
    every duplicate group keeps its first row in that order (source names sort alphabetically, so
    a picture in both BLIP3o and ShareGPT-4o is kept as the BLIP3o row).
    """
    seen_ids: set[str] = set()
    seen_pixels: dict[str, str] = {}
    near = HammingIndex(cfg.dedup.near_threshold) if cfg.dedup.near_threshold >= 0 else None
    for r in rows:
        r.setdefault("duplicate_of", None)
        if r["reason"] is not None:
            continue
        rid = row_id(r)
        if rid in seen_ids:
            r["reason"], r["duplicate_of"] = "duplicate_key", rid
            continue
        seen_ids.add(rid)
        if r["pixel_sha256"] in seen_pixels:
            r["reason"], r["duplicate_of"] = "duplicate_exact", seen_pixels[r["pixel_sha256"]]
            continue
        seen_pixels[r["pixel_sha256"]] = rid
        if near is not None:
            h = int(r["phash"], 16)
            match = near.find(h)
            if match is not None:
                r["reason"], r["duplicate_of"] = "duplicate_near", match
                continue
            near.add(h, rid)
    threshold = cfg.contamination.min_overlap
    for r in rows:
        if r["reason"] is None and r.get("eval_prompt") and r["eval_overlap"] >= threshold:
            r["contaminated"] = True
            if cfg.contamination.drop:
                r["reason"], r["detail"] = "eval_contamination", r["eval_prompt"]


def contamination_report(rows: list[dict[str, Any]], cfg: CurateConfig, n_prompts: int) -> dict[str, Any]:
    """Over the curated rows (and those dropped for contamination): which eval prompts they contain."""
    hit = [r for r in rows if r.get("contaminated")]
    curated = sum(1 for r in rows if r["reason"] in (None, "eval_contamination"))
    per_prompt = Counter(r["eval_prompt"] for r in hit)
    return {
        "prompt_files": list(cfg.contamination.prompts),
        "prompts": n_prompts,
        "ngram": cfg.contamination.ngram,
        "min_overlap": cfg.contamination.min_overlap,
        "rows_checked": curated,
        "rows_matched": len(hit),
        "fraction": len(hit) / curated if curated else 0.0,
        "prompts_matched": len(per_prompt),
        "by_source": dict(sorted(Counter(r["source"] for r in hit).items())),
        "top": [{"prompt": p, "rows": n} for p, n in sorted(per_prompt.items(), key=lambda x: (-x[1], x[0]))[:cfg.contamination.top]],
        "dropped": bool(cfg.contamination.drop),
        "flagged_files": flagged_files(rows),
    }


def flagged_files(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Release files known to be built from an evaluation's prompts (BLIP3o-60K's geneval_train.tar),
    flagged by name with the rows read and kept, whatever the n-gram check finds in them."""
    out = []
    for origin in sorted({r["origin"] for r in rows if r["source"] == "blip3o"}):
        why = blip3o.FLAGGED.get(origin.rsplit("/", 1)[-1])
        if why:
            mine = [r for r in rows if r["source"] == "blip3o" and r["origin"] == origin]
            out.append({"file": f"blip3o/{origin}", "rows_read": len(mine),
                        "rows_kept": sum(r["reason"] is None for r in mine), "why": why})
    return out


def statistics(rows: list[dict[str, Any]], cfg: CurateConfig) -> dict[str, Any]:
    kept = [r for r in rows if r["reason"] is None]
    weights = {s: float(getattr(cfg.sources, s).weight) for s in SOURCES}
    per_source_kept = Counter(r["source"] for r in kept)
    total_weight = sum(weights[s] for s in per_source_kept)
    dropped: dict[str, dict[str, int]] = {}
    for reason in REASONS:
        counts = Counter(r["source"] for r in rows if r["reason"] == reason)
        if counts:
            dropped[reason] = {**dict(sorted(counts.items())), "total": sum(counts.values())}
    attrs = {}
    for col in ATTR_COLUMNS:
        terms = Counter(t for r in kept for t in r[col])
        attrs[col.removeprefix("attr_")] = {
            "rows_with": sum(1 for r in kept if r[col]),
            "terms": dict(sorted(terms.items(), key=lambda x: (-x[1], x[0]))),
        }
    tokens = [r["caption_t5_tokens"] for r in kept]
    token_bins = Counter(min(t // 32, 7) for t in tokens)
    fallback: dict[str, dict[str, int]] = {}
    for r in rows:
        if r.get("caption_from"):
            counts = fallback.setdefault(f"{r['source']}.{r['caption_from']}", {"read": 0, "kept": 0})
            counts["read"] += 1
            counts["kept"] += r["reason"] is None
    return {
        "caption_fallback": dict(sorted(fallback.items())),
        "rows": {"read": len(rows), "kept": len(kept), "dropped": len(rows) - len(kept)},
        "sources": {
            s: {
                "read": sum(1 for r in rows if r["source"] == s),
                "kept": per_source_kept.get(s, 0),
                "weight": weights[s],
                # share of training samples drawn from this source when sampling by mix_weight
                "share": weights[s] / total_weight if total_weight and per_source_kept.get(s) else 0.0,
            }
            for s in SOURCES
        },
        "dropped": dropped,
        "aspect_buckets": {b: n for b in ASPECT_BUCKETS if (n := sum(1 for r in kept if r["aspect_bucket"] == b))},
        "attributes": attrs,
        "caption_t5_tokens": {
            "min": min(tokens, default=0), "max": max(tokens, default=0),
            "mean": sum(tokens) / len(tokens) if tokens else 0.0,
            "histogram": {f"{32 * b}-{32 * b + 31 if b < 7 else 'inf'}": token_bins[b] for b in range(8) if token_bins[b]},
        },
    }


def plan_shards(rows: list[dict[str, Any]], units: list[ReadUnit], cfg: CurateConfig) -> list[dict[str, Any]]:
    """One write item per unit with kept rows: the unit and its rows' shard numbers (Arrow IPC)."""
    kept: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["reason"] is None:
            kept[(r["source"], r["origin"])].append(r)
    items, shard = [], 0
    for unit in units:  # sorted by (source, origin), the same order as the rows
        unit_rows = kept.get((unit.source, unit.origin), [])
        if not unit_rows:
            continue
        plan = []
        for i, r in enumerate(unit_rows):
            if i and i % cfg.shard_rows == 0:
                shard += 1
            plan.append({**{f.name: r.get(f.name) for f in PLAN_SCHEMA}, "shard": shard,
                         "mix_weight": float(getattr(cfg.sources, r["source"]).weight)})
        shard += 1
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, PLAN_SCHEMA) as writer:
            writer.write_table(pa.Table.from_pylist(plan, schema=PLAN_SCHEMA))
        items.append({"unit": unit.to_dict(), "plan": sink.getvalue().to_pybytes()})
    return items


# ----------------------------------------------------------------------------- write stage

def parquet_bytes(table: pa.Table) -> bytes:
    """Parquet with fixed settings, so equal tables give equal bytes (no timestamps in Parquet).

    Image bytes are already compressed (JPEG/PNG): stored as is, without min/max statistics
    (which would copy image prefixes into the footer); every other column is zstd.
    """
    names = table.schema.names
    sink = pa.BufferOutputStream()
    pq.write_table(
        table, sink, row_group_size=ROW_GROUP_ROWS,
        compression={n: ("none" if n == "image" else "zstd") for n in names},
        write_statistics=[n for n in names if n != "image"],
    )
    return sink.getvalue().to_pybytes()


def write_units(batch: pa.Table, output: str) -> pa.Table:
    """Re-read each unit and write its kept rows into the shards the plan names."""
    written = []
    for item in batch.to_pylist():
        unit = ReadUnit.from_dict(item["unit"])
        plan = pa.ipc.open_stream(item["plan"]).read_all().to_pylist()
        by_pos = {p["pos"]: p for p in plan}
        need = Counter(p["shard"] for p in plan)
        shards: dict[int, list[dict[str, Any]]] = defaultdict(list)
        found = 0
        for r in read_unit(unit):
            p = by_pos.get(r["pos"])
            if p is None:
                continue
            if r["image"] is None or hashlib.sha256(r["image"]).hexdigest() != p["sha256"]:
                raise ValueError(f"{unit.uris[0]}: row {r['key']} changed since the scan; rebuild from a stable copy")
            rows = shards[p["shard"]]
            rows.append({**{k: v for k, v in p.items() if k not in ("pos", "shard")}, "image": r["image"]})
            found += 1
            if len(rows) == need[p["shard"]]:  # complete: write now, so a worker holds one shard at most
                written.append(_write_shard(output, p["shard"], shards.pop(p["shard"])))
            if found == len(plan):
                break  # the rest of the file holds no kept row
        if found != len(plan):
            raise ValueError(f"{unit.uris[0]}: {len(plan) - found} rows seen in the scan are gone; rebuild from a stable copy")
    return pa.Table.from_pylist(written, schema=pa.schema([
        ("path", pa.string()), ("rows", pa.int64()), ("sha256", pa.string()), ("bytes", pa.int64())]))


@retry.in_stage("curate")
def _write_shard(output: str, index: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    data = parquet_bytes(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))
    storage.write_bytes(storage.join(output, shard_name(index)), data)
    return {"path": shard_name(index), "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# ----------------------------------------------------------------------------- the job

def read_units(cfg: CurateConfig) -> list[ReadUnit]:
    """Every read unit of the configured sources, sorted by (source, origin), layouts checked."""
    s = cfg.sources
    units = blip3o.units(s.blip3o) + dalle3.units(s.dalle3) + sharegpt4o.units(s.sharegpt4o)
    if not units:
        raise ValueError("no sources given: set sources.blip3o.paths, sources.dalle3.paths and/or "
                         "sources.sharegpt4o.folder (or .metadata + .images)")
    probes = {"blip3o": blip3o.probe, "dalle3": dalle3.probe, "sharegpt4o": sharegpt4o.probe}
    for unit in units:
        probes[unit.source](unit)  # an unknown layout fails here, naming the file, before any Ray work
    return sorted(units, key=lambda u: (u.source, u.origin))


def existing_output(output: str, overwrite: bool) -> list[str]:
    """The files of a dataset already in `output` (an error unless overwrite)."""
    if not output:
        raise ValueError("output is empty: give the dataset folder, e.g. output=/data/finetune or s3://bucket/finetune")
    old = [u for u in storage.list_files(output)
           if storage.relpath(u, output) in (manifest_lib.MANIFEST_NAME, manifest_lib.DROPPED_NAME)
           or re.fullmatch(r"shard-\d+\.parquet", storage.relpath(u, output))]
    if old and not overwrite:
        raise ValueError(f"output {output} already holds a dataset ({len(old)} files); pass overwrite=true to replace it")
    return old


def clear_output(output: str, old: list[str]) -> None:
    manifest_uri = storage.join(output, manifest_lib.MANIFEST_NAME)
    if storage.exists(manifest_uri):  # first, so the folder never looks complete while half replaced
        storage.delete(manifest_uri)
    for uri in old:
        if storage.exists(uri):
            storage.delete(uri)


def _digest(row: dict[str, Any]) -> dict[str, Any]:
    digest, size = storage.file_digest(row["uri"])
    return {"uri": row["uri"], "sha256": digest, "bytes": size}


@retry.in_stage("curate")
def curate(cfg: CurateConfig, units: list[ReadUnit] | None = None, log=print) -> manifest_lib.Manifest:
    """Run the whole job on the current Ray cluster (the caller has called ray.init).

    `units` (from `read_units(cfg)`) may be passed by a caller that checked the layouts already.
    """
    import ray

    from model.text_encoder import load_tokenizer

    old_output = existing_output(cfg.output, cfg.overwrite)  # fail before any work, not after
    units = read_units(cfg) if units is None else units
    load_tokenizer(cfg.filters.tokenizer)  # fail now, on the driver, if the tokenizer is not there
    prompts = load_prompts(cfg.contamination.prompts)
    prompt_index = PromptIndex(prompts, cfg.contamination.ngram)
    par = cfg.parallelism
    blocks = lambda n: max(1, min(par.blocks or n, n))  # noqa: E731
    log(f"curate: {len(units)} read units, {len(prompt_index.prompts)} eval prompts")

    # scan
    ds = ray.data.from_items([u.to_dict() for u in units], override_num_blocks=blocks(len(units)))
    # Reading is I/O bound; giving it a fraction of a CPU also keeps Ray from fusing it with the
    # decode stage, so decoding spreads over the cluster even when there are few, large files.
    ds = ds.map_batches(scan_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"read_rows": par.read_rows},
                        compute=ray.data.TaskPoolStrategy(size=par.concurrency), num_cpus=0.5)
    ds = ds.map_batches(check_images, batch_size=par.batch_size, batch_format="pyarrow",
                        fn_kwargs={"filters": cfg.filters}, compute=ray.data.TaskPoolStrategy(size=par.concurrency), num_cpus=1)
    ds = ds.map_batches(check_captions, batch_size=par.batch_size, batch_format="pyarrow",
                        fn_kwargs={"filters": cfg.filters, "prompts": tuple(prompts), "ngram": cfg.contamination.ngram},
                        compute=ray.data.TaskPoolStrategy(size=par.concurrency), num_cpus=1)
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    scan = pa.concat_tables(tables) if tables else SCAN_SCHEMA.empty_table()
    rows = scan.sort_by([("source", "ascending"), ("origin", "ascending"), ("pos", "ascending")]).to_pylist()

    # ShareGPT-4o records whose image is in none of the archives
    sg = cfg.sources.sharegpt4o
    if sharegpt4o.metadata_uri(sg):
        found = {r["key"] for r in rows if r["source"] == "sharegpt4o"}
        for m in sharegpt4o.missing(sg, found):
            rows.append({**{n: None for n in SCAN_SCHEMA.names}, **{k: m[k] for k in ("key", "source", "origin", "pos", "caption")},
                         "reason": "image_missing", "detail": m["note"]})
        rows.sort(key=lambda r: (r["source"], r["origin"], r["pos"]))
    log(f"curate: scanned {len(rows)} rows")

    # decide
    decide(rows, cfg)
    stats = statistics(rows, cfg)
    stats["contamination"] = contamination_report(rows, cfg, len(prompt_index.prompts))
    if any(u.source == "blip3o" for u in units):
        stats["releases"] = {"blip3o_tars": blip3o.release_report(units)}

    # write
    clear_output(cfg.output, old_output)
    items = plan_shards(rows, units, cfg)
    shards: list[manifest_lib.FileEntry] = []
    if items:
        wds = ray.data.from_items(items, override_num_blocks=blocks(len(items)))
        wds = wds.map_batches(write_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"output": cfg.output},
                              compute=ray.data.TaskPoolStrategy(size=par.concurrency), num_cpus=1)
        for t in ray.get(wds.to_arrow_refs()):
            shards += [manifest_lib.FileEntry(**e) for e in t.to_pylist()]

    log(f"curate: wrote {sum(s.rows or 0 for s in shards)} rows in {len(shards)} shards")

    # record: dropped rows, input hashes, then the manifest last
    dropped = [{k: r.get(k) for k in DROPPED_SCHEMA.names} for r in rows if r["reason"] is not None]
    data = parquet_bytes(pa.Table.from_pylist(dropped, schema=DROPPED_SCHEMA))
    storage.write_bytes(storage.join(cfg.output, manifest_lib.DROPPED_NAME), data)
    stats["dropped_file"] = {"path": manifest_lib.DROPPED_NAME, "rows": len(dropped),
                             "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    uris = sorted({u for unit in units for u in unit.uris} | {u.metadata for u in units if u.metadata}
                  | set(cfg.contamination.prompts))
    digests = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=blocks(len(uris))).map(_digest).take_all()
    inputs = [manifest_lib.FileEntry(path=d["uri"], sha256=d["sha256"], bytes=d["bytes"])
              for d in sorted(digests, key=lambda d: d["uri"])]
    recorded = {k: v for k, v in to_dict(cfg).items() if k not in NOT_RECORDED}
    result = manifest_lib.Manifest(kind="curate", config=recorded, inputs=inputs, shards=shards, stats=stats)
    manifest_lib.write(cfg.output, result)
    log(format_report(stats))
    return result


def format_report(stats: dict[str, Any]) -> str:
    """The reasons table (rows: reasons, columns: sources) and the contamination summary."""
    sources = [s for s in SOURCES if stats["sources"][s]["read"]]
    width = max([len(r) for r in REASONS] + [8])
    lines = [f"{'rows':<{width}}  " + "  ".join(f"{s:>10}" for s in sources) + f"  {'total':>8}"]
    lines.append(f"{'read':<{width}}  " + "  ".join(f"{stats['sources'][s]['read']:>10}" for s in sources)
                 + f"  {stats['rows']['read']:>8}")
    for reason, counts in stats["dropped"].items():
        lines.append(f"{reason:<{width}}  " + "  ".join(f"{counts.get(s, 0):>10}" for s in sources) + f"  {counts['total']:>8}")
    lines.append(f"{'kept':<{width}}  " + "  ".join(f"{stats['sources'][s]['kept']:>10}" for s in sources)
                 + f"  {stats['rows']['kept']:>8}")
    c = stats["contamination"]
    if c["prompts"]:
        action = "dropped" if c["dropped"] else "kept (contamination.drop=true drops them)"
        lines.append(f"contamination: {c['rows_matched']} of {c['rows_checked']} captions contain one of "
                     f"{c['prompts']} eval prompts ({c['ngram']}-grams, min overlap {c['min_overlap']}); {action}")
        lines += [f"  {t['rows']:>6}  {t['prompt']}" for t in c["top"]]
    for f in c.get("flagged_files", []):
        lines.append(f"flagged: {f['file']} ({f['rows_read']} rows read, {f['rows_kept']} kept): {f['why']}")
    for name, n in stats.get("caption_fallback", {}).items():
        source, column = name.split(".", 1)
        lines.append(f"caption fallback: {n['read']} {source} rows with an empty caption took {column} ({n['kept']} kept)")
    missing = stats.get("releases", {}).get("blip3o_tars", {}).get("missing")
    if missing:
        lines.append(f"note: BLIP3o-60K tars not given: {', '.join(missing)}")
    if stats["dropped"].get("image_not_fetched"):
        lines.append(f"note: image_not_fetched - {REASONS['image_not_fetched']}")
    return "\n".join(lines)
