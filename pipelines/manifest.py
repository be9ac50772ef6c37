"""The dataset manifest: what a dataset folder holds and how it was made, written last.

A folder (local or s3://) is a dataset only once `manifest.json` exists in it. The manifest lists
the inputs with their hashes, the config, the code version, every shard with its row count and
sha256, and per-stage statistics. It carries no timestamps or credentials, so two builds from the
same inputs, config and code give byte-identical manifests, and `diff` says what changed.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines import storage

MANIFEST_NAME = "manifest.json"
COMMIT_DIR = "_commits"          # per-shard commit markers of resumable stages (fetch, recaption)
# Optional beside the shards: one row per input row a stage dropped (key columns, reason,
# duplicate_of), so `diff_rows` can say why a row is in one build and not the other.
DROPPED_NAME = "dropped.parquet"
# Columns that identify a row across builds, where a dataset has them (fetch shards: key only).
ROW_ID_COLUMNS = ("source", "origin", "key")
FORMAT_VERSION = 1


@dataclass
class FileEntry:
    path: str                    # relative to the dataset folder for shards; a URI for inputs
    sha256: str                  # hex digest of the bytes
    bytes: int                   # size
    rows: int | None = None      # row count for Parquet shards


@dataclass
class Manifest:
    kind: str                                              # "fetch", "recaption", "curate", ...
    config: dict[str, Any]                                 # the stage config, credentials excluded
    inputs: list[FileEntry] = field(default_factory=list)  # what was read, with hashes
    shards: list[FileEntry] = field(default_factory=list)  # what was written, sorted by path
    stats: dict[str, Any] = field(default_factory=dict)    # per-stage statistics
    code_version: str = ""                                 # package version + git commit
    format_version: int = FORMAT_VERSION

    @property
    def rows(self) -> int:
        return sum(s.rows or 0 for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
            raw["inputs"] = [FileEntry(**e) for e in raw.get("inputs", [])]
            raw["shards"] = [FileEntry(**e) for e in raw.get("shards", [])]
            return cls(**raw)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{where} is not a valid dataset manifest: {err}") from err


def code_version() -> str:
    try:
        version = metadata.version("minit2i-platform")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{version}+g{commit}"
    except (OSError, subprocess.SubprocessError):
        return version


def shard_entry(root: str, uri: str, rows: int | None) -> FileEntry:
    digest, size = storage.file_digest(uri)
    return FileEntry(path=storage.relpath(uri, root), sha256=digest, bytes=size, rows=rows)


def input_entry(uri: str) -> FileEntry:
    digest, size = storage.file_digest(uri)
    return FileEntry(path=str(uri), sha256=digest, bytes=size)


def read_markers(root: str) -> dict[str, dict[str, Any]]:
    """Committed shards of a dataset folder being built: shard name -> its commit marker."""
    markers = {}
    for uri in storage.list_files(storage.join(root, COMMIT_DIR), suffix=".json"):
        marker = json.loads(storage.read_bytes(uri))
        markers[marker["shard"]] = marker
    return markers


@dataclass
class StageResult:
    """What a resumable dataset -> dataset stage (recaption, encode-text) did in one invocation."""
    stats: dict[str, Any]
    shards_run: int
    shards_skipped: int              # committed by an earlier invocation
    rows_this_run: int
    seconds: float
    manifest_uri: str = ""


def committed_markers(root: str, fingerprint: str, made: str) -> dict[str, dict[str, Any]]:
    """The commit markers of a resumable stage's output folder, refusing shards another build made
    (`made` says how: "fetched from another URL list or with other settings", ...)."""
    markers = read_markers(root)
    foreign = sorted(name for name, m in markers.items() if m.get("fingerprint") != fingerprint)
    if foreign:
        raise ValueError(f"{root} already holds shards ({foreign[0]}, ...) {made}; delete the folder or choose another out")
    return markers


def write(root: str, manifest: Manifest) -> str:
    """Write the manifest atomically into dataset folder `root`; call only after every shard exists."""
    manifest.shards = sorted(manifest.shards, key=lambda s: s.path)
    if not manifest.code_version:
        manifest.code_version = code_version()
    uri = storage.join(root, MANIFEST_NAME)
    storage.write_bytes(uri, manifest.to_json().encode())
    # Every write of the build is done: a multipart upload still open under the folder is debris
    # (one another writer's dropped connection left) that S3 bills until a lifecycle rule removes it.
    storage.abort_uploads(root)
    return uri


def read(root: str) -> Manifest:
    uri = storage.join(root, MANIFEST_NAME)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {root}: the dataset is incomplete (a build still running or one "
            f"that stopped early) or the path is not a dataset folder"
        )
    return Manifest.from_json(storage.read_bytes(uri).decode(), where=uri)


def verify(root: str) -> list[str]:
    """Re-hash every shard against the manifest; returns the problems found (empty when intact)."""
    manifest = read(root)
    problems = []
    for shard in manifest.shards:
        uri = storage.join(root, shard.path)
        if not storage.exists(uri):
            problems.append(f"{shard.path}: missing")
            continue
        digest, size = storage.file_digest(uri)
        if size != shard.bytes:
            problems.append(f"{shard.path}: {size} bytes, manifest says {shard.bytes}")
        elif digest != shard.sha256:
            problems.append(f"{shard.path}: sha256 {digest[:12]}…, manifest says {shard.sha256[:12]}…")
    return problems


def strays(root: str) -> list[str]:
    """Debris in a dataset folder: temp files of interrupted local writes, multipart uploads never
    completed, and Parquet files the manifest does not list (shards of another build)."""
    manifest = read(root)
    listed = {s.path for s in manifest.shards}
    out = [f"{storage.relpath(u, root)}: temporary file of an interrupted write" for u in storage.temp_files(root)]
    out += [f"{storage.relpath(u, root)}: unfinished multipart upload {upload[:16]}…" for u, upload in storage.open_uploads(root)]
    for uri in storage.list_files(root, suffix=".parquet", recursive=True):
        rel = storage.relpath(uri, root)
        if rel not in listed and rel != DROPPED_NAME:
            out.append(f"{rel}: not in the manifest")
    return out


def diff(a: Manifest, b: Manifest) -> dict[str, Any]:
    """What differs between two builds: config keys, inputs, shards and statistics."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix.rstrip("."): d}

    def changed(x: dict, y: dict) -> dict[str, tuple[Any, Any]]:
        return {k: (x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}

    shards_a = {s.path: s for s in a.shards}
    shards_b = {s.path: s for s in b.shards}
    return {
        "kind": (a.kind, b.kind) if a.kind != b.kind else None,
        "config": changed(flat(a.config), flat(b.config)),
        "inputs": changed({i.path: i.sha256 for i in a.inputs}, {i.path: i.sha256 for i in b.inputs}),
        "shards_added": sorted(set(shards_b) - set(shards_a)),
        "shards_removed": sorted(set(shards_a) - set(shards_b)),
        "shards_changed": sorted(p for p in set(shards_a) & set(shards_b) if shards_a[p].sha256 != shards_b[p].sha256),
        "rows": (a.rows, b.rows),
        "stats": changed(flat(a.stats), flat(b.stats)),
        "code_version": (a.code_version, b.code_version) if a.code_version != b.code_version else None,
    }


def _read_columns(uri: str, wanted: tuple[str, ...]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    names = pq.read_schema(path, filesystem=fs).names
    return pq.read_table(path, columns=[c for c in wanted if c in names], filesystem=fs).to_pylist()


def _row_id(row: dict[str, Any]) -> str:
    return "/".join(str(row[c]) for c in ROW_ID_COLUMNS if c in row)


def diff_rows(root_a: str, root_b: str) -> dict[str, Any]:
    """Which rows build B added and removed relative to build A, with the reason each side gives.

    Rows are identified by ROW_ID_COLUMNS. A removed row's reason comes from B's dropped.parquet,
    an added row's from A's (why A had dropped it); "not read" means the other build never saw it
    (different inputs).
    """
    a, b = read(root_a), read(root_b)

    def rows(root: str, m: Manifest) -> set[str]:
        return {_row_id(r) for s in m.shards for r in _read_columns(storage.join(root, s.path), ROW_ID_COLUMNS)}

    def dropped(root: str) -> dict[str, dict[str, Any]]:
        uri = storage.join(root, DROPPED_NAME)
        if not storage.exists(uri):
            return {}
        return {_row_id(r): r for r in _read_columns(uri, (*ROW_ID_COLUMNS, "reason", "duplicate_of"))}

    rows_a, rows_b = rows(root_a, a), rows(root_b, b)
    dropped_a, dropped_b = dropped(root_a), dropped(root_b)

    def entry(rid: str, why: dict[str, Any] | None) -> dict[str, Any]:
        return {"row": rid, "reason": why["reason"] if why else "not read",
                "duplicate_of": why.get("duplicate_of") if why else None}

    return {
        "added": [entry(r, dropped_a.get(r)) for r in sorted(rows_b - rows_a)],
        "removed": [entry(r, dropped_b.get(r)) for r in sorted(rows_a - rows_b)],
        "unchanged": len(rows_a & rows_b),
        "rows": (len(rows_a), len(rows_b)),
        "config": diff(a, b)["config"],
    }
