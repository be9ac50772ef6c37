"""`minit2i recaption DATA OUT [key=value ...]`: caption a fetched dataset with a VLM actor pool,
or join published captions.

    minit2i recaption s3://b/cc12m s3://b/cc12m-llava model=/models/llava num_gpus=1 concurrency=8
    minit2i recaption s3://b/cc12m s3://b/cc12m-llava from_jsonl=train.jsonl.gz                 # joined by url
    minit2i recaption s3://b/cc12m-wds-import s3://b/cc12m-llava from_jsonl=train.jsonl.gz join_on=key

Re-running the same command resumes: committed shards are skipped (see pipelines/recaption.py).
"""

from __future__ import annotations


def run(cfg) -> int:
    from jobs.ray_init import run_dataset_stage
    from pipelines import recaption

    return run_dataset_stage(recaption, cfg)
