"""Where a training run's numbers go (rank 0): console, TensorBoard, W&B and MLflow when configured.

A run keeps one identity in every tracker across restarts and re-runs of the same command; a
tracker that fails mid-run is reported once and skipped, training goes on.
"""

from __future__ import annotations

import json
import os

from pipelines import config as config_lib
from pipelines import storage

# Dense bf16 peak FLOP/s per GPU (vendor datasheets, SXM parts) for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class Logger:
    """Console + TensorBoard (+ W&B / MLflow when configured). Only rank 0 makes one.

    A run keeps one identity in every tracker across restarts and re-runs of the same command:
    `run_id` (a hash of where its checkpoints live) is the W&B run id (resume="allow") and an MLflow
    tag that finds the run again. TensorBoard purges the events after `start_step` that a failed
    attempt wrote, so a step re-done after a restart shows once.
    """

    def __init__(self, cfg, log_dir: str, run_id: str, start_step: int):
        self.sinks, self.closers, self.failed = [], [], set()
        self.tb = None
        os.makedirs(log_dir, exist_ok=True)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Logged steps count steps done: a resume at step s keeps s and redoes s+1 onwards.
            tb = self.tb = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)
            self.sinks.append(lambda m, s: [tb.add_scalar(k, v, s) for k, v in m.items()] and tb.flush())
            self.closers.append(tb.close)
        if cfg.logging.wandb_project:
            require_tracker("wandb", "wandb_project")
            import wandb

            run = wandb.init(project=cfg.logging.wandb_project, name=cfg.name, id=run_id, resume="allow", dir=log_dir,
                             config=config_lib.to_dict(cfg))
            self.sinks.append(lambda m, s: run.log(m, step=s))
            self.closers.append(run.finish)
        if cfg.logging.mlflow_tracking_uri:
            require_tracker("mlflow", "mlflow_tracking_uri")
            import mlflow

            mlflow.set_tracking_uri(cfg.logging.mlflow_tracking_uri)
            mlflow.set_experiment(cfg.logging.mlflow_experiment)
            found = mlflow.search_runs(filter_string=f"tags.`minit2i.run_id` = '{run_id}'", max_results=1, output_format="list")
            if found:
                mlflow.start_run(run_id=found[0].info.run_id)
            else:
                mlflow.start_run(run_name=cfg.name, tags={"minit2i.run_id": run_id})
                mlflow.log_params(flat_params(config_lib.to_dict(cfg)))    # once: MLflow params cannot change
            self.sinks.append(lambda m, s: mlflow.log_metrics(m, step=s))
            self.closers.append(mlflow.end_run)

    def log(self, metrics: dict[str, float], step: int, total: int) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "step"}      # the step is the x axis, not a metric
        parts = [f"{k} {v:.4g}" for k, v in metrics.items()]
        print(f"[train] step {step}/{total}  " + "  ".join(parts), flush=True)
        for i, sink in enumerate(self.sinks):
            try:
                sink(metrics, step)
            except Exception as err:  # noqa: BLE001 - a tracker outage must not end a long run
                if i not in self.failed:
                    print(f"[train] warning: a metrics sink failed at step {step} ({type(err).__name__}: {err}); "
                          "training goes on, the console and the other sinks keep logging", flush=True)
                self.failed.add(i)

    def histograms(self, values: dict, step: int) -> None:
        """Histograms (tag -> integer values, one bin per value) to TensorBoard, e.g. the attribute
        values of the rows trained on since the last log (data.feedback)."""
        import numpy as np

        if self.tb is None:
            return
        for tag, v in values.items():
            if len(v):
                self.tb.add_histogram(tag, np.asarray(v), step, bins=np.arange(int(np.max(v)) + 2) - 0.5)
        self.tb.flush()

    def close(self) -> None:
        for close in self.closers:
            close()


def flat_params(d: dict) -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, string values."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in config_lib.flatten(d)}


def require_tracker(module: str, key: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"logging.{key} is set but {module} is not installed here (pip install {module})")


def run_id(storage_path: str, name: str) -> str:
    """The run's identity in the trackers: the same for every run of the same storage_path and name."""
    import hashlib

    return hashlib.sha256(storage.join(storage_path, name).encode()).hexdigest()[:16]
