"""`minit2i encode-text`: cache the frozen T5's caption features beside the images, resumable.

    minit2i encode-text --data s3://b/finetune --out s3://b/finetune-t5 \\
        text_encoder.name_or_path=/models/flan-t5-large text_encoder.prompt_length=256 num_gpus=1 concurrency=8
    minit2i train --config jobs/configs/b16_finetune.yaml data.datasets=[s3://b/finetune-t5] data.text_features=true

Re-running the same command resumes: committed shards are skipped (see pipelines/text_features.py).
"""

from __future__ import annotations

import argparse

from pipelines import config as config_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset folder (local or s3://) with its manifest")
    parser.add_argument("--out", required=True, help="output dataset folder (local or s3://)")
    parser.add_argument("--config", default=None, help="YAML file with EncodeTextConfig fields")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="EncodeTextConfig overrides, e.g. text_encoder.name_or_path=/models/flan-t5-large num_gpus=1")


def run(args: argparse.Namespace) -> int:
    from jobs.ray_init import run_dataset_stage
    from pipelines import text_features

    cfg = config_lib.load(text_features.EncodeTextConfig, args.config, args.overrides)
    cfg.data, cfg.out = args.data, args.out
    return run_dataset_stage(text_features, cfg)
