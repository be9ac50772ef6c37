"""Join a published caption file onto dataset shards by url (or key), streaming the file.

The CaptionEmporium LLaVA-NeXT file is 3.58 GB of gzip (about 11 GB of JSON) for 11M rows: it is
never held whole. A *pass* takes a group of shards (about `rows_per_pass` rows), reads their join
column, streams the whole caption file once (`pipelines/sources/captions.py`, a block at a time)
and keeps only the lines whose join value is in the group, so memory follows the group's size
(~1.5 KB a row with LLaVA captions: BENCHMARKS.md), not the file's. More passes trade time for memory.

Policy, the same in every pass:
- lines whose `status` is not `keep_status` are skipped, counted (the reference keeps "success");
- a line without the join field, or with an empty caption, is skipped, counted, lines named;
- a join value on several lines: the first line wins and the repeats are counted, or with
  `duplicates="error"` the join stops, naming both lines;
- joining by key (`on="key"`), a matched line whose url differs from the row's url is a wrong
  match (the keys are not one namespace): no caption, counted as a url conflict.

Hand-written rather than a Ray Data join: Ray's hash join needs both sides in the object store
and returns rows in no order, while the output must mirror each input shard row for row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.sources import captions as caption_files

LINES_NAMED = 5  # skipped lines named in the statistics, the first ones in file order


@dataclass
class JoinSpec:
    uri: str                 # the caption file
    on: str                  # "url" or "key": the column the file shares with the shards
    caption: str             # the file's column that becomes `caption`
    keep_status: str         # "" = every line
    duplicates: str          # "first" or "error"
    has_url: bool            # the file has a url column (checked against the rows' when on="key")
    has_status: bool


@dataclass
class JoinedShard:
    """One shard's captions (aligned with its rows, null where none) and what happened to them."""

    captions: pa.Array
    stats: dict[str, int]
    file: dict = field(default_factory=dict)   # the pass's FileCounts (the same for every shard)


@dataclass
class FileCounts:
    """What the caption file held, counted in one full pass (the same in every pass)."""

    lines: int = 0
    status_skipped: int = 0
    no_key: int = 0
    no_caption: int = 0
    no_key_lines: list[int] = field(default_factory=list)
    no_caption_lines: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"lines": self.lines, "status_skipped": self.status_skipped, "no_key": self.no_key,
                "no_key_lines": self.no_key_lines, "no_caption": self.no_caption, "no_caption_lines": self.no_caption_lines}


def resolve(uri: str, on: str, caption: str, keep_status: str, duplicates: str) -> JoinSpec:
    """Check the file's columns and settle `caption="auto"`; errors name the file and its fields."""
    if on not in ("url", "key"):
        raise ValueError(f"join_on must be url or key, got {on!r}")
    if duplicates not in ("first", "error"):
        raise ValueError(f"duplicates must be first or error, got {duplicates!r}")
    names = caption_files.fields(uri)
    col = caption_files.training_caption_column(names, for_url_list=False) if caption == "auto" else caption
    for role, name in (("join", on), ("caption", col)):
        if not name or name not in names:
            looked = name or f"{caption_files.LLAVA_COLUMN} or caption"
            raise ValueError(f"{uri} has no {role} column {looked!r} (fields: {', '.join(names)})")
    return JoinSpec(uri, on, col, keep_status, duplicates, "url" in names,
                    caption_files.STATUS_COLUMN in names and bool(keep_status))


def _lookup(keys: list[pa.ChunkedArray]):
    """One hash table over the pass's distinct join values (pandas' Index, built once; pyarrow's
    `index_in` would rebuild its table on every call): `.get_indexer(values)` -> slot or -1."""
    import pandas as pd  # a Ray Data dependency

    values = pc.unique(pa.chunked_array(keys, type=pa.string())).drop_null()
    return pd.Index(values.to_numpy(zero_copy_only=False), dtype=object)


def _chunks(arrays: list) -> pa.Array:
    return pa.concat_arrays([c for a in arrays for c in getattr(a, "chunks", [a])]) if arrays else pa.array([], pa.string())


def join_pass(spec: JoinSpec, shards: dict[str, pa.Table]) -> tuple[dict[str, JoinedShard], FileCounts]:
    """Captions for every row of `shards` (name -> table with the join column, and `url` when
    joining by key) from one streaming pass over the caption file.

    Memory: the lookup over the pass's join values and the first matching line's caption per value.
    """
    keys = {name: t.column(spec.on).cast(pa.string()) for name, t in shards.items()}
    lookup = _lookup(list(keys.values()))
    first_line = np.zeros(len(lookup), dtype=np.int64)   # [U] line of the caption kept for each value; 0 = none yet
    repeats = np.zeros(len(lookup), dtype=np.int32)      # [U] kept lines naming each value
    wanted = [spec.on, spec.caption]
    if spec.on == "key" and spec.has_url:
        wanted.append("url")
    if spec.has_status:
        wanted.append(caption_files.STATUS_COLUMN)
    counts = FileCounts()
    kept_slots, texts, urls = [], [], []
    for block in caption_files.iter_blocks(spec.uri, list(dict.fromkeys(wanted))):
        t = block.table
        n = t.num_rows
        counts.lines += n
        keep = np.ones(n, dtype=bool)
        if spec.has_status:
            ok = pc.fill_null(pc.equal(t.column(caption_files.STATUS_COLUMN), spec.keep_status), False).to_numpy(zero_copy_only=False)
            counts.status_skipped += int((~ok).sum())
            keep &= ok
        no_key = keep & pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(t.column(spec.on))), 0), True).to_numpy(zero_copy_only=False)
        no_caption = keep & ~no_key & pc.fill_null(
            pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(t.column(spec.caption))), 0), True).to_numpy(zero_copy_only=False)
        for mask, total, named in ((no_key, "no_key", counts.no_key_lines), (no_caption, "no_caption", counts.no_caption_lines)):
            if mask.any():
                setattr(counts, total, getattr(counts, total) + int(mask.sum()))
                if len(named) < LINES_NAMED:
                    named += block.lines(np.flatnonzero(mask)[:LINES_NAMED - len(named)]).tolist()
        keep &= ~no_key & ~no_caption
        slot = lookup.get_indexer(t.column(spec.on).to_numpy(zero_copy_only=False))
        idx = np.flatnonzero(keep & (slot >= 0))
        if not len(idx):
            continue
        s, line = slot[idx], block.lines(idx)
        np.add.at(repeats, s, 1)
        new = np.zeros(len(idx), dtype=bool)
        new[np.unique(s, return_index=True)[1]] = True   # first in this block ...
        new &= first_line[s] == 0                         # ... and in the file: the first line wins
        if spec.duplicates == "error" and not new.all():
            d = int(np.flatnonzero(~new)[0])
            earlier = first_line[s[d]] or line[np.flatnonzero(s == s[d])[0]]
            raise ValueError(f"{spec.uri}:{line[d]}: {spec.on} {lookup[s[d]]!r} repeats line {earlier} "
                             f"(duplicates=first keeps the first line and counts the repeats)")
        first_line[s[new]] = line[new]
        take = pa.array(idx[new])
        kept_slots.append(s[new])
        texts.append(t.column(spec.caption).take(take))
        if "url" in wanted:
            urls.append(t.column("url").take(take))
    text, file_url = _chunks(texts), (_chunks(urls) if "url" in wanted else None)
    del texts, urls  # one copy of the captions from here on
    row_of_slot = np.full(len(lookup), -1, dtype=np.int64)
    if kept_slots:
        slots = np.concatenate(kept_slots)
        row_of_slot[slots] = np.arange(len(slots))

    out = {}
    for name, table in shards.items():
        s = lookup.get_indexer(keys[name].to_numpy(zero_copy_only=False))
        r = np.where(s >= 0, row_of_slot[np.maximum(s, 0)], -1)
        take = pa.array(np.maximum(r, 0), mask=r < 0)
        captions = text.take(take) if len(text) else pa.nulls(len(r), pa.string())
        conflicts = 0
        if file_url is not None and "url" in table.column_names:
            theirs = file_url.take(take)
            differ = pc.fill_null(pc.not_equal(theirs, table.column("url").cast(pa.string()).combine_chunks()), False)
            conflicts = int(pc.sum(differ).as_py() or 0)
            captions = pc.if_else(differ, pa.scalar(None, pa.string()), captions)
        joined = int(len(captions) - captions.null_count)
        dup_rows = int(((s >= 0) & (repeats[np.maximum(s, 0)] > 1)).sum())
        out[name] = JoinedShard(captions, {"rows": table.num_rows, "joined": joined, "url_conflicts": conflicts,
                                           "duplicate_keys": dup_rows})
    return out, counts


def passes(names: list[str], rows: dict[str, int], rows_per_pass: int) -> list[list[str]]:
    """Consecutive groups of shards of about `rows_per_pass` rows (at least one shard each)."""
    groups, group, n = [], [], 0
    for name in names:
        if group and n + rows[name] > rows_per_pass:
            groups.append(group)
            group, n = [], 0
        group.append(name)
        n += rows[name]
    return groups + ([group] if group else [])
