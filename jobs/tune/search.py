"""What both sweeps share: the objective, the search space, and running (or restoring) the Tuner.

The objective is any metric the trials report (a summary key of `jobs.evaluate.Scorers.score`,
default world/overall, or the training loss), with an optional constraint on the patch-boundary
artifact ratio; Tune always maximises `objective`. ASHA stops poor trials at its rungs. A run
resumes with `Tuner.restore` when its experiment folder exists; trials that raise are retried
(FailureConfig) and then recorded as errored without stopping the run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from pipelines import storage

INFEASIBLE = -1e6   # objective of a trial that breaks the artifact constraint in "infeasible" mode
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


@dataclass
class ObjectiveConfig:
    metric: str = "world/overall"       # a reported metric (world/overall, clip_score, fid, loss, ...)
    mode: str = "max"                   # "max" or "min" (e.g. fid, loss); Tune always maximises `objective`
    artifact_max: float | None = None   # constraint: artifact_ratio must stay at or below this
    artifact_mode: str = "penalize"     # "penalize": minus weight * excess; "infeasible": rank below all feasible
    artifact_weight: float = 1.0

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"objective.mode must be max or min, got {self.mode!r}")
        if self.artifact_mode not in ("penalize", "infeasible"):
            raise ValueError(f"objective.artifact_mode must be penalize or infeasible, got {self.artifact_mode!r}")


@dataclass
class SweepConfig:
    out: str = "outputs/tune"           # reports here; Tune's experiment under <out>/ray/<name>
    name: str = "tune"                  # experiment name (reusing it resumes the run)
    num_samples: int = 8                # samples of the search space (x the grid, if any)
    max_concurrent: int = 0             # 0 = as many as the cluster's resources allow
    cpus_per_trial: float | None = None  # CPUs of the trial process; None: 1 (sampling), 0.25 (schedule: it only drives its Train run)
    gpus_per_trial: float = 0.0         # GPUs of the trial process (sampling; schedule's GPUs are train.scaling's)
    max_failures: int = 1               # retries of a trial that raises before it is recorded as errored
    reduction_factor: int = 2           # ASHA
    seed: int = 0                       # search-space sampling seed
    grid_images: int = 8                # images in each trial's sample grid


def objective_of(summary: dict[str, float], cfg: ObjectiveConfig) -> tuple[float, bool]:
    """(objective to maximise, feasible) from a metrics summary."""
    if cfg.metric not in summary:
        raise ValueError(f"objective metric {cfg.metric!r} is not computed; available: {', '.join(sorted(summary))}")
    value = float(summary[cfg.metric])
    value = value if cfg.mode == "max" else -value
    ratio = summary.get("artifact_ratio", float("nan"))
    if cfg.artifact_max is None or not ratio > cfg.artifact_max:
        return value, True
    if cfg.artifact_mode == "infeasible":
        return INFEASIBLE + value, False
    return value - cfg.artifact_weight * (ratio - cfg.artifact_max), False


def _is_distribution(spec: Any) -> bool:
    return isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS


def search_space(space: dict[str, Any], nested: bool = False, where: str = "") -> dict[str, Any]:
    """YAML search space -> Tune's. Each key is a constant or a one-key mapping
    {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}, {choice: [...]}, {grid: [...]};
    with `nested`, also a section of such keys (`denoiser: {t_mu: {uniform: [-1.6, 0.4]}}`), as the config nests."""
    from ray import tune

    kinds = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
             "choice": tune.choice, "grid": tune.grid_search}
    out = {}
    for key, spec in space.items():
        name = f"{where}{key}"
        if _is_distribution(spec):
            kind, args = next(iter(spec.items()))
            if not isinstance(args, (list, tuple)) or (kind in ("uniform", "loguniform", "randint") and len(args) != 2):
                raise ValueError(f"search space {name}: {kind} takes a list ({kind}: [lo, hi] or [a, b, ...]), got {args!r}")
            out[key] = kinds[kind](*args) if kind in ("uniform", "loguniform", "randint") else kinds[kind](list(args))
        elif nested and isinstance(spec, dict) and spec and not any(k in DISTRIBUTIONS for k in spec):
            out[key] = search_space(spec, nested, f"{name}.")
        elif isinstance(spec, dict):
            raise ValueError(f"search space {name}: use one of {', '.join(DISTRIBUTIONS)} (e.g. {{uniform: [1, 8]}}), got {spec!r}")
        else:
            out[key] = spec
    return out


def space_keys(space: dict[str, Any], where: str = "") -> list[str]:
    """The dotted keys a search space sets (its leaves: constants and distributions)."""
    keys = []
    for key, spec in space.items():
        if isinstance(spec, dict) and spec and not _is_distribution(spec) and not any(k in DISTRIBUTIONS for k in spec):
            keys += space_keys(spec, f"{where}{key}.")
        else:
            keys.append(f"{where}{key}")
    return keys


def lookup(config: dict, key: str) -> Any:
    """config[a][b] for key "a.b" (None when missing)."""
    for part in key.split("."):
        if not isinstance(config, dict):
            return None
        config = config.get(part)
    return config


def resumable_asha(state_uri: str, **kwargs):
    """ASHA whose rungs (each trial's objective at each milestone) survive `Tuner.restore`.

    Tune restores trials but not its scheduler's records (ASHAScheduler.save/restore are never
    called by the Tuner), so a restored sweep would judge the next trials against empty rungs and
    stop none of them early. This one writes its rungs to `state_uri` (beside the experiment, local
    or s3://) whenever it records a result, and reads them back before its first trial."""
    from ray.tune.schedulers import ASHAScheduler

    class ResumableASHA(ASHAScheduler):
        def __init__(self, state_uri: str, **kwargs):
            super().__init__(**kwargs)
            self.state_uri, self.loaded = state_uri, False

        def on_trial_add(self, tune_controller, trial):
            if not self.loaded:
                self.loaded = True
                if storage.exists(self.state_uri):
                    saved = json.loads(storage.read_bytes(self.state_uri))
                    for bracket, rungs in zip(self._brackets, saved):
                        for (_, recorded), values in zip(bracket._rungs, rungs):
                            recorded.update(values)
            super().on_trial_add(tune_controller, trial)

        def _save(self) -> None:
            rungs = [[dict(recorded) for _, recorded in bracket._rungs] for bracket in self._brackets]
            storage.write_bytes(self.state_uri, json.dumps(rungs).encode())

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            self._save()
            return action

        def on_trial_complete(self, tune_controller, trial, result):
            super().on_trial_complete(tune_controller, trial, result)
            self._save()

    return ResumableASHA(state_uri, **kwargs)


def experiment_path(cfg: SweepConfig) -> tuple[str, Any]:
    """(<out>/ray/<name>, its pyarrow filesystem or None for local disk)."""
    fs = storage.s3_filesystem() if storage.is_s3(cfg.out) else None
    root = storage.join(cfg.out, "ray") if fs else os.path.abspath(storage.join(cfg.out, "ray"))
    return root, fs


def run_sweep(trainable, space: dict[str, Any], sweep: SweepConfig, *, nested: bool, time_attr: str, max_t: int, grace: int,
              resources: dict[str, float], max_concurrent: int | None, reuse_actors: bool,
              callbacks: list | None = None, stop_last_trials: bool = True) -> dict[str, Any]:
    """Run (or resume) a sweep with ASHA over `time_attr`; returns {"results", "rows", "interrupted", "resumed"}.
    stop_last_trials=False lets a trial that reaches max_t end by itself instead of being stopped."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_resources(trainable, resources)
    root, fs = experiment_path(sweep)
    exp_path = storage.join(root, sweep.name)
    rungs = storage.join(exp_path, "asha_rungs.json")
    resumed = False
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        print(f"tune: resuming {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=fs)
        resumed = True
    else:
        storage.write_bytes(rungs, b"[]")                 # a new sweep under an old name starts with empty rungs
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(space, nested),
            tune_config=tune.TuneConfig(
                metric="objective", mode="max", num_samples=sweep.num_samples,
                reuse_actors=reuse_actors,
                # The limit goes to the generator itself: Tune ignores max_concurrent_trials for it.
                search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent or 0),
                scheduler=resumable_asha(rungs, time_attr=time_attr, max_t=max_t,
                                         grace_period=grace, reduction_factor=sweep.reduction_factor,
                                         stop_last_trials=stop_last_trials),
            ),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=root, storage_filesystem=fs, verbose=0, callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
    results = tuner.fit()
    # Statuses as saved in the experiment state: after Ctrl+C Tune stops the live trials (marking
    # them terminated in memory) but saves them as running, which is what a restore resumes.
    saved = tune.ExperimentAnalysis(results.experiment_path, storage_filesystem=fs)
    statuses = {t.trial_id: t.status for t in saved.trials}
    rows = result_rows(results, space_keys(space), statuses)
    interrupted = any(r["status"] not in ("TERMINATED", "ERROR") for r in rows)
    if interrupted:
        print(f"tune: interrupted; rerun the same command (out={sweep.out}, name={sweep.name}) to resume")
    return {"results": results, "rows": rows, "interrupted": interrupted, "resumed": resumed}


def result_rows(results, params: list[str], saved_status: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per trial: id, Tune status, error, searched parameters (dotted keys), last reported
    metrics, and (hidden, for the reports) its checkpoint URI and config."""
    # ResultGrid is built in the order of its analysis' trials; the Trial objects carry the status
    # (TERMINATED, ERROR, or PENDING/RUNNING/PAUSED when a run was interrupted), Results do not.
    trials = results._experiment_analysis.trials
    rows = []
    skip = {"done", "pid", "date", "hostname", "node_ip", "timestamp", "iterations_since_restore", "checkpoint_dir_name"}
    for r, trial in zip(results, trials):
        m = dict(r.metrics or {})
        cfg = dict(trial.config)
        status = (saved_status or {}).get(trial.trial_id, trial.status)
        row = {"trial_id": trial.trial_id, "status": status, "failures": trial.num_failures,
               "error": (str(r.error).strip().splitlines() or [""])[-1][:200] if r.error else ""}
        for p in params:
            value = lookup(cfg, p)
            row[p] = json.dumps(value) if isinstance(value, (list, tuple)) else value
        for k, v in m.items():
            if isinstance(v, (int, float, bool)) and k not in row and k not in skip and not k.startswith("time_"):
                row[k] = v
        row["_checkpoint"] = checkpoint_uri(r)
        row["_config"] = cfg
        rows.append(row)
    return rows


def checkpoint_uri(result) -> str | None:
    """Where a trial's last checkpoint is, as a local path or s3:// URI: Tune's own checkpoint
    (sampling trials), else the Train checkpoint a schedule trial reported (`checkpoint_path`)."""
    import pyarrow.fs as pafs

    if result.checkpoint is not None:
        path = result.checkpoint.path
        return f"s3://{path}" if isinstance(result.checkpoint.filesystem, pafs.S3FileSystem) else path
    return (result.metrics or {}).get("checkpoint_path")
