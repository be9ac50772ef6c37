"""The LAION DALL-E 3 set: Parquet files of images (or their URLs) with the prompts that made them.

Layout (huggingface.co/datasets/OpenDatasets/dalle-3-dataset and mirrors): `*.parquet` files
(`data/train-000NN-of-00063-<hash>.parquet`) whose image column is either a struct `{bytes, path}`
(as Hugging Face `datasets` writes an Image feature) or plain binary, and whose prompt column is
named differently across releases (`caption`, `prompt`, `text`, ...; see ALIASES). The
OpenDatasets release has `caption`, `synthetic_caption` and `image_hash`; where a row's `caption`
is empty its `synthetic_caption` is used, as the reference does, and the row says so
(`caption_from`, counted in the curate report). Releases that ship only URLs give rows without
image bytes; curate counts them as `image_not_fetched` - fetch them first (`minit2i fetch`) and
point this source at the fetched shards, which this reader also understands (`image` +
`alt_text`/`caption`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.sources import ReadUnit, expand, pick, row

SOURCE = "dalle3"
BATCH_ROWS = 256  # rows decoded from Parquet at a time: bounds a reader's memory to ~BATCH_ROWS images


@dataclass
class Dalle3Config:
    paths: list[str] = field(default_factory=list)  # .parquet files or folders holding them; [] = not used
    weight: float = 0.016                           # mix weight (MiniT2I finetune recipe)


def units(cfg: Dalle3Config) -> list[ReadUnit]:
    pairs = expand(list(cfg.paths), (".parquet",), f"sources.{SOURCE}.paths")
    return [ReadUnit(SOURCE, origin, [uri]) for uri, origin in pairs]


def _open(uri: str) -> pq.ParquetFile:
    fs, path = storage.resolve(uri)
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except pa.ArrowInvalid as err:
        raise ValueError(f"{uri}: not a readable Parquet file: {err}") from err


def columns(schema: pa.Schema, where: str) -> tuple[str | None, str, str | None, str | None]:
    """(image column or None, caption column, url column or None, fallback caption column or None);
    an unknown layout is an error."""
    names = schema.names
    image = pick(names, SOURCE, "image", where, required=False)
    caption = pick(names, SOURCE, "caption", where)
    url = pick(names, SOURCE, "url", where, required=False)
    fallback = pick(names, SOURCE, "fallback_caption", where, required=False)
    if image is None and url is None:
        pick(names, SOURCE, "image", where)  # raises, naming the image column names looked for
    if image is not None:
        t = schema.field(image).type
        ok = pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
        if not ok:
            raise ValueError(f"{where}: image column {image!r} has type {t}; expected binary or struct<bytes, path>")
    return image, caption, url, fallback


def probe(unit: ReadUnit) -> None:
    columns(_open(unit.uris[0]).schema_arrow, unit.uris[0])


def _image_bytes(col: pa.ChunkedArray | pa.Array) -> list[bytes | None]:
    if pa.types.is_struct(col.type):
        col = pa.chunked_array([c.field("bytes") for c in getattr(col, "chunks", [col])])
    return col.to_pylist()


def read(unit: ReadUnit) -> Iterator[dict[str, Any]]:
    uri = unit.uris[0]
    f = _open(uri)
    image, caption, url, fallback = columns(f.schema_arrow, uri)
    wanted = [c for c in (image, caption, url, fallback) if c is not None]
    pos = 0
    for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
        n = batch.num_rows
        images = _image_bytes(batch.column(image)) if image else [None] * n
        captions = batch.column(caption).to_pylist()
        urls = batch.column(url).to_pylist() if url else [None] * n
        fallbacks = batch.column(fallback).to_pylist() if fallback else [None] * n
        for i in range(n):
            text, source = captions[i], None
            if not (text or "").strip() and (fallbacks[i] or "").strip():
                text, source = fallbacks[i], fallback
            # The row index is the key: releases' id columns are not guaranteed unique, the index is.
            yield row(unit, f"{pos:09d}", pos, images[i], text, urls[i], caption_from=source)
            pos += 1
