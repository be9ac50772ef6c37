"""`minit2i curate-diff A B [limit=50 json=true]`: the rows rebuild B added and removed relative to
A, with reasons. A thin printer over `pipelines.manifest.diff_rows`, which any dataset CLI can call.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from pipelines import manifest


@dataclass
class CurateDiffConfig:
    a: str = ""                          # dataset folder of the first build (local or s3://)
    b: str = ""                          # dataset folder of the second build
    limit: int = 50                      # rows listed per direction
    json: bool = False                   # print the whole diff as JSON


def run(args: CurateDiffConfig) -> int:
    d = manifest.diff_rows(args.a, args.b)
    if args.json:
        print(json.dumps(d, indent=2, sort_keys=True))
        return 0
    for key, (old, new) in d["config"].items():
        print(f"config {key}: {old!r} -> {new!r}")
    (n_a, n_b), added, removed = d["rows"], d["added"], d["removed"]
    print(f"rows: {n_a} -> {n_b}: +{len(added)} -{len(removed)} ({d['unchanged']} unchanged)")
    for title, rows, why in (("added", added, "was dropped in A as"), ("removed", removed, "dropped in B as")):
        if not rows:
            continue
        tally = ", ".join(f"{r} {n}" for r, n in sorted(Counter(x["reason"] for x in rows).items()))
        print(f"{title} ({why}): {tally}")
        for x in rows[:args.limit]:
            dup = f" (duplicate of {x['duplicate_of']})" if x["duplicate_of"] else ""
            print(f"  {'+' if title == 'added' else '-'} {x['row']}  {x['reason']}{dup}")
        if len(rows) > args.limit:
            print(f"  ... {len(rows) - args.limit} more (limit=N)")
    return 0
