"""`minit2i recaption`: caption a fetched dataset with a VLM actor pool, or join published captions.

    minit2i recaption --data s3://b/cc12m --out s3://b/cc12m-llava [model=... num_gpus=1 concurrency=8]
    minit2i recaption --data s3://b/cc12m --out s3://b/cc12m-llava --from-jsonl train.jsonl.gz   # by url
    minit2i recaption --data s3://b/cc12m-wds-import --out s3://b/cc12m-llava --from-jsonl train.jsonl.gz join_on=key

Re-running the same command resumes: committed shards are skipped (see pipelines/recaption.py).
"""

from __future__ import annotations

import argparse

from jobs import config as config_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="fetched dataset folder (local or s3://)")
    parser.add_argument("--out", required=True, help="output dataset folder (local or s3://)")
    parser.add_argument("--config", default=None, help="YAML file with RecaptionConfig fields")
    parser.add_argument("--model", default=None, help="VLM: local directory or hub id")
    parser.add_argument("--prompt", default=None, help="captioning prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--t5-tokenizer", default=None, help="tokenizer for caption_t5_tokens (local dir or hub id)")
    parser.add_argument("--from-jsonl", default=None, help="join published captions instead of generating: "
                                                           "CaptionEmporium's train.jsonl.gz or the reference's parquet")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="RecaptionConfig overrides, e.g. num_gpus=1")


def run(args: argparse.Namespace) -> int:
    from pipelines import recaption

    cfg = config_lib.load(recaption.RecaptionConfig, args.config, args.overrides)
    cfg.data, cfg.out = args.data, args.out
    for name in ("model", "prompt", "max_new_tokens", "t5_tokenizer", "from_jsonl"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))

    from jobs.ray_init import run_dataset_stage

    return run_dataset_stage(recaption, cfg)
