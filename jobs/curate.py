"""`minit2i curate`: build the finetune set from its three public releases on a Ray cluster.

    minit2i curate --config jobs/configs/curate_finetune.yaml output=s3://bucket/finetune \\
        sources.blip3o.paths=[/data/BLIP3o-60k] ...

The job itself is pipelines/curate.py; this file only loads the config and connects to Ray.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines import config

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "curate_finetune.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray on this machine)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output=/data/ft dedup.near_threshold=6")


def run(args: argparse.Namespace) -> int:
    from pipelines.curate import CurateConfig, curate, existing_output, read_units

    cfg = config.load(CurateConfig, args.config, args.overrides)
    existing_output(cfg.output, cfg.overwrite)
    units = read_units(cfg)  # unknown layouts and missing files fail here, before Ray starts
    import ray

    from jobs.ray_init import init_ray

    started = not ray.is_initialized()
    init_ray(args.address)
    try:
        result = curate(cfg, units)
    except ray.exceptions.RayTaskError as err:
        # A bad file found mid-scan (a truncated tar, a source changed under the build) arrives
        # wrapped in Ray's task error; report its own first line, which names the file.
        if isinstance(err.cause, (ValueError, OSError)):
            kind = ValueError if isinstance(err.cause, ValueError) else OSError
            raise kind(str(err.cause).splitlines()[0]) from err
        raise
    finally:
        if started:
            ray.shutdown()
    print(f"curate: wrote {result.rows} rows in {len(result.shards)} shards to {cfg.output}")
    return 0
