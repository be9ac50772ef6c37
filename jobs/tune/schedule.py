"""`minit2i tune schedule [key=value ...]`: Ray Tune over the training noise schedule, each trial a
`minit2i train` run.

A trial is the train job itself, launched the way Ray Train's current API (Train V2, the default in
Ray 2.60) runs inside Tune: the trial function builds the same TorchTrainer as `minit2i train`
(jobs/train/driver.py: N workers, DeepSpeed ZeRO, the Ray Data ingest and its resize-then-crop,
the same checkpoints) with a run name of its own and fits it, and a Train callback forwards each
report to Tune. Every `report_every` steps the workers report the loss and the scores of their
EMA weights sampled on the eval prompts (the train config's `eval` section) with a checkpoint, so
ASHA stops poor schedules at its rungs. The trial process only drives the run; its workers and
Ray Data actors are requested by Ray Train, and Tune runs as many trials at once as the cluster
holds all of (or run.max_concurrent).

Fault tolerance is Ray Train's and Tune's own: a worker that dies is replaced and the run goes on
from its last checkpoint (train.scaling.max_failures); an interrupted sweep resumes with
`Tuner.restore` (re-running the same command), each unfinished trial re-creating its Train run
under the same name, which restores its checkpoints.

    minit2i tune schedule --config jobs/configs/tune_schedule.yaml train.data.datasets=[outputs/world/train]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from jobs import repo_path
from jobs.tune.search import ObjectiveConfig, SweepConfig, lookup, objective_of, run_sweep, search_space, space_keys
from pipelines import config as config_lib
from pipelines import storage


def default_schedule_space() -> dict[str, Any]:
    return {"denoiser": {
        "t_mu": {"uniform": [-1.6, 0.4]},          # MiniT2I: -0.8
        "t_sigma": {"uniform": [0.4, 1.6]},        # MiniT2I: 0.8
        "noise_scale": {"choice": [1.0, 2.0]},     # MiniT2I: 2.0 at 512px
    }}


@dataclass
class ScheduleTuneConfig:
    train_config: str = "jobs/configs/debug.yaml"   # the train run each trial is (relative to the repository or absolute)
    train: dict[str, Any] = field(default_factory=dict)   # TrainConfig overrides on top, e.g. {data.datasets: [...], optim.steps: 400}
    report_every: int = 100                  # steps between reports (loss + eval scores + a checkpoint) = ASHA rungs
    space: dict[str, Any] = field(default_factory=default_schedule_space)   # TrainConfig keys searched, nested like the config
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    run: SweepConfig = field(default_factory=SweepConfig)


# The trial process of a schedule sweep only drives its Train run (Ray's guide: the driver "is not
# doing extensive computation"); the workers and their data actors hold the real resources.
DRIVER_CPUS = 0.25


def base_train_config(cfg: ScheduleTuneConfig):
    """The TrainConfig every trial starts from: train_config + train overrides, reporting and
    evaluating every `report_every` steps, checkpoints beside the sweep's reports."""
    from jobs.train.config import TrainConfig

    path = repo_path(cfg.train_config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"train_config {cfg.train_config} does not exist")
    train = config_lib.override(config_lib.load(TrainConfig, path), cfg.train, "train")
    if cfg.report_every < 1:
        raise ValueError(f"report_every must be >= 1, got {cfg.report_every}")
    # Every report carries the objective, so ASHA sees the same metric at every rung.
    train.logging.every = train.checkpoint.every = train.eval.every = cfg.report_every
    runs = storage.join(cfg.run.out, "runs")
    train.storage_path = runs if storage.is_s3(runs) else os.path.abspath(runs)
    return train


def trial_train_config(setup: dict, params: dict, trial_name: str):
    """A trial's TrainConfig: the base with the searched values (`params`, nested) set, its own run name."""
    from jobs.train.config import TrainConfig

    train = config_lib.from_dict(TrainConfig, setup["train"])
    values = {key: lookup(params, key) for key in setup["params"]}
    train = config_lib.override(train, values, f"trial {trial_name}")
    train.name = trial_name
    train.logging.dir = os.path.join(train.logging.dir or setup["logs"], trial_name)
    if train.logging.trace_dir:
        train.logging.trace_dir = os.path.join(train.logging.trace_dir, trial_name)
    return train


def trial_resources(train, driver_cpus: float) -> dict[str, float]:
    """Logical resources one trial holds while it runs: its driver process, the Train workers and
    each worker's Ray Data reader and decode actors (jobs/train/data.py)."""
    from jobs.train.config import run_cpus

    s = train.scaling
    return {"CPU": driver_cpus + run_cpus(train), "GPU": float(s.num_workers if s.use_gpu else 0)}


def concurrent_trials(need: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials fit on the cluster at once; a trial that can never fit is an error, not a
    sweep that waits forever for resources."""
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    n = min(fits) if fits else 1
    if n < 1:
        raise ValueError(f"one trial needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs (driver, Train workers, their "
                         f"Ray Data actors) but the cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} "
                         "GPUs: lower train.scaling.num_workers or cpus_per_worker, train.data.read_cpus/decode_cpus, "
                         "or run.cpus_per_trial (on an autoscaling cluster, set run.max_concurrent)")
    return n


PG_KEY = "train_placement_group"    # reported with every result: the Train run's placement group (hex id)


def train_callbacks(objective: ObjectiveConfig) -> list:
    """Ray Train callbacks of a trial's run: one remembers the worker group's placement group, one
    forwards every report to Tune with `objective` added, the checkpoint as a URI (local path or
    s3://) and that placement group, so the sweep can release it when Tune stops the trial."""
    import pyarrow.fs as pafs
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    from ray.tune.integration.ray_train import TuneReportCallback

    class PlacementGroupOf(WorkerGroupCallback):
        # The hook and accessor Ray Train's own PlacementGroupCleanerCallback uses (Ray 2.60).
        pg_hex: str | None = None

        def after_worker_group_start(self, worker_group):
            self.pg_hex = worker_group.get_worker_group_state().placement_group_handle.placement_group.id.hex()

    class ReportObjective(TuneReportCallback):
        def __init__(self, objective: ObjectiveConfig, placement: PlacementGroupOf):
            super().__init__()
            self.objective, self.placement = objective, placement

        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            first["objective"], first["feasible"] = objective_of(first, self.objective)
            first[PG_KEY] = self.placement.pg_hex
            if checkpoint is not None:
                s3 = isinstance(checkpoint.filesystem, pafs.S3FileSystem)
                first["checkpoint_path"] = f"s3://{checkpoint.path}" if s3 else checkpoint.path
            super().after_report(run_context, [first, *metrics[1:]], None)

    # Both go to the controller in one pickle, so the reporter reads the tracker it was given.
    placement = PlacementGroupOf()
    return [placement, ReportObjective(objective, placement)]


def release_callback():
    """A Tune callback that removes a finished, stopped or failed trial's Train placement group.

    When ASHA stops a trial, Tune ends the trial's process, and with it the Train controller it
    owns, before the controller can remove its workers' placement group; a placement group lives
    as long as the job (the sweep), so the next trials would wait for resources forever. Ray
    Train's own PlacementGroupCleaner would remove it, but it finds the controller dead through the
    State API, which needs the dashboard and one Ray instance per host. A trial that ended normally
    has removed its placement group already, and this does nothing."""
    from ray import tune

    class ReleaseTrainResources(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            release(trial.last_result.get(PG_KEY))

        def on_trial_error(self, iteration, trials, trial, **info):
            release(trial.last_result.get(PG_KEY))

        def on_trial_recover(self, iteration, trials, trial, **info):
            # A trial whose process died with its node (run.max_failures retries it): its Train
            # controller died too, and its workers' placement group would keep the CPUs the retry needs.
            release(trial.last_result.get(PG_KEY))

    return ReleaseTrainResources()


def release(pg_hex: str | None) -> None:
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if not pg_hex:
        return
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)))
    if placement_group_table(pg).get("state", "REMOVED") != "REMOVED":
        remove_placement_group(pg)


def schedule_trial(config: dict, setup: dict) -> None:
    """One Tune trial: the train job with this trial's schedule, until done or stopped by ASHA."""
    from ray import tune

    from jobs.train.driver import prepare, trainer_for

    trial_id = tune.get_context().get_trial_id()
    train = trial_train_config(setup, config, f"{setup['name']}-{trial_id}")
    same_data = config_lib.to_dict(train.data) == setup["train"]["data"]
    prepared = prepare(train, setup["index"] if same_data else None)
    objective = config_lib.from_dict(ObjectiveConfig, setup["objective"])
    trainer_for(train, prepared, callbacks=train_callbacks(objective)).fit()


def run_schedule(cfg: ScheduleTuneConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep and write the reports; returns {"best", "table", "interrupted", "resumed"}."""
    import ray
    from ray import tune

    from jobs.ray_init import init_ray
    from jobs.train.driver import check, check_text_features, describe
    from jobs.train.data import build_index
    from jobs.tune.reports import write_reports

    train = base_train_config(cfg)
    params = space_keys(cfg.space)
    search_space(cfg.space, nested=True)                           # validate before starting anything
    current = config_lib.to_dict(train)
    for key in params:                                             # every searched key is a TrainConfig key
        config_lib.override(train, {key: lookup(current, key)}, "space")
    check(train)
    index = build_index(train.data)                                # once: every trial reads the same data
    check_text_features(train, index)
    driver_cpus = DRIVER_CPUS if cfg.run.cpus_per_trial is None else cfg.run.cpus_per_trial
    need = trial_resources(train, driver_cpus)
    init_ray(min_cpus=need["CPU"])                                 # a local instance fits one trial at least
    limit = cfg.run.max_concurrent or concurrent_trials(need, ray.cluster_resources())
    print(describe(train, index, "[tune schedule] each trial"), flush=True)
    print(f"[tune schedule] a trial holds {need['CPU']:g} CPUs, {need['GPU']:g} GPUs; {limit} at a time", flush=True)
    # Trials' TensorBoard folders: beside the reports, or on local disk when those go to S3.
    logs = os.path.join("outputs", "tune", cfg.run.name) if storage.is_s3(cfg.run.out) else cfg.run.out
    setup = {"train": config_lib.to_dict(train), "params": params, "index": index, "name": cfg.run.name,
             "logs": os.path.abspath(os.path.join(logs, "logs")), "objective": config_lib.to_dict(cfg.objective)}
    trainable = tune.with_parameters(schedule_trial, setup=setup)
    out = run_sweep(trainable, cfg.space, cfg.run, nested=True, time_attr="step", max_t=train.optim.steps,
                    grace=min(cfg.report_every, train.optim.steps), resources={"cpu": driver_cpus},
                    max_concurrent=limit, reuse_actors=False, callbacks=[release_callback(), *(callbacks or [])],
                    stop_last_trials=False)
    best = write_reports("tune schedule", cfg.run.out, out["rows"], params, cfg.objective.metric, params,
                         lambda row: best_config(params, row), lambda row, body: best_header(cfg, row, body))
    return {"best": best, "table": out["rows"], "interrupted": out["interrupted"], "resumed": out["resumed"]}


def best_config(params: list[str], row: dict) -> dict:
    """The best trial's searched values as a train config section (nested, as the YAML takes it)."""
    body: dict[str, Any] = {}
    for key in params:
        node = body
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = lookup(row["_config"], key)
    return body


def best_header(cfg: ScheduleTuneConfig, row: dict, body: dict) -> str:
    """The command that trains the winner: the sweep's train config and overrides, then its keys."""
    import json
    import shlex

    from jobs.train.config import TrainConfig

    pairs = list(config_lib.leaves(TrainConfig, cfg.train)) + config_lib.flatten(body)
    keys = " ".join(shlex.quote(f"{k}={v if isinstance(v, str) else json.dumps(v)}") for k, v in pairs)
    return (f"# minit2i train --config {cfg.train_config} {keys}\n"
            f"# trained weights of this trial: {row['_checkpoint']}\n")


def run(cfg: ScheduleTuneConfig) -> int:
    out = run_schedule(cfg)
    print(f"wrote {cfg.run.out}/results.csv, plot.png" + (", best_config.yaml, best_grid.png, worst_grid.png" if out["best"] else
                                                        " (no trial finished: no best config)"))
    return 0
