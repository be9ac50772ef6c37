"""`minit2i fetch URLS OUT [key=value ...]`: a URL list into Parquet shards on Ray (pipelines/fetch.py),
or a WebDataset mirror of it imported into the same shards.

    minit2i fetch cc12m.tsv s3://bucket/cc12m [--config fetch.yaml] [threads=64 ...]
    minit2i fetch cc12m.tsv s3://bucket/cc12m retry_failed=true
    minit2i fetch wds='s3://bucket/cc12m-wds/cc12m-train-{0000..2175}.tar' out=s3://bucket/cc12m

Re-running the same command resumes: committed shards are skipped. Ray: `--address` or
RAY_ADDRESS joins that cluster, otherwise a local instance starts (jobs/ray_init.py).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from pipelines.fetch import FetchConfig


@dataclass
class FetchCommandConfig(FetchConfig):
    retry_failed: bool = False           # also re-fetch rows that failed with a retryable class (timeout, 429, 5xx, connection)


def run(cfg: FetchCommandConfig) -> int:
    from jobs.ray_init import init_ray
    from pipelines import fetch, storage

    if not cfg.out or bool(cfg.urls) == bool(cfg.wds):
        raise ValueError("fetch needs an output folder and one input: minit2i fetch URLS OUT, or wds=TARS out=OUT")
    if cfg.urls and not storage.exists(cfg.urls):  # say so before paying for a Ray start
        raise FileNotFoundError(f"URL list {cfg.urls} does not exist")
    if cfg.wds:
        from pipelines.sources import cc12m_wds

        cc12m_wds.list_tars(cfg.wds)
    # The dataset's config is FetchConfig's fields only: how a pass retries is not part of the data.
    data_cfg = FetchConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(FetchConfig)})
    init_ray()
    try:
        result = fetch.run(data_cfg, retry_failed=cfg.retry_failed)
    except RuntimeError as err:  # shards that kept failing: committed ones are kept, resume later
        print(f"minit2i fetch: error: {err}", file=sys.stderr)
        return 1
    print(fetch.stats_table(result), end="")
    print(f"manifest: {result.manifest_uri}")
    return 0
