"""`minit2i manifest show|verify|diff`: read a dataset folder's manifest (local or s3://).

    minit2i manifest show DATASET [json=true]  what the folder holds and how it was made
    minit2i manifest verify DATASET            re-hash every shard against the manifest (exit 1 on a mismatch)
    minit2i manifest diff DATASET_A DATASET_B  what differs between two builds (exit 1 when they differ)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipelines import config as config_lib
from pipelines import manifest as manifest_lib


@dataclass
class DatasetConfig:
    dataset: str = ""                    # dataset folder (local or s3://) holding manifest.json


@dataclass
class ShowConfig(DatasetConfig):
    json: bool = False                   # print the raw manifest.json


@dataclass
class DiffConfig:
    a: str = ""                          # the first build's folder
    b: str = ""                          # the second build's folder


def format_show(m: manifest_lib.Manifest, where: str) -> str:
    size = sum(s.bytes for s in m.shards)
    lines = [
        f"dataset   {where}",
        f"kind      {m.kind}   (manifest format {m.format_version}, code {m.code_version})",
        f"shards    {len(m.shards)}   rows {m.rows:,}   bytes {size:,}",
        "inputs",
        *[f"  {i.path}  sha256 {i.sha256[:16]}  {i.bytes:,} bytes" for i in m.inputs],
        "config",
        *[f"  {k} = {json.dumps(v)}" for k, v in config_lib.flatten(m.config)],
        "stats",
        *[f"  {k} = {json.dumps(v)}" for k, v in config_lib.flatten(m.stats)],
        "shards",
        *[f"  {s.path}  rows {s.rows}  {s.bytes:,} bytes  sha256 {s.sha256[:16]}" for s in m.shards[:20]],
    ]
    if len(m.shards) > 20:
        lines.append(f"  ... {len(m.shards) - 20} more (json=true for all)")
    return "\n".join(lines)


def format_diff(d: dict[str, Any], a: str, b: str) -> str:
    """One line per difference, `a -> b`; empty sections are left out."""
    lines = [f"--- {a}", f"+++ {b}"]
    if d.get("kind"):
        lines.append(f"kind: {d['kind'][0]} -> {d['kind'][1]}")
    if d["code_version"]:
        lines.append(f"code_version: {d['code_version'][0]} -> {d['code_version'][1]}")
    for section in ("config", "inputs", "stats"):
        for key, (x, y) in d[section].items():
            lines.append(f"{section}.{key}: {json.dumps(x)} -> {json.dumps(y)}")
    if d["rows"][0] != d["rows"][1]:
        lines.append(f"rows: {d['rows'][0]} -> {d['rows'][1]}")
    for label, key in (("added", "shards_added"), ("removed", "shards_removed"), ("changed", "shards_changed")):
        if d[key]:
            lines.append(f"shards {label} ({len(d[key])}): {', '.join(d[key][:10])}{' ...' if len(d[key]) > 10 else ''}")
    if len(lines) == 2:
        lines.append("identical: same inputs, config, code version and shard hashes")
    return "\n".join(lines)


def differs(d: dict[str, Any]) -> bool:
    return bool(d.get("kind") or d["code_version"] or d["config"] or d["inputs"] or d["stats"] or d["rows"][0] != d["rows"][1]
                or d["shards_added"] or d["shards_removed"] or d["shards_changed"])


def show(args: ShowConfig) -> int:
    m = manifest_lib.read(args.dataset)
    print(m.to_json() if args.json else format_show(m, args.dataset), end="\n" if not args.json else "")
    return 0


def verify(args: DatasetConfig) -> int:
    m = manifest_lib.read(args.dataset)
    problems = manifest_lib.verify(args.dataset)
    stray = manifest_lib.strays(args.dataset)
    for p in problems:
        print(f"MISMATCH {p}")
    for p in stray:
        print(f"STRAY {p}")
    print(f"{args.dataset}: {len(m.shards)} shards, {len(problems)} problem(s)" + ("" if problems else ": OK")
          + (f"; {len(stray)} stray object(s) (debris to delete; the shards are not affected)" if stray else ""))
    return 1 if problems else 0


def diff(args: DiffConfig) -> int:
    d = manifest_lib.diff(manifest_lib.read(args.a), manifest_lib.read(args.b))
    print(format_diff(d, args.a, args.b))
    return 1 if differs(d) else 0
