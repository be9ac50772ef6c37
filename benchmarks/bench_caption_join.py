"""`minit2i bench join`: memory and speed of the streamed caption join at CaptionEmporium's scale.

Writes a CaptionEmporium-layout `train.jsonl.gz` of `--lines` lines (url, key, status, a ~600
character caption_llava, a ~150 character caption_llava_short and the alt text, as the published
file has per line), then joins `--rows` dataset rows (every k-th url of the file, in shards of
5000) in one pass (pipelines/caption_join.py) inside a fresh process per file size, and prints
each run's peak resident memory next to the file's size. The join holds one block of the file
and the pass's rows: its memory follows `--rows` (recaption's `join_rows_per_pass`), not the file.

    minit2i bench join [--lines 1000000 4000000] [--rows 200000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

WORDS = ("a photo of the red blue green small large wooden old modern dog cat person street building sky tree "
         "table window light shadow standing sitting next to behind in front of with and on under near bright "
         "dark white black background foreground detailed texture surface sign text reading").split()


def write_file(path: str, lines: int) -> None:
    import random

    rng = random.Random(0)
    long = [" ".join(rng.choices(WORDS, k=100))[:600] for _ in range(997)]
    short = [" ".join(rng.choices(WORDS, k=25))[:150] for _ in range(991)]
    with gzip.open(path, "wt", compresslevel=1) as f:
        for i in range(lines):
            f.write(json.dumps({"caption_llava": long[i % 997], "caption_llava_short": short[i % 991],
                                "caption": short[(i * 7) % 991][:90], "url": f"https://images.example.com/{i:09d}/photo.jpg",
                                "key": f"{i:09d}", "status": "success"}) + "\n")


def _join(path: str, lines: int, rows: int) -> None:
    """Child process: one pass, then print JSON with the peak RSS and timings."""
    import pyarrow as pa

    from pipelines import caption_join

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step = max(1, lines // rows)
    urls = [f"https://images.example.com/{i:09d}/photo.jpg" for i in range(0, lines, step)][:rows]
    shards = {f"shard-{s:05d}": pa.table({"url": urls[s * 5000:(s + 1) * 5000]}) for s in range(-(-len(urls) // 5000))}
    spec = caption_join.resolve(path, "url", "auto", "success", "first")
    t = time.perf_counter()
    joined, counts = caption_join.join_pass(spec, shards)
    seconds = time.perf_counter() - t
    hit = sum(j.stats["joined"] for j in joined.values())
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_mb": base / 1024,
                      "seconds": seconds, "joined": hit, "rows": len(urls), "lines": counts.lines}))


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(prog="minit2i bench join", description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, nargs="+", default=[1_000_000, 4_000_000], help="caption file sizes to compare")
    p.add_argument("--rows", type=int, default=200_000, help="dataset rows joined in the pass")
    p.add_argument("--child", nargs=2, metavar=("PATH", "LINES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _join(args.child[0], int(args.child[1]), args.rows)
        return 0

    table = Table(title=f"caption join: {args.rows:,} rows in one pass over CaptionEmporium-layout files")
    for col in ("file lines", "gzip MB", "JSON MB", "pass s", "lines/s", "joined", "peak RSS MB", "after imports MB"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for lines in args.lines:
            path = os.path.join(tmp, f"train-{lines}.jsonl.gz")
            write_file(path, lines)
            with gzip.open(path, "rb") as f:
                raw = sum(len(b) for b in iter(lambda: f.read(64 << 20), b""))
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_caption_join", "--rows", str(args.rows),
                                  "--child", path, str(lines)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            table.add_row(f"{lines:,}", f"{os.path.getsize(path) / 1e6:.0f}", f"{raw / 1e6:.0f}", f"{r['seconds']:.1f}",
                          f"{lines / r['seconds']:,.0f}", f"{r['joined']:,}", f"{r['peak_mb']:.0f}",
                          f"{r['base_mb']:.0f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
