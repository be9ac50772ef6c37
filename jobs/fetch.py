"""`minit2i fetch`: download a URL list into Parquet shards on a Ray cluster (see pipelines/fetch.py),
or import a WebDataset mirror of it into the same shards.

    minit2i fetch --urls cc12m.tsv --out s3://bucket/cc12m [--config fetch.yaml] [key=value ...]
    minit2i fetch --urls cc12m.tsv --out s3://bucket/cc12m --retry-failed
    minit2i fetch --wds 's3://bucket/cc12m-wds/cc12m-train-{0000..2175}.tar' --out s3://bucket/cc12m

Re-running the same command resumes: committed shards are skipped. Ray: joins the cluster in
RAY_ADDRESS when set, otherwise starts a local instance (jobs/ray_init.py).
"""

from __future__ import annotations

import argparse
import sys

from jobs import config as config_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--urls", help="URL list: tsv/csv/parquet/jsonl (local or s3://)")
    source.add_argument("--wds", help="WebDataset tars to import instead (no download): a brace pattern, "
                                      "a folder or an s3:// prefix, e.g. 'SRC/cc12m-train-{0000..2175}.tar'")
    parser.add_argument("--out", required=True, help="dataset folder (local path or s3://bucket/prefix)")
    parser.add_argument("--config", default=None, help="YAML file with FetchConfig fields")
    parser.add_argument("--shard-size", type=int, default=None, help="rows per shard (default 2000)")
    parser.add_argument("--allow-hosts", action="append", default=None, metavar="HOST_OR_CIDR[,...]",
                        help="host names or CIDRs exempt from the loopback/private/metadata address refusal")
    parser.add_argument("--retry-failed", action="store_true",
                        help="also re-fetch rows that failed with a retryable class (timeout, 429, 5xx, connection)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="FetchConfig overrides, e.g. threads=64")


def run(args: argparse.Namespace) -> int:
    from pipelines import fetch

    cfg = config_lib.load(fetch.FetchConfig, args.config, args.overrides)
    cfg.urls, cfg.wds, cfg.out = args.urls or "", args.wds or "", args.out
    if args.shard_size is not None:
        cfg.shard_size = args.shard_size
    if args.allow_hosts is not None:
        cfg.allow_hosts = [h.strip() for arg in args.allow_hosts for h in arg.split(",") if h.strip()]

    from pipelines import storage

    if cfg.urls and not storage.exists(cfg.urls):  # say so before paying for a Ray start
        raise FileNotFoundError(f"URL list {cfg.urls} does not exist")
    if cfg.wds:
        from pipelines.sources import cc12m_wds

        cc12m_wds.list_tars(cfg.wds)
    from jobs.ray_init import init_ray

    init_ray()  # RAY_ADDRESS's cluster, else a local instance
    try:
        result = fetch.run(cfg, retry_failed=args.retry_failed)
    except RuntimeError as err:  # shards that kept failing: committed ones are kept, resume later
        print(f"minit2i fetch: error: {err}", file=sys.stderr)
        return 1
    print(fetch.stats_table(result), end="")
    print(f"manifest: {result.manifest_uri}")
    return 0
