"""`minit2i bench index`: the training data Index at CC12M scale, without reading any Parquet.

The Index is pickled to every train worker and reader actor, and each of them computes its plan
from the order, so both its size and the time to compute an epoch's order matter at scale. This
builds a synthetic Index (R rows in shards of 1000 with 64-row groups, the layout curate and
fetch write), then prints its pickled size next to the int64 layout it replaced (int64 triples
plus one id array per dataset), and the seconds and peak memory of one epoch's order and of one
worker's plan.

    minit2i bench index [--rows 10000000] [--batch 2048] [--partitions 64]
"""

from __future__ import annotations

import argparse
import pickle
import resource
import time

import numpy as np


def synthetic_index(rows: int, per_shard: int = 1000, group: int = 64):
    from jobs.train.data import Index

    shards = -(-rows // per_shard)
    starts = np.arange(0, per_shard, group)
    sid = np.repeat(np.arange(shards), per_shard)[:rows]
    row = np.tile(np.arange(per_shard), shards)[:rows]
    unit = sid * len(starts) + row // group
    units = np.stack([np.repeat(np.arange(shards), len(starts)), np.tile(np.arange(len(starts)), shards),
                      np.tile(starts, shards)], axis=1).astype(np.int64)
    return Index([f"s3://bucket/cc12m/shard-{i:05d}.parquet" for i in range(shards)], np.zeros(shards, dtype=np.int64),
                 np.stack([sid, row, unit], axis=1).astype(np.int32), units, np.array([0, rows], dtype=np.int64),
                 np.array([1.0]), "synthetic")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from jobs.train.data import DataConfig, epoch_order, worker_rows

    p = argparse.ArgumentParser(prog="minit2i bench index", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--batch", type=int, default=2048, help="global batch")
    p.add_argument("--partitions", type=int, default=64, help="streams (one per worker by default in training)")
    args = p.parse_args(argv)

    index = synthetic_index(args.rows)
    now = len(pickle.dumps(index, protocol=5))
    old = len(pickle.dumps((index.shards, index.units, index.rows.astype(np.int64), index.dataset_rows), protocol=5))
    cfg = DataConfig(datasets=["synthetic"], batch_size=args.batch, partitions=args.partitions, shuffle_rows=1024)
    t = time.perf_counter()
    epoch_order(index, cfg, 0)
    t_order = time.perf_counter() - t
    t = time.perf_counter()
    plan = worker_rows(index, cfg, 0, args.rows // args.batch, 0, args.partitions)
    t_plan = time.perf_counter() - t

    table = Table(title=f"Index of {args.rows:,} rows ({len(index.shards):,} shards, {len(index.units):,} row groups)")
    for col in ("measure", "value"):
        table.add_column(col)
    table.add_row("pickled Index (int32 rows, dataset ranges)", f"{now / 1e6:.0f} MB")
    table.add_row("int64 rows + per-dataset id arrays", f"{old / 1e6:.0f} MB")
    table.add_row("ratio (now / int64 layout)", f"{now / old:.2f}")
    table.add_row(f"one epoch's order (G={args.batch}, P={args.partitions})", f"{t_order:.1f} s")
    table.add_row(f"one worker's plan for the epoch ({len(plan):,} rows)", f"{t_plan:.1f} s")
    table.add_row("peak resident memory of this process", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
