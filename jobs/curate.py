"""`minit2i curate [--config FILE] [key=value ...]`: the finetune set from its three public releases.

    minit2i curate output=s3://bucket/finetune sources.blip3o.paths=[/data/BLIP3o-60k] ...

Settings default to jobs/configs/curate_finetune.yaml. The job itself is pipelines/curate.py;
this file only reads the sources and connects to Ray (`--address`, RAY_ADDRESS or a local one).
"""

from __future__ import annotations


def run(cfg) -> int:
    import ray

    from jobs.ray_init import init_ray
    from pipelines.curate import curate, existing_output, read_units

    existing_output(cfg.output, cfg.overwrite)
    units = read_units(cfg)  # unknown layouts and missing files fail here, before Ray starts
    started = not ray.is_initialized()
    init_ray()
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
