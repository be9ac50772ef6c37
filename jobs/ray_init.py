"""Connecting a job to Ray, one way for every command: an existing cluster when one is named, else a
new local instance.

`address` (or RAY_ADDRESS; the command line's `--address` sets it for the job and every process it
starts) joins a running cluster, as `ray job submit` and KubeRay set it (RAY_ADDRESS=auto finds a
`ray start` cluster on this host). With neither, a new local instance starts with the CPUs given,
never some other cluster that happens to run on the host (a bare `ray.init()` would join it).
MINIT2I_RAY_NODE_IP pins the local instance to one address (the tests keep every Ray socket on
their own loopback address: Ray swaps 127.0.0.1 for the machine's outward address, other loopback
addresses it keeps). The retry policy (MINIT2I_RETRY) and the stage name travel to the workers in
the job's runtime_env.
"""

from __future__ import annotations

import json
import math
import os


def init_ray(address: str | None = None, num_cpus: int | None = None, min_cpus: float = 0, **kwargs):
    """ray.init for a job; a no-op when the caller already connected (tests, the demo).

    A local instance gets `num_cpus` logical CPUs, else the machine's count, raised to `min_cpus`
    (what the job's workers and actors reserve): on a 2-core laptop, 2 Train workers and their data
    actors reserve 2.5 CPUs, and an instance of 2 would leave the actors waiting for ever.
    """
    import ray

    from pipelines.retry import runtime_env_vars

    if ray.is_initialized():
        return ray
    # The retry policy and stage name reach every worker; a submitted job whose own runtime_env sets
    # them already has them there (and Ray refuses a driver's env var that conflicts with the job's).
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    already = ((submitted.get("runtime_env") or {}).get("env_vars") or {})
    carried = {k: v for k, v in runtime_env_vars().items() if k not in already}
    if carried:
        env = kwargs.setdefault("runtime_env", {})
        env["env_vars"] = {**carried, **env.get("env_vars", {})}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, configure_logging=False, **kwargs)
        keep_data_coordinator_on_driver_node()
        return ray
    node_ip = os.environ.get("MINIT2I_RAY_NODE_IP")
    if node_ip:
        kwargs["_node_ip_address"] = node_ip
    machine = os.cpu_count() or 1
    sized = local_cpus(num_cpus, min_cpus, machine)
    if sized != num_cpus:
        print(f"local Ray: {sized} logical CPUs on this {machine}-CPU machine, the {min_cpus:g} this job's "
              "workers and data actors reserve", flush=True)
    hook = f"{__name__}.quiet_placement_group_cleaner"      # the workers' setup: see PLACEMENT_GROUP_CLEANER_LOGGER
    kwargs.setdefault("runtime_env", {}).setdefault("worker_process_setup_hook", hook)
    ray.init(address="local", num_cpus=sized, include_dashboard=False, configure_logging=False, **kwargs)
    return ray


# Ray Train's PlacementGroupCleaner (a detached actor beside every run's controller) asks Ray's state
# API once a second whether the controller still lives, to remove the run's placement group if it
# died. A local instance here starts without the dashboard that serves that API, so every ask fails
# and logs "Failed to query Ray Train Controller actor state" (~300 lines in a demo run, a line a
# second in every local `minit2i train`); the placement groups of a local instance end with it anyway.
# The local instance's workers raise that one logger to errors. Ray has no setting for it.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """The worker_process_setup_hook of a local instance's job (PLACEMENT_GROUP_CLEANER_LOGGER)."""
    import logging

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


def keep_data_coordinator_on_driver_node() -> None:
    """Create Ray Data's cluster-wide autoscaling coordinator from this driver, so it lives on the
    driver's node (the head, for `--address` and `ray job submit`), if no job has created it yet.

    Ray Data 2.60 starts that coordinator (a named, detached actor that restarts for ever) on the
    node of whichever process first executes a Dataset, hard-pinned there: in a Train run that can be
    the ingest's split actor on a worker node. If that node is lost (a preempted spot instance), the
    coordinator can never restart there, and a Dataset executor that asks it for its resource budget
    keeps the last answer it had, an empty one for a new job's Dataset. Later Ray releases place it
    on the head node (ray-project/ray#62260); creating it first does the same here. Ray has no public
    call for it: on a Ray without this module it is skipped. tests/jobs/test_generate.py shows both
    placements on a two-node cluster."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    get_or_create_autoscaling_coordinator()


def local_cpus(num_cpus: int | None, min_cpus: float, machine: int) -> int | None:
    """The logical CPUs of a local instance: `num_cpus` when given, else Ray's own count (None, the
    machine's `machine` CPUs) unless the job reserves more than that."""
    if num_cpus is None and min_cpus > machine:
        return math.ceil(min_cpus)
    return num_cpus


def run_dataset_stage(stage, cfg) -> int:
    """A dataset -> dataset stage (recaption, encode-text) from its command: refuse an incomplete
    input before Ray starts, connect, run, print the stage's summary and manifest."""
    from pipelines import manifest

    manifest.read(cfg.data)
    init_ray()
    result = stage.run(cfg)
    print(stage.summary(result), end="")
    print(f"manifest: {result.manifest_uri}")
    return 0
