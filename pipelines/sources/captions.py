"""Published caption files for CC12M, streamed: the CaptionEmporium LLaVA-NeXT JSONL and the
reference's metadata parquet.

- `CaptionEmporium/conceptual-captions-cc12m-llavanext`: one `train.jsonl.gz` (3.58 GB gzip,
  10,965,172 lines), an object per line with `caption_llava` (llama3-llava-next-8b),
  `caption_llava_short`, the alt text `caption`, `url`, `key` and `status` (the card). Its captions
  were made from the pixparse/cc12m-wds mirror, so `key` is that mirror's `__key__`.
- The reference's `scripts/datasets/prepare_cc12m_metadata.py` (PeppaKing8/minit2i-jax) keeps the
  rows whose status is "success" and writes a parquet `url, caption, caption_llava_short, key` with
  `caption_llava` renamed to `caption`: there `caption` is the LLaVA caption, not the alt text.

Files are read in blocks, never whole: a gzip (or plain) JSONL is decompressed as a stream, cut at
line ends into blocks of `block_bytes`, and each block parsed by pyarrow's JSON reader with the
wanted columns typed as strings (other fields ignored); a Parquet file is read a batch at a time.
Every row keeps its line number (JSONL) or row number (Parquet), so problems can name it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipelines import storage

LLAVA_COLUMN = "caption_llava"          # CaptionEmporium's long LLaVA-NeXT caption
LLAVA_SHORT_COLUMN = "caption_llava_short"
STATUS_COLUMN = "status"                # CaptionEmporium's; the reference keeps "success" rows
BLOCK_BYTES = 16 << 20                  # decompressed JSONL bytes parsed at a time


def training_caption_column(columns: list[str], for_url_list: bool) -> str | None:
    """The column that is the training caption in a published file with these columns.

    `caption_llava` wherever it is present. Otherwise a caption file's `caption` (the reference's
    parquet, or any file of captions to join); in a URL list `caption` is the alt text (the CC12M
    TSV) unless `caption_llava_short` beside it marks the reference's parquet.
    """
    have = set(columns)
    if LLAVA_COLUMN in have:
        return LLAVA_COLUMN
    if "caption" in have and (not for_url_list or LLAVA_SHORT_COLUMN in have):
        return "caption"
    return None


def is_parquet(uri: str) -> bool:
    return str(uri).lower().endswith(".parquet")


def _open(uri: str):
    fs, path = storage.resolve(uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} does not exist")
    return fs.open_input_stream(path, compression="detect")


def fields(uri: str) -> list[str]:
    """Column names of a Parquet file, or the fields of a JSONL file's first record."""
    if is_parquet(uri):
        import pyarrow.parquet as pq

        fs, path = storage.resolve(uri)
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri} does not exist")
        return pq.read_schema(path, filesystem=fs).names
    with _open(uri) as f:
        buf, line_no = b"", 1
        while True:
            chunk = f.read(1 << 16)
            buf += chunk
            while b"\n" in buf or (not chunk and buf):
                line, _, buf = buf.partition(b"\n")
                if line.strip():
                    return list(_record(uri, line, line_no))
                line_no += 1
            if not chunk:
                raise ValueError(f"{uri} is empty")


@dataclass
class Block:
    """Rows of a caption file: `table` (the wanted columns, strings) and where they came from."""

    table: pa.Table
    first_line: int              # line (JSONL) or row (Parquet) number of the block's first line, 1-based
    raw: bytes | None = None     # the JSONL text, kept to map rows to lines when it has blank lines
    dense: bool = True           # every line of the block is a row (no blank lines)

    def lines(self, rows: np.ndarray) -> np.ndarray:
        """Line numbers of the given row indices of `table`."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.dense:
            return self.first_line + rows
        starts = [i for i, line in enumerate(self.raw.split(b"\n")) if line.strip()]
        return self.first_line + np.asarray(starts, dtype=np.int64)[rows]


def iter_blocks(uri: str, columns: list[str], block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """The file in blocks of rows with `columns` (as strings; null where a row lacks one)."""
    if is_parquet(uri):
        yield from _parquet_blocks(uri, columns)
        return
    import pyarrow.json as pajson

    schema = pa.schema([(c, pa.string()) for c in columns])
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    line_no = 1
    with _open(uri) as f:
        pending = b""
        while True:
            chunk = f.read(block_bytes)
            data = pending + chunk
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            block, pending = data[:cut], data[cut:]
            if block.strip():
                n_lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
                try:
                    table = pajson.read_json(pa.BufferReader(block), parse_options=options)
                except pa.ArrowInvalid:  # a value of another type (a numeric key): the slow path
                    table = _python_block(uri, block, line_no, columns)
                yield Block(table, line_no, block, dense=table.num_rows == n_lines)
                line_no += n_lines
            elif block:
                line_no += block.count(b"\n")
            if not chunk:
                return


def _python_block(uri: str, block: bytes, first_line: int, columns: list[str]) -> pa.Table:
    """Parse a block line by line: values of other types become strings (JSON text for lists and
    objects); a line that is not a JSON object is an error naming it."""
    rows = []
    for i, line in enumerate(block.split(b"\n")):
        if line.strip():
            record = _record(uri, line, first_line + i)
            rows.append([_as_text(record.get(c)) for c in columns])
    return pa.table({c: pa.array([r[j] for r in rows], pa.string()) for j, c in enumerate(columns)})


def _record(uri: str, line: bytes, line_no: int) -> dict:
    try:
        record = json.loads(line)
    except ValueError as err:
        raise ValueError(f"{uri}:{line_no}: not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{uri}:{line_no}: a JSON {type(record).__name__}, not an object")
    return record


def _as_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _parquet_blocks(uri: str, columns: list[str]) -> Iterator[Block]:
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    pf = pq.ParquetFile(fs.open_input_file(path))
    present = [c for c in columns if c in pf.schema_arrow.names]
    row = 1
    for batch in pf.iter_batches(batch_size=65536, columns=present):
        n = batch.num_rows
        arrays = [batch.column(c).cast(pa.string()) if c in present else pa.nulls(n, pa.string()) for c in columns]
        yield Block(pa.Table.from_arrays(arrays, names=list(columns)), row)
        row += n
