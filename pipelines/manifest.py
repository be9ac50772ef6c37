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


def write(root: str, manifest: Manifest) -> str:
    """Write the manifest atomically into dataset folder `root`; call only after every shard exists."""
    manifest.shards = sorted(manifest.shards, key=lambda s: s.path)
    if not manifest.code_version:
        manifest.code_version = code_version()
    uri = storage.join(root, MANIFEST_NAME)
    storage.write_bytes(uri, manifest.to_json().encode())
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
        "config": changed(flat(a.config), flat(b.config)),
        "inputs": changed({i.path: i.sha256 for i in a.inputs}, {i.path: i.sha256 for i in b.inputs}),
        "shards_added": sorted(set(shards_b) - set(shards_a)),
        "shards_removed": sorted(set(shards_a) - set(shards_b)),
        "shards_changed": sorted(p for p in set(shards_a) & set(shards_b) if shards_a[p].sha256 != shards_b[p].sha256),
        "rows": (a.rows, b.rows),
        "stats": changed(flat(a.stats), flat(b.stats)),
        "code_version": (a.code_version, b.code_version) if a.code_version != b.code_version else None,
    }
