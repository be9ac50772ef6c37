"""`minit2i encode-text DATA OUT [key=value ...]`: cache the frozen T5's caption features beside the
images, resumable.

    minit2i encode-text s3://b/finetune s3://b/finetune-t5 \\
        text_encoder.name_or_path=/models/flan-t5-large text_encoder.prompt_length=256 num_gpus=1 concurrency=8
    minit2i train --config jobs/configs/b16_finetune.yaml data.datasets=[s3://b/finetune-t5] data.text_features=true

Re-running the same command resumes: committed shards are skipped (see pipelines/text_features.py).
"""

from __future__ import annotations


def run(cfg) -> int:
    from jobs.ray_init import run_dataset_stage
    from pipelines import text_features

    return run_dataset_stage(text_features, cfg)
