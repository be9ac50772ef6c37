"""A training run's config: the sections each component owns, composed into TrainConfig.

YAML files under jobs/configs/ hold named runs (debug, b16_pretrain, ...); `key=value` overrides
on the command line change single fields. A `tune schedule` trial is a TrainConfig too, with the
searched keys set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.evaluate import MetricsConfig
from jobs.train.data import DataConfig
from jobs.train.lora import LoRAConfig
from jobs.train.step import EMAConfig, ModelConfig, OptimConfig
from model.denoiser import DenoiserConfig, SamplerConfig
from model.text_encoder import TextEncoderConfig


@dataclass
class ScalingSection:
    num_workers: int = 2                 # Ray Train workers (one per GPU on a GPU cluster)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 3                # worker-group restarts (from the last checkpoint) before giving up
    placement_strategy: str = "PACK"     # "SPREAD" puts workers on different nodes where possible


@dataclass
class CheckpointSection:
    every: int = 1000                    # steps between checkpoints (and one at the end)
    num_to_keep: int = 3
    resume_from: str | None = None       # a checkpoint (or a run folder: its newest) to start from when the run has none yet
    init_from: str | None = None         # weights to initialise the model (finetune): a weights folder, checkpoint or run folder
    init_weights: str | None = None      # which weights in init_from ("model", "ema_0.9999"); default: best EMA


@dataclass
class LoggingSection:
    every: int = 10                      # steps between console/TensorBoard lines
    dir: str | None = None               # TensorBoard and sample grids; default outputs/train/<name>
    tensorboard: bool = True
    wandb_project: str | None = None     # logs to W&B too when set (needs wandb installed)
    mlflow_tracking_uri: str | None = None   # logs to MLflow too when set (needs mlflow installed)
    mlflow_experiment: str = "minit2i"
    sample_every: int = 0                # steps between sample grids (0 = never)
    sample_steps: int = 20               # sampler steps for those grids
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle", "two blue squares", "a green triangle", "three yellow circles"])
    trace_dir: str | None = None         # per-worker pid files and consumed sample keys (for tests and audits)


@dataclass
class EvalSection:
    every: int = 0                       # steps between evaluations of the EMA weights (0 = never); metrics go out with the loss
    prompts: str | None = None           # prompt file (txt, jsonl, parquet); None = `count` synthetic-world prompts
    count: int = 16                      # prompts sampled and scored (the first `count` of the file)
    weights: str | None = None           # "ema_<decay>" sampled for evaluations and grids; None = the highest decay
    grid_images: int = 8                 # images of the evaluation's grid (eval_grid.png in the checkpoint)
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(sampler="euler", steps=25, cfg_scale=2.0))
    metrics: MetricsConfig = field(default_factory=MetricsConfig)   # which scores (jobs/evaluate.py); noise_scale follows denoiser


@dataclass
class TrainConfig:
    name: str = "debug"                  # run name: storage_path/name holds its checkpoints
    storage_path: str = "outputs/runs"   # local folder or s3://bucket/prefix
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)        # adapters on checkpoint.init_from's frozen weights
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)


def run_cpus(cfg: TrainConfig) -> float:
    """Logical CPUs a run holds while it trains: each Train worker and its Ray Data reader and
    decode actors (jobs/train/data.py)."""
    d = cfg.data
    return cfg.scaling.num_workers * (cfg.scaling.cpus_per_worker + d.read_cpus + d.decode_actors * d.decode_cpus)
