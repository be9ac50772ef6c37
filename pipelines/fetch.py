"""Fetch a URL list (CC12M and its published recaption metadata) into Parquet shards, as Ray tasks;
or import a WebDataset mirror of it (pixparse/cc12m-wds) into the same shards without downloading.

    URL list --(fixed-size input shards)--> Ray task per shard --> shard-NNNNN.parquet + commit marker
    tar i of the mirror ------------------> Ray task per tar   --> shard-i.parquet + commit marker
                                                              ... --> manifest.json (last)

Input: TSV/CSV (optionally compressed), Parquet or JSONL with a url column and caption columns. The
published CC12M list is a headerless TSV `url<TAB>caption`; the CaptionEmporium LLaVA-NeXT metadata
(conceptual-captions-cc12m-llavanext) is JSONL with `caption_llava`, `caption_llava_short`, the alt
text `caption` and `status` beside the url, and the reference's parquet of it is `url, caption,
caption_llava_short, key` (`pipelines/sources/captions.py`). The LLaVA caption becomes the shards'
`caption` column, the one training reads; only "success" rows of such a list are kept; other
caption columns are carried verbatim. JSONL lists are read a block at a time, keeping only the
columns used.

A WebDataset import (`wds=...`, `pipelines/sources/cc12m_wds.py`) makes one shard per tar, in
order, keeping the mirror's `__key__`, the url from its `.json` and the alt text from its `.txt`.
Its images pass the same checks as downloads (header pixel limit, img2dataset's Resizer), but an
image already at the target size keeps its bytes (the mirror was made by img2dataset at 512).
A sample without an image member, with an undecodable image, or cut short by a damaged tar is a
row with status "failed" and its own status_class; a damaged tar is also named in the statistics.

What comes from img2dataset 1.47 and what does not:
- used as is: its `Resizer` (decode, resize, re-encode with OpenCV), `compute_key` (keys compatible
  with an img2dataset run of the same shard size, so published recaptions keyed that way join) and
  `is_disallowed` (X-Robots-Tag opt-outs, in `url_safety`).
- not used: its `download_image` (urllib: follows redirects and resolves names by itself, no byte
  cap; see `url_safety`), its `Downloader.download_shard` (writes rows in completion order, stamps
  no deterministic order, and its writer streams straight to the final path, so a killed run leaves
  a half shard under the real name) and its Ray distributor (submits every shard once and drops the
  failed ones instead of retrying them). The shard loop below follows `download_shard`'s shape:
  threads download, one thread decodes and resizes, a semaphore bounds the bodies held in memory.

Determinism: rows keep input order, keys come from positions, nothing time-dependent is written,
so a killed run re-run gives byte-identical shards and manifest to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import posixpath
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from threading import Semaphore
from typing import Any

# albumentations (imported by img2dataset's resizer) checks PyPI for updates on import unless told
# not to; the fetch workers must not send traffic anywhere but the URLs they were given.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
from PIL import Image

from pipelines import manifest as manifest_lib
from pipelines import retry, storage
from pipelines.sources import captions as caption_files
from pipelines.sources.captions import training_caption_column
from pipelines.url_safety import RETRYABLE, AllowList, Response, SafetyPolicy, safe_get

# Decompression bombs are refused from the header (see `_check_header`); PIL's own warning is noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

COMMIT_DIR = manifest_lib.COMMIT_DIR
# Output column order; carried caption columns go after alt_text.
HEAD_COLUMNS = ("key", "url", "alt_text")
TAIL_FIELDS = (
    pa.field("image", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("sha256", pa.string()),
    pa.field("status", pa.string()),          # "success", "failed" or "refused"
    pa.field("status_class", pa.string()),    # "ok", "http_404", "timeout", "forbidden_address", ...
    pa.field("error", pa.string()),
)
RESERVED = frozenset(HEAD_COLUMNS) | {f.name for f in TAIL_FIELDS} | {"caption"}
_URL_COLUMNS = ("url", "image_url", "URL", "img_url")
_ALT_COLUMNS = ("caption", "alt_text", "txt", "text", "TEXT")


@dataclass
class FetchConfig:
    urls: str = ""                       # URL list: local path or s3:// (tsv/csv/parquet/jsonl, .gz ok)
    out: str = ""                        # dataset folder: local path or s3://bucket/prefix
    input_format: str = "auto"           # auto (from the suffix), tsv, csv, parquet, jsonl
    url_col: str = ""                    # "" = first of url, image_url, URL, img_url
    caption_col: str = ""                # alt-text column; "" = first of caption, alt_text, txt, text
    carry: list[str] | None = None       # extra columns kept verbatim; None = every *caption* column
    shard_size: int = 2000               # rows per shard (fixed: shard i is rows [i*size, (i+1)*size))
    image_size: int = 512                # img2dataset Resizer: target side
    resize_mode: str = "keep_ratio"      # no, keep_ratio, center_crop, border, keep_ratio_largest
    resize_only_if_bigger: bool = True   # never upscale small images
    encode_format: str = "jpg"           # jpg, png, webp
    encode_quality: int = 95
    min_image_size: int = 0              # shorter side below this -> failed/image_too_small
    max_pixels: int = 50_000_000         # width*height from the header above this -> refused
    max_bytes: int = 20 << 20            # per-response body cap
    timeout: float = 10.0                # seconds per response
    max_redirects: int = 5
    allow_hosts: list[str] = field(default_factory=list)  # names or CIDRs exempt from the address policy
    disallowed_header_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    threads: int = 32                    # concurrent downloads inside one shard task
    retries: int = 0                     # extra attempts per URL for retryable failures in a normal pass
    retry_attempts: int = 3              # attempts per URL in a retry_failed=true pass
    backoff: float = 1.0                 # seconds before a URL's second attempt; doubles after each
    num_cpus: float = 1.0                # Ray resources per shard task
    max_shard_attempts: int = 3          # a shard task that crashes is resubmitted up to this many times
    max_in_flight: int = 0               # shard tasks submitted at once; 0 = 2x the cluster's CPUs
    wds: str = ""                        # import WebDataset tars instead of urls: brace pattern, folder or s3:// prefix
    recaption_col: str = "auto"          # list column that becomes the training `caption`; auto = caption_llava, or
                                         # the reference parquet's caption (sources/captions.py); "" = none
    keep_status: str = "success"         # a list with a `status` column keeps only these rows; "" = every row


# Fields that change what a shard holds. A folder's commit markers record their hash, so resuming
# into a folder built from another list or with other settings is refused instead of mixing shards.
_SHARD_FIELDS = (
    "input_format", "url_col", "caption_col", "recaption_col", "keep_status", "carry", "shard_size", "image_size", "resize_mode",
    "resize_only_if_bigger", "encode_format", "encode_quality", "min_image_size", "max_pixels",
    "max_bytes", "timeout", "max_redirects", "allow_hosts", "disallowed_header_directives",
)


def check_encoding(config: FetchConfig) -> None:
    """Refuse encoder settings img2dataset's Resizer would reject inside every shard task."""
    if config.encode_format not in ("jpg", "png", "webp"):
        raise ValueError(f"encode_format {config.encode_format!r}: use jpg, png or webp")
    low, high = (0, 9) if config.encode_format == "png" else (0, 100)
    if not low <= config.encode_quality <= high:
        what = "the zlib compression level" if config.encode_format == "png" else "the quality"
        raise ValueError(f"encode_quality {config.encode_quality} out of range for {config.encode_format}: "
                         f"it is {what}, {low}..{high}")


def manifest_config(config: FetchConfig) -> dict[str, Any]:
    """The config as recorded in the manifest: where the output went is not part of what it is."""
    from pipelines.config import to_dict

    return {k: v for k, v in to_dict(config).items() if k != "out"}


# ---------------------------------------------------------------------------------------------
# Reading the URL list


def _format_of(uri: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = uri.lower()
    for suffix in (".gz", ".bz2", ".zst", ".lz4"):
        name = name.removesuffix(suffix)
    for fmt, suffixes in {"tsv": (".tsv",), "csv": (".csv",), "parquet": (".parquet",), "jsonl": (".jsonl", ".json")}.items():
        if name.endswith(suffixes):
            return fmt
    raise ValueError(f"cannot tell the format of URL list {uri} from its name; pass input_format=tsv|csv|parquet|jsonl")


def _read_delimited(fs, path: str, uri: str, delimiter: str) -> pa.Table:
    import csv

    with fs.open_input_stream(path, compression="detect") as f:
        first = f.read(1 << 16).decode("utf-8", errors="replace").splitlines()
    if not first:
        raise ValueError(f"URL list {uri} is empty")
    # The published CC12M TSV has no header: its first field is already a URL.
    header = next(csv.reader([first[0]], delimiter=delimiter)) if delimiter == "," else first[0].split("\t")
    if header[0].strip().lower().startswith(("http://", "https://")):
        names = ["url", "caption"] + [f"column_{i}" for i in range(2, len(header))]
        skip = 0
    else:
        names, skip = [h.strip() for h in header], 1
    with fs.open_input_stream(path, compression="detect") as f:
        return pacsv.read_csv(
            f,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip, block_size=64 << 20),
            # TSV lists are not quoted (CC12M captions contain bare quotes); CSV follows RFC 4180.
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False),
        )


@dataclass
class UrlList:
    """A URL list as read, with the roles of its columns."""

    table: pa.Table                  # the rows kept, in file order
    url_col: str
    alt_col: str | None              # -> alt_text
    caption_col: str | None          # -> caption (the training caption: a published recaption)
    carry: list[str]                 # copied verbatim
    skipped: dict[str, int]          # rows left out, by reason (e.g. status_not_success)


def _roles(uri: str, columns: list[str], config: FetchConfig) -> tuple[str, str | None, str | None, list[str]]:
    """(url, alt text, training caption, carried) columns of a list with these columns."""
    url_col = config.url_col or next((c for c in _URL_COLUMNS if c in columns), "")
    if url_col not in columns:
        raise ValueError(f"URL list {uri} has no url column (columns: {', '.join(columns)}); pass url_col=NAME")
    if config.recaption_col == "auto":
        caption_col = training_caption_column(columns, for_url_list=True)
    else:
        caption_col = config.recaption_col or None
    if caption_col is not None and caption_col not in columns:
        raise ValueError(f"recaption column {caption_col!r} not in URL list {uri} (columns: {', '.join(columns)})")
    # In the reference's parquet `caption` is the LLaVA caption and there is no alt text.
    alt_col = config.caption_col or next((c for c in _ALT_COLUMNS if c in columns and c != caption_col), None)
    if alt_col is not None and alt_col not in columns:
        raise ValueError(f"caption column {alt_col!r} not in URL list {uri} (columns: {', '.join(columns)})")
    if config.carry is None:
        carry = [c for c in columns if "caption" in c.lower() and c not in (url_col, alt_col, caption_col)]
    else:
        carry = list(config.carry)
        missing = [c for c in carry if c not in columns]
        if missing:
            raise ValueError(f"carry columns {missing} not in URL list {uri} (columns: {', '.join(columns)})")
    clash = sorted(set(carry) & RESERVED)
    if clash:
        raise ValueError(f"cannot carry column(s) {clash} from {uri}: the shard schema reserves those names")
    return url_col, alt_col, caption_col, carry


def read_url_list(uri: str, config: FetchConfig) -> UrlList:
    """A URL list, its column roles, and the rows a `status` column says to leave out."""
    fs, path = storage.resolve(uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"URL list {uri} does not exist")
    fmt = _format_of(uri, config.input_format)
    if fmt not in ("tsv", "csv", "parquet", "jsonl"):
        raise ValueError(f"unknown input_format {fmt!r}: use tsv, csv, parquet or jsonl")
    try:
        if fmt in ("tsv", "csv"):
            table = _read_delimited(fs, path, uri, "\t" if fmt == "tsv" else ",")
            columns = table.column_names
        elif fmt == "parquet":
            columns = pq.read_schema(path, filesystem=fs).names
        else:
            columns = caption_files.fields(uri)
        url_col, alt_col, caption_col, carry = _roles(uri, columns, config)
        status = caption_files.STATUS_COLUMN if config.keep_status and caption_files.STATUS_COLUMN in columns else None
        wanted = list(dict.fromkeys(c for c in (url_col, alt_col, caption_col, *carry, status) if c))
        if fmt == "parquet":
            table = pq.read_table(path, columns=wanted, filesystem=fs)
        elif fmt == "jsonl":  # a block at a time, only the columns used: CaptionEmporium's file is 3.58 GB gzipped
            blocks = [b.table for b in caption_files.iter_blocks(uri, wanted)]
            table = pa.concat_tables(blocks) if blocks else pa.schema([(c, pa.string()) for c in wanted]).empty_table()
    except pa.ArrowInvalid as err:
        raise ValueError(f"cannot parse URL list {uri} as {fmt}: {err}") from err
    skipped = {}
    if status:
        keep = pa.compute.fill_null(pa.compute.equal(table.column(status), config.keep_status), False)
        skipped[f"status_not_{config.keep_status}"] = table.num_rows - int(pa.compute.sum(keep).as_py() or 0)
        table = table.filter(keep)
    return UrlList(table, url_col, alt_col, caption_col, carry, skipped)


# ---------------------------------------------------------------------------------------------
# One shard


@dataclass(frozen=True)
class Shard:
    index: int
    start: int       # first input row
    stop: int        # one past the last input row
    width: int       # digits in shard names

    @property
    def name(self) -> str:
        return f"shard-{self.index:0{self.width}d}.parquet"

    @property
    def marker(self) -> str:
        return f"{COMMIT_DIR}/shard-{self.index:0{self.width}d}.json"


def plan_shards(num_rows: int, shard_size: int) -> list[Shard]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    count = max(1, math.ceil(num_rows / shard_size))
    width = max(5, len(str(count - 1)))
    return [Shard(i, i * shard_size, min(num_rows, (i + 1) * shard_size), width) for i in range(count)]


def shard_schema(carry_fields: list[pa.Field], caption: bool = False) -> pa.Schema:
    head = [pa.field("key", pa.string()), pa.field("url", pa.string()), pa.field("alt_text", pa.string())]
    if caption:  # a published recaption carried from the URL list: what training reads
        head.append(pa.field("caption", pa.string()))
    return pa.schema([*head, *carry_fields, *TAIL_FIELDS])


def _check_header(body: bytes, content_type: str, max_pixels: int) -> Response | None:
    """Refuse images whose header claims more than `max_pixels` before anything decodes them.

    PIL's `Image.open` parses only the header; the full decode (OpenCV, in the resizer) comes later
    and would allocate width*height*channels bytes up front: 2.7 GB for a PNG claiming 30000x30000.
    """
    try:
        with Image.open(io.BytesIO(body)) as im:
            width, height = im.size
    except Image.DecompressionBombError as err:
        return Response(None, "refused", "too_many_pixels", f"decompression bomb: {err}")
    except Exception as err:  # noqa: BLE001 - PIL raises many types for non-images
        # The type only: PIL's messages name the in-memory buffer's address, which differs per run.
        return Response(None, "failed", "not_image", f"not an image (Content-Type {content_type or 'none'}; {type(err).__name__})")
    if width * height > max_pixels:
        return Response(None, "refused", "too_many_pixels", f"{width}x{height} pixels over the limit of {max_pixels}")
    return None


_RESIZER_ERRORS = {"image too small": "image_too_small", "aspect ratio too large": "bad_aspect",
                   "image area too large": "too_many_pixels"}


def failed_row(status: str, status_class: str, error: str) -> dict[str, Any]:
    """The TAIL_FIELDS of a row without an image."""
    return {**{f.name: None for f in TAIL_FIELDS}, "status": status, "status_class": status_class, "error": error}


class ImageCheck:
    """One image body -> the TAIL_FIELDS of its row: the header pixel limit, then img2dataset's
    `Resizer` (decode, resize, re-encode), then the sha256 of the bytes stored.

    `reencode=False` keeps the bytes of an image the resizer leaves at its size and format
    (img2dataset's `skip_reencode`), for images a WebDataset mirror already resized.
    Not thread-safe: img2dataset's Resizer silences OpenCV by swapping process-wide file
    descriptors 1 and 2, so one thread calls it.
    """

    def __init__(self, config: FetchConfig, reencode: bool = True):
        from img2dataset.resizer import Resizer

        self.max_pixels = config.max_pixels
        self.resizer = Resizer(
            image_size=config.image_size, resize_mode=config.resize_mode,
            resize_only_if_bigger=config.resize_only_if_bigger, encode_format=config.encode_format,
            encode_quality=config.encode_quality, min_image_size=config.min_image_size,
            max_image_area=config.max_pixels, skip_reencode=not reencode,
        )

    def __call__(self, body: bytes, content_type: str = "") -> dict[str, Any]:
        refused = _check_header(body, content_type, self.max_pixels)
        if refused is not None:
            return failed_row(refused.status, refused.status_class, refused.error)
        img, width, height, orig_w, orig_h, err = self.resizer(io.BytesIO(body))
        if err is not None:
            cls = _RESIZER_ERRORS.get(err, "decode_error")
            return failed_row("refused" if cls == "too_many_pixels" else "failed", cls, err)
        return {"image": img, "width": width, "height": height, "original_width": orig_w, "original_height": orig_h,
                "sha256": hashlib.sha256(img).hexdigest(), "status": "success", "status_class": "ok", "error": ""}


class ShardFetcher:
    """Downloads and checks a list of URLs; results come back in input order.

    Built once per task; holds the safety policy and the image check.
    """

    def __init__(self, config: FetchConfig):
        import img2dataset.downloader  # noqa: F401 - the X-Robots-Tag check; imported before any deadline runs

        self.config = config
        self.policy = SafetyPolicy(
            allow=AllowList.parse(config.allow_hosts), timeout=config.timeout, max_bytes=config.max_bytes,
            max_redirects=config.max_redirects,
            disallowed_header_directives=frozenset(d.strip().lower() for d in config.disallowed_header_directives),
        )
        self.check = ImageCheck(config)

    def _download(self, url: str | None, attempts: int) -> Response:
        if not url:
            return Response(None, "failed", "bad_url", "empty url")
        for attempt in range(attempts):
            resp = safe_get(url, self.policy)
            if resp.status_class not in RETRYABLE or attempt == attempts - 1:
                break
            time.sleep(self.config.backoff * 2**attempt)
        return resp

    def __call__(self, urls: list[str | None], attempts: int = 1) -> tuple[dict[str, list], int]:
        """urls -> (columns image..error, one entry per url in order; bytes downloaded)."""
        n = len(urls)
        out = {f.name: [None] * n for f in TAIL_FIELDS}
        downloaded = 0
        # Bound the bodies waiting for the image check, as img2dataset's download_shard does.
        semaphore = Semaphore(self.config.threads * 2)

        def jobs():
            for i, url in enumerate(urls):
                semaphore.acquire()
                yield i, url

        # The image check runs in this thread only (see ImageCheck).
        with ThreadPool(max(1, min(self.config.threads, n))) as pool:
            for i, resp in pool.imap_unordered(lambda job: (job[0], self._download(job[1], attempts)), jobs()):
                try:
                    downloaded += resp.bytes_read
                    if resp.body is None:
                        row = failed_row(resp.status, resp.status_class, resp.error)
                    else:
                        row = self.check(resp.body, resp.content_type)
                    for name, value in row.items():
                        out[name][i] = value
                finally:
                    semaphore.release()
        return out, downloaded


def shard_stats(table: pa.Table) -> dict[str, Any]:
    """Statistics that follow from a shard's rows alone (so they are the same however it was built)."""
    images = table.column("image")
    return {
        "rows": table.num_rows,
        "status": dict(sorted(Counter(table.column("status").to_pylist()).items())),
        "status_class": dict(sorted(Counter(table.column("status_class").to_pylist()).items())),
        "bytes_stored": int(sum(len(b) for b in images.to_pylist() if b is not None)),
    }


def _encode(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    # Small row groups let readers (Ray Data, training) stream a shard instead of loading it whole.
    pq.write_table(table, sink, row_group_size=256)
    return sink.getvalue().to_pybytes()


class ShardNotStored(retry.StorageUnavailable):
    """A shard built but not stored within the retry budget; carries its bytes and marker so the
    next attempt only uploads them (`store_built`) instead of downloading the shard again."""

    def __init__(self, message: str, built: tuple[str, str, bytes, dict[str, Any], dict[str, Any]]):
        super().__init__(message)
        self.built = built

    def __reduce__(self):                         # crosses Ray's process boundary with its payload
        return (ShardNotStored, (str(self), self.built))


def store_built(out: str, name: str, data: bytes, marker: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Write a built shard, then its commit marker; both atomic. Returns the marker plus this run's numbers."""
    storage.write_bytes(storage.join(out, name), data)
    storage.write_bytes(storage.join(out, COMMIT_DIR, name.rsplit(".", 1)[0] + ".json"),
                        (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode())
    return {**marker, **extra}


def commit_shard(out: str, shard: Shard, table: pa.Table, fingerprint: str, source: dict[str, Any],
                 downloaded: int = 0, fetched_ok: int | None = None) -> dict[str, Any]:
    """Write the shard, then its commit marker; both atomic. `source` says what the shard was made
    from (input rows, or a tar). Returns the marker plus this run's numbers (`fetched_ok`: images
    this run added, by default every successful row)."""
    data = _encode(table)
    marker = {
        "shard": shard.name, "rows": table.num_rows, **source,
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "fingerprint": fingerprint,
        "stats": shard_stats(table),
    }
    if fetched_ok is None:
        fetched_ok = sum(s == "success" for s in table.column("status").to_pylist())
    built = (out, shard.name, data, marker, {"downloaded": downloaded, "fetched_ok": fetched_ok})
    try:
        return store_built(*built)
    except retry.StorageUnavailable as err:
        raise ShardNotStored(str(err), built) from None


def _table(schema: pa.Schema, columns: dict[str, Any]) -> pa.Table:
    arrays = [columns[f.name] if isinstance(columns[f.name], (pa.Array, pa.ChunkedArray)) else pa.array(columns[f.name], f.type)
              for f in schema]
    return pa.Table.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays], schema=schema)


def fetch_shard(config: FetchConfig, shard: Shard, rows: pa.Table, roles: UrlList, fingerprint: str) -> dict[str, Any]:
    """Download one input shard and commit it. Runs inside a Ray task (`roles.table` is empty here)."""
    from img2dataset.downloader import compute_key

    oom_sample = math.ceil(math.log10(config.shard_size)) if config.shard_size > 1 else 1
    keys = [compute_key(i, shard.index, oom_sample, shard.width) for i in range(rows.num_rows)]
    tail, downloaded = ShardFetcher(config)(rows.column(roles.url_col).to_pylist(), attempts=1 + max(0, config.retries))
    text = lambda col: rows.column(col).cast(pa.string()) if col else pa.nulls(rows.num_rows, pa.string())  # noqa: E731
    schema = shard_schema([rows.schema.field(c) for c in roles.carry], caption=roles.caption_col is not None)
    columns = {"key": keys, "url": rows.column(roles.url_col).cast(pa.string()), "alt_text": text(roles.alt_col),
               "caption": text(roles.caption_col), **{c: rows.column(c) for c in roles.carry}, **tail}
    return commit_shard(config.out, shard, _table(schema, columns), fingerprint,
                        {"input_rows": [shard.start, shard.stop]}, downloaded)


def retry_shard(config: FetchConfig, shard: Shard, fingerprint: str) -> dict[str, Any]:
    """Re-fetch the rows of a committed shard whose failure class is retryable; rewrite it atomically."""
    uri = storage.join(config.out, shard.name)
    fs, path = storage.resolve(uri)
    table = pq.read_table(path, filesystem=fs)
    classes = table.column("status_class").to_pylist()
    todo = [i for i, c in enumerate(classes) if c in RETRYABLE]
    urls = table.column("url").to_pylist()
    tail, downloaded = ShardFetcher(config)([urls[i] for i in todo], attempts=max(1, config.retry_attempts))
    columns = {f.name: table.column(f.name).to_pylist() for f in TAIL_FIELDS}
    for j, i in enumerate(todo):
        for name in columns:
            columns[name][i] = tail[name][j]
    for f in TAIL_FIELDS:
        table = table.set_column(table.schema.get_field_index(f.name), f, pa.array(columns[f.name], f.type))
    return commit_shard(config.out, shard, table, fingerprint, {"input_rows": [shard.start, shard.stop]}, downloaded,
                        fetched_ok=sum(s == "success" for s in tail["status"]))


def import_tar(config: FetchConfig, shard: Shard, uri: str, fingerprint: str) -> dict[str, Any]:
    """Turn one tar of a WebDataset mirror into shard `shard` and commit it. Runs inside a Ray task."""
    from pipelines.sources import cc12m_wds

    check = ImageCheck(config, reencode=False)
    outcome = cc12m_wds.TarRead()
    rows = []
    for sample in cc12m_wds.read_tar(uri, outcome):
        meta = sample.meta or {}
        if sample.image is None:
            tail = failed_row("failed", "image_missing", sample.problem)
        else:
            tail = check(sample.image, f"image/{sample.image_member.rsplit('.', 1)[-1]}")
            if tail["status"] == "success":
                # The size img2dataset downloaded, from its metadata: what a URL fetch records.
                for name in ("original_width", "original_height"):
                    if isinstance(meta.get(name), int):
                        tail[name] = meta[name]
                tail["error"] = sample.problem or ""
        alt = sample.text if sample.text is not None else meta.get("caption")
        rows.append({"key": sample.key, "url": meta.get("url"), "alt_text": alt, **tail})
    if outcome.error:
        # A row for what was lost: the sample it broke inside (its row, if part of it was read),
        # else one keyed by the tar's name (not a tar at all, or broken between members).
        key = outcome.broken_key or posixpath.basename(uri)
        if not rows or rows[-1]["key"] != key:
            rows.append({"key": key, "url": None, "alt_text": None})
        rows[-1].update(failed_row("failed", "tar_error", outcome.error))
    schema = shard_schema([])
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    source = {"input": {"path": uri, "sha256": outcome.sha256, "bytes": outcome.bytes}, "tar_error": outcome.error}
    return commit_shard(config.out, shard, _table(schema, columns), fingerprint, source)


# ---------------------------------------------------------------------------------------------
# The job: plan, skip committed shards, run the rest as Ray tasks with our own retries, manifest last


def fingerprint_of(config: FetchConfig, input_sha256: str) -> str:
    from pipelines.config import to_dict

    settings = {k: v for k, v in to_dict(config).items() if k in _SHARD_FIELDS}
    blob = json.dumps({"input": input_sha256, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def aggregate(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """Dataset statistics from the shards' markers (deterministic: no time, no per-run numbers)."""
    status, classes = Counter(), Counter()
    rows = stored = 0
    for m in markers:
        rows += m["stats"]["rows"]
        stored += m["stats"]["bytes_stored"]
        status.update(m["stats"]["status"])
        classes.update(m["stats"]["status_class"])
    refused = {c: n for c, n in classes.items() if c in _REFUSAL_CLASSES}
    return {
        "rows": rows,
        "success": status.get("success", 0),
        "success_rate": round(status.get("success", 0) / rows, 6) if rows else 0.0,
        "status": dict(sorted(status.items())),
        "status_class": dict(sorted(classes.items())),
        "refusals": dict(sorted(refused.items())),
        "bytes_stored": stored,
    }


_REFUSAL_CLASSES = frozenset({"forbidden_scheme", "forbidden_address", "robots_optout", "too_large", "too_many_pixels"})


@dataclass
class FetchResult:
    stats: dict[str, Any]            # dataset statistics (as in the manifest)
    shards_run: int                  # shard tasks run by this invocation
    shards_skipped: int              # already committed
    images_this_run: int             # successful images fetched by this invocation
    bytes_downloaded: int            # response bytes read by this invocation
    seconds: float
    manifest_uri: str = ""


def run_shard_tasks(config: FetchConfig, jobs: list[tuple[Shard, tuple]], fn, progress) -> tuple[list[dict], list[str]]:
    """Run `fn(*args)` per shard as Ray tasks; resubmit failed ones up to max_shard_attempts, each
    after the retry policy's backoff. A shard that was built but not stored is resubmitted as an
    upload of its bytes. Tasks carry the driver's retry policy and stage name."""
    import ray

    def remote(f):
        return ray.remote(retry.carried(f)).options(num_cpus=config.num_cpus, max_retries=0)

    build, upload = remote(fn), remote(store_built)
    limit = config.max_in_flight or max(1, int(2 * ray.cluster_resources().get("CPU", 1) / max(config.num_cpus, 0.01)))
    pending = [(shard, build, args, 1, 0.0) for shard, args in jobs]   # (..., attempt, not before)
    running: dict[Any, tuple[Shard, Any, tuple, int]] = {}
    done, failed = [], []
    while pending or running:                     # bounded: each shard has at most max_shard_attempts
        now = time.monotonic()
        for item in [p for p in pending if p[4] <= now][:max(0, limit - len(running))]:
            pending.remove(item)
            shard, task, args, attempt, _ = item
            running[task.remote(*args)] = (shard, task, args, attempt)
        soonest = min((p[4] for p in pending), default=None)
        if not running:                           # every shard left is waiting out its backoff
            time.sleep(max(0.0, soonest - now))
            continue
        ready, _ = ray.wait(list(running), num_returns=1, timeout=None if soonest is None else max(0.05, soonest - now))
        for ref in ready:
            shard, task, args, attempt = running.pop(ref)
            try:
                marker = ray.get(ref)
            except (ray.exceptions.RayError, OSError) as err:
                cause = getattr(err, "cause", None)
                why = retry.describe(cause) if isinstance(cause, BaseException) else _last_line(err)
                if attempt < config.max_shard_attempts:
                    delay = retry.resubmit_delay(attempt)
                    if isinstance(cause, ShardNotStored):
                        task, args = upload, cause.built
                    print(f"{retry.stage_name()}: {shard.name} attempt {attempt} failed ({why}); "
                          f"{'uploading its built bytes' if task is upload else 'resubmitting'} in {delay:.1f}s",
                          file=sys.stderr, flush=True)
                    pending.append((shard, task, args, attempt + 1, time.monotonic() + delay))
                else:
                    failed.append(f"{shard.name}: {why}")
                continue
            done.append(marker)
            progress.update(1)
            progress.set_postfix(images=sum(m.get("fetched_ok", 0) for m in done), refresh=False)
    return done, failed


def _last_line(err: BaseException) -> str:
    """A Ray error without a Python cause (a worker that died): its type and its last line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1].strip()}" if lines else type(err).__name__


@dataclass
class _Plan:
    """What a run will make and from what: the shards, the task making one, and the manifest inputs."""

    shards: list[Shard]
    fingerprint: str
    made: str                        # how another build's shards were made, for the refusal message
    fn: Any                          # task: (*args[shard.name]) -> marker
    args: dict[str, tuple]
    inputs_of: Any                   # ordered markers -> manifest input entries
    extra_stats: dict[str, Any]
    check: Any = None                # committed markers -> None, or raises when they no longer fit


def _plan_urls(config: FetchConfig) -> _Plan:
    """A URL list: fixed-size input shards, fingerprinted by the list's sha256."""
    url_list = read_url_list(config.urls, config)
    entry = manifest_lib.input_entry(config.urls)
    fingerprint = fingerprint_of(config, entry.sha256)
    shards = plan_shards(url_list.table.num_rows, config.shard_size)
    roles = dataclasses.replace(url_list, table=url_list.table.schema.empty_table())  # tasks get their slice only
    # Slices are zero-copy; Ray's Arrow serializer ships only the sliced rows to each task.
    args = {s.name: (config, s, url_list.table.slice(s.start, s.stop - s.start), roles, fingerprint) for s in shards}
    extra = {"input_skipped": url_list.skipped} if url_list.skipped else {}
    made = "fetched from another URL list or with other settings"
    return _Plan(shards, fingerprint, made, fetch_shard, args, lambda ordered: [entry], extra)


def _plan_wds(config: FetchConfig) -> _Plan:
    """WebDataset tars: shard i is tar i. Fingerprinted by the tar names (a tar that changed after
    its shard was committed is refused by `check`); each marker records its tar's sha256."""
    from pipelines.sources import cc12m_wds

    tars = cc12m_wds.list_tars(config.wds)
    fingerprint = fingerprint_of(config, hashlib.sha256(json.dumps([t.name for t in tars]).encode()).hexdigest())
    shards = plan_shards(len(tars), 1)

    def check(markers: dict[str, dict[str, Any]]) -> None:
        for shard, tar in zip(shards, tars):
            done = markers.get(shard.name)
            if done is not None and done["input"]["bytes"] != tar.size:
                raise ValueError(f"{tar.uri} changed since {shard.name} was imported from it ({done['input']['bytes']} "
                                 f"bytes then, {tar.size} now); restore it, or delete {config.out} to import again")

    args = {s.name: (config, s, t.uri, fingerprint) for s, t in zip(shards, tars)}
    inputs = lambda ordered: [manifest_lib.FileEntry(**m["input"]) for m in ordered]  # noqa: E731
    return _Plan(shards, fingerprint, "imported from other tars or with other settings", import_tar, args, inputs, {}, check)


@retry.in_stage("fetch")
def run(config: FetchConfig, retry_failed: bool = False) -> FetchResult:
    """Fetch (or resume fetching) `config.urls`, or import `config.wds`, into `config.out`; with
    `retry_failed`, also re-fetch the retryable failures of committed shards. Writes the manifest
    last. Ray must be initialised."""
    from tqdm import tqdm

    if not config.out or bool(config.urls) == bool(config.wds):
        raise ValueError("fetch needs out (the dataset folder) and one of urls (a URL list) or wds (WebDataset tars)")
    if config.wds and retry_failed:
        raise ValueError("retry_failed: a WebDataset import downloads nothing, so it has nothing to retry")
    check_encoding(config)
    start_time = time.perf_counter()
    manifest_uri = storage.join(config.out, manifest_lib.MANIFEST_NAME)
    if storage.exists(manifest_uri):
        kind = manifest_lib.read(config.out).kind
        if kind != "fetch":
            raise ValueError(f"{config.out} holds a {kind!r} dataset, not a fetch; choose another output folder")
    plan = _plan_wds(config) if config.wds else _plan_urls(config)
    shards, fingerprint = plan.shards, plan.fingerprint
    markers = manifest_lib.committed_markers(config.out, fingerprint, plan.made)
    if plan.check is not None:
        plan.check(markers)
    todo = [s for s in shards if s.name not in markers]
    retry = [s for s in shards if retry_failed and s.name in markers
             and any(markers[s.name]["stats"]["status_class"].get(c) for c in RETRYABLE)]
    if todo or retry:
        # The folder is about to change: it must not look complete until the new manifest is written.
        storage.delete(manifest_uri)

    with tqdm(total=len(shards) + len(retry), initial=len(shards) - len(todo), desc="fetch", unit="shard",
              file=sys.stderr, dynamic_ncols=True, mininterval=0.5) as progress:
        new, failed = [], []
        for fn, jobs in ((plan.fn, [(s, plan.args[s.name]) for s in todo]),
                         (retry_shard, [(s, (config, s, fingerprint)) for s in retry])):
            if jobs:
                got, bad = run_shard_tasks(config, jobs, fn, progress)
                new += got
                failed += bad
    for marker in new:
        markers[marker["shard"]] = marker
    if failed:
        raise retry.Resumable(f"{len(failed)} shard(s) failed after {config.max_shard_attempts} attempts: {'; '.join(failed[:5])}")

    ordered = [markers[s.name] for s in shards]
    stats = {**aggregate(ordered), **plan.extra_stats}
    damaged = [m["tar_error"] for m in ordered if m.get("tar_error")]
    if config.wds:
        stats["damaged_tars"] = damaged
    manifest = manifest_lib.Manifest(
        kind="fetch", config=manifest_config(config), inputs=plan.inputs_of(ordered),
        shards=[manifest_lib.FileEntry(path=m["shard"], sha256=m["sha256"], bytes=m["bytes"], rows=m["rows"]) for m in ordered],
        stats={"fetch": stats},
    )
    uri = manifest_lib.write(config.out, manifest)
    return FetchResult(
        stats=stats, shards_run=len(new), shards_skipped=len(shards) - len(todo),
        images_this_run=sum(m.get("fetched_ok", 0) for m in new),
        bytes_downloaded=sum(m.get("downloaded", 0) for m in new), seconds=time.perf_counter() - start_time,
        manifest_uri=uri,
    )


def stats_table(result: FetchResult) -> str:
    """The end-of-run table: outcome by status class, bytes, and this run's speed."""
    from rich.console import Console
    from rich.table import Table

    stats = result.stats
    rows = stats["rows"] or 1
    table = Table(title=f"fetch: {stats['success']}/{stats['rows']} images ({100 * stats['success_rate']:.1f}%)")
    table.add_column("status class")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    table.add_column("retried by retry_failed=true")
    for cls, n in sorted(stats["status_class"].items(), key=lambda kv: -kv[1]):
        table.add_row(cls, str(n), f"{100 * n / rows:.1f}%", "yes" if cls in RETRYABLE else "")
    console = Console(file=io.StringIO(), width=100, force_terminal=False)
    console.print(table)
    speed = result.images_this_run / result.seconds if result.seconds > 0 else 0.0
    console.print(
        f"bytes stored {stats['bytes_stored']:,}  |  downloaded this run {result.bytes_downloaded:,}  |  "
        f"shards run {result.shards_run}, skipped (committed) {result.shards_skipped}  |  "
        f"{result.images_this_run} images in {result.seconds:.1f}s = {speed:.1f} images/s"
    )
    if stats["refusals"]:
        console.print("refused: " + ", ".join(f"{k} {v}" for k, v in stats["refusals"].items()))
    for reason, n in stats.get("input_skipped", {}).items():
        console.print(f"URL list rows left out: {n} ({reason})", soft_wrap=True)
    for error in stats.get("damaged_tars", []):
        console.print(f"damaged tar (rows before the damage kept): {error}", soft_wrap=True)
    return console.file.getvalue()
