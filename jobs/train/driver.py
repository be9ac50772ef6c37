"""`minit2i train --config jobs/configs/<run>.yaml [key=value ...]`: MM-JiT on Ray Train + DeepSpeed.

The driver (`main`) reads the manifests, then builds ScalingConfig, RunConfig and a TorchTrainer;
`train_loop` runs in every Train worker: one DeepSpeed engine per worker (jobs/train_step.py),
batches streamed by Ray Data in the recorded order (jobs/train_data.py), the frozen T5 run online
(or its features read from a `minit2i encode-text` dataset with data.text_features=true).

Checkpoints are world-size-independent folders (weights + EMA as safetensors with model.json, so
`minit2i sample --checkpoint` reads them; Adam moments; train_state.json) reported to Ray Train,
which keeps the last `checkpoint.num_to_keep` under storage_path/name. Running the same command
again (same name and storage_path) continues from the newest one, with any number of workers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

from pipelines import config as config_lib
from jobs.train_data import DataConfig
from jobs.train_step import EMAConfig, ModelConfig, OptimConfig
from model.denoiser import DenoiserConfig
from model.text_encoder import TextEncoderConfig
from pipelines import storage

STATE_NAME = "train_state.json"
MOMENTS_NAME = "optimizer.safetensors"


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
class TrainConfig:
    name: str = "debug"                  # run name: storage_path/name holds its checkpoints
    storage_path: str = "outputs/runs"   # local folder or s3://bucket/prefix
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


# Dense bf16 peak FLOP/s per GPU (vendor datasheets, SXM parts) for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# --------------------------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------------------------

def checkpoint_problem(uri: str) -> str | None:
    """None if `uri` is a complete checkpoint this job wrote, else what is wrong with it."""
    for name in (STATE_NAME, MOMENTS_NAME, "model.safetensors", "model.json"):
        if not storage.exists(storage.join(uri, name)):
            return f"it has no {name}"
    try:
        state = json.loads(storage.read_bytes(storage.join(uri, STATE_NAME)))
    except ValueError as err:
        return f"{STATE_NAME} is unreadable: {err}"
    for d in state.get("ema_decays", []):
        if not storage.exists(storage.join(uri, f"ema_{d}.safetensors")):
            return f"it has no ema_{d}.safetensors"
    return None


def newest_checkpoint(run_uri: str) -> str | None:
    """The complete checkpoint with the highest step among a run folder's subfolders (storage_path/
    name holds Ray Train's checkpoint_* folders); an upload cut short by a failure is passed over."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(run_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    best = None
    for info in fs.get_file_info(pafs.FileSelector(path)):
        uri = storage.join(run_uri, info.base_name)
        if info.type != pafs.FileType.Directory or checkpoint_problem(uri):
            continue
        step = json.loads(storage.read_bytes(storage.join(uri, STATE_NAME)))["step"]
        if best is None or step > best[0]:
            best = (step, uri)
    return best and best[1]


def resume_checkpoint(uri: str) -> str:
    """checkpoint.resume_from as a checkpoint folder: the folder itself, or a run folder's newest
    complete checkpoint. Anything else fails loudly, never a silent fresh start."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"checkpoint.resume_from {uri} does not exist")
    problem = checkpoint_problem(uri)
    if problem is None:
        return uri
    newest = newest_checkpoint(uri)
    if newest is None:
        raise ValueError(f"checkpoint.resume_from {uri} is not a training checkpoint ({problem}) "
                         "nor a run folder holding a complete one")
    print(f"[train] checkpoint.resume_from {uri}: a run folder; resuming from its newest checkpoint {newest}", flush=True)
    return newest


def weights_folder(uri: str) -> str:
    """A folder to load inference weights from: a weights folder or checkpoint (model.json +
    *.safetensors) as it is, or a run folder's newest complete checkpoint. Local or s3://."""
    if storage.exists(storage.join(uri, "model.json")):
        return uri
    newest = newest_checkpoint(uri)
    if newest is None:
        where = "does not exist" if not storage.exists(uri) else "has no model.json and no complete checkpoint in it"
        raise FileNotFoundError(f"{uri} {where}: give a weights folder, a checkpoint or a training run's folder "
                                "(storage_path/name)")
    print(f"{uri}: a run folder; using its newest checkpoint {newest}", flush=True)
    return newest


def local_copy(uri: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A local path holding a weights folder's model.json and weights (a local folder as it is; from
    S3, a temp dir with those files only: a checkpoint's Adam moments are twice the weights)."""
    if not storage.is_s3(uri):
        return uri, None
    import pyarrow.fs as pafs

    tmp = tempfile.TemporaryDirectory()
    for f in storage.list_files(uri):
        name = f.rsplit("/", 1)[-1]
        if name == "model.json" or (name.endswith(".safetensors") and name != MOMENTS_NAME):
            fs, path = storage.resolve(f)
            pafs.copy_files(path, os.path.join(tmp.name, name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
    return tmp.name, tmp


def read_checkpoint(path: str) -> dict:
    """(weights, moments, ema per decay, state) from a checkpoint folder on local disk."""
    from safetensors.torch import load_file

    try:
        state = json.loads(open(os.path.join(path, STATE_NAME)).read())
        out = {"state": state, "weights": load_file(os.path.join(path, "model.safetensors")),
               "moments": load_file(os.path.join(path, MOMENTS_NAME)), "ema": {}}
        for d in state.get("ema_decays", []):
            out["ema"][float(d)] = load_file(os.path.join(path, f"ema_{d}.safetensors"))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"checkpoint {path} is unreadable: {err}") from err
    return out


def write_checkpoint(path: str, weights, moments, emas, state: dict, cfg: TrainConfig, model_cfg) -> None:
    from safetensors.torch import save_file

    from model.checkpoint import save_weights

    extra = {"step": state["step"]}
    save_weights(path, weights, model_cfg, cfg.text_encoder, cfg.denoiser, name="model", extra=extra)
    for d, sd in emas.items():
        save_weights(path, sd, model_cfg, cfg.text_encoder, cfg.denoiser, name=f"ema_{d}", extra=extra)
    save_file(moments, os.path.join(path, MOMENTS_NAME))
    with open(os.path.join(path, STATE_NAME), "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------
# Logging (rank 0)
# --------------------------------------------------------------------------------------------

class Logger:
    """Console + TensorBoard (+ W&B / MLflow when configured). Only rank 0 makes one.

    A run keeps one identity in every tracker across restarts and re-runs of the same command:
    `run_id` (a hash of where its checkpoints live) is the W&B run id (resume="allow") and an MLflow
    tag that finds the run again. TensorBoard purges the events after `start_step` that a failed
    attempt wrote, so a step re-done after a restart shows once.
    """

    def __init__(self, cfg: TrainConfig, log_dir: str, run_id: str, start_step: int):
        self.sinks, self.closers, self.failed = [], [], set()
        os.makedirs(log_dir, exist_ok=True)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Logged steps count steps done: a resume at step s keeps s and redoes s+1 onwards.
            tb = SummaryWriter(log_dir, purge_step=start_step + 1 if start_step else None)
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


# --------------------------------------------------------------------------------------------
# The per-worker loop
# --------------------------------------------------------------------------------------------

def train_loop(loop_config: dict) -> None:
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from jobs.train_data import iter_batches, order_settings, with_partitions
    from jobs.train_step import ShardedEMA, TrainStep, build_engine, full_state, load_moments
    from model.text_encoder import FrozenT5

    cfg = config_lib.from_dict(TrainConfig, loop_config["cfg"])
    index = loop_config["index"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    G = cfg.data.batch_size
    b = G // world
    trace = cfg.logging.trace_dir
    if trace:
        os.makedirs(trace, exist_ok=True)
        with open(os.path.join(trace, f"pid-rank{rank}.txt"), "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}))

    # Captions are encoded online by the frozen T5, or read as cached features (the driver checked
    # that they were made by cfg.text_encoder); then rank 0 loads T5 only to caption sample grids.
    encoder = None if cfg.data.text_features else FrozenT5(cfg.text_encoder, device)
    grid_encoder = encoder
    text_dim = encoder.dim if encoder else index.text["width"]
    model_cfg = cfg.model.build(text_dim, cfg.text_encoder.prompt_length)

    # Where to start: the run's newest checkpoint (Ray Train restores it, also after a worker
    # failure), else checkpoint.resume_from (passed as the trainer's resume checkpoint), else fresh.
    start_step, resumed, weights = 0, None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resumed = read_checkpoint(d)
        st = resumed["state"]
        if st["global_batch"] != G:
            raise ValueError(f"checkpoint was trained with global batch {st['global_batch']}, config says {G}: the data position would not line up")
        if st["data_fingerprint"] != index.fingerprint:
            raise ValueError("checkpoint was trained on different data (manifest fingerprint differs); use a new run name to start over")
        recorded = st.get("order", {})
        if not cfg.data.partitions and recorded.get("partitions"):
            cfg.data.partitions = recorded["partitions"]                 # auto: keep the first run's streams
        now = order_settings(with_partitions(cfg.data, world))
        changed = {k: (v, now.get(k)) for k, v in recorded.items() if now.get(k) != v}
        if changed:
            raise ValueError("checkpoint's sample order was made with different settings (checkpoint, config): "
                             + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in changed.items())
                             + "; resume with the checkpoint's values or use a new run name")
        start_step, weights = st["step"], resumed["weights"]
        if rank == 0:
            print(f"[train] resuming at step {start_step} (sample {start_step * G}) from {ckpt.path}, "
                  f"saved by {st['world_size']} workers, now {world}", flush=True)
    elif loop_config["own_checkpoint"]:
        raise RuntimeError(f"{loop_config['own_checkpoint']} is a checkpoint of this run, but Ray Train restored none "
                           "(its run state under storage_path/name is missing?); refusing to start over: use a new run "
                           "name, or checkpoint.resume_from with a new name to continue from it")
    elif cfg.checkpoint.init_from:
        from model.checkpoint import load_weights

        path, tmp = local_copy(cfg.checkpoint.init_from)
        net, _ = load_weights(path, cfg.checkpoint.init_weights)
        if net.config != model_cfg:
            raise ValueError(f"checkpoint.init_from {cfg.checkpoint.init_from} holds a different model config: {net.config}")
        weights = net.state_dict()
        del net
        if tmp:
            tmp.cleanup()

    data_cfg = with_partitions(cfg.data, world)
    engine, precision = build_engine(model_cfg, cfg.optim, b, device, weights)
    if resumed is not None:
        load_moments(engine, resumed["moments"], start_step)
    ema = ShardedEMA(engine, cfg.ema.decays, init=resumed["ema"] if resumed else None)
    step_fn = TrainStep(engine, precision, cfg.denoiser, cfg.optim, ema, cfg.data.seed)
    del resumed, weights

    log_dir = cfg.logging.dir
    logger = Logger(cfg, log_dir, loop_config["run_id"], start_step) if rank == 0 else None
    from model.mmjit import forward_flops

    train_flops = 3 * forward_flops(model_cfg)["total"]            # forward + backward per image
    peak = peak_flops(device)
    skipped = torch.zeros((), dtype=torch.float64)
    t_last, step_last = time.perf_counter(), start_step
    keys_file = open(os.path.join(trace, f"keys-rank{rank}.jsonl"), "a") if trace else None

    def save(step: int, metrics: dict) -> None:
        weights_, moments_ = full_state(engine)                    # collectives: every rank takes part
        emas_ = ema.full()
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            state = {"step": step, "samples": step * G, "epoch": step // (index.num_rows // G), "global_batch": G,
                     "world_size": world, "micro_batch": step_fn.micro, "passes": b // step_fn.micro,
                     "data_fingerprint": index.fingerprint, "seed": cfg.data.seed,
                     "order": order_settings(data_cfg),
                     "ema_decays": [str(d) for d in emas_], "skipped": int(metrics.get("skipped", 0))}
            write_checkpoint(tmp, weights_, moments_, {str(d): sd for d, sd in emas_.items()}, state, cfg, model_cfg)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    total = cfg.optim.steps
    step = start_step
    batches = iter_batches(index, data_cfg, model_cfg.image_size, start_step, total, rank, world)
    for step, batch in batches:
        if encoder is not None:
            text, mask = encoder(batch["caption"])
        else:
            text, mask = batch["features"], batch["text_mask"]
        positions = [step * G + rank * b + i for i in range(b)]
        out = step_fn(step, batch["image"], text, mask, positions, batch["valid"])
        skipped += (~batch["valid"]).sum()
        if keys_file:
            keys_file.write(json.dumps({"step": step, "rank": rank, "world": world, "pid": os.getpid(), "keys": batch["key"],
                                        "valid": batch["valid"].tolist(), "loss": out["loss"].item()}) + "\n")
            keys_file.flush()
        done = step + 1
        last = done >= total
        is_log = done % cfg.logging.every == 0 or last
        is_ckpt = done % cfg.checkpoint.every == 0 or last
        metrics = {}
        if is_log or is_ckpt:
            stats = torch.stack([out["loss"].double().cpu(), skipped]).to(device)
            dist.all_reduce(stats)
            now = time.perf_counter()
            img_s = (done - step_last) * G / (now - t_last)
            metrics = {"loss": stats[0].item() / world, "lr": out["lr"], "grad_norm": step_fn.grad_norm(),
                       "img_per_s": img_s, "skipped": stats[1].item()}
            if peak:
                metrics["mfu"] = train_flops * img_s / (peak * world)
            t_last, step_last = now, done
            if logger and is_log:
                logger.log(metrics, done, total)
        if cfg.logging.sample_every and (done % cfg.logging.sample_every == 0 or last):
            if grid_encoder is None and rank == 0:
                grid_encoder = FrozenT5(cfg.text_encoder, device)
            sample_grid(cfg, engine, ema, grid_encoder, model_cfg, done, rank, log_dir)
        if is_ckpt:
            save(done, metrics)
        elif is_log:
            ray.train.report(metrics)
        if last:
            break
    if keys_file:
        keys_file.close()
    if logger:
        logger.close()


def sample_grid(cfg: TrainConfig, engine, ema, encoder, model_cfg, step: int, rank: int, log_dir: str) -> None:
    """A PNG grid from the highest-decay EMA (consolidated: a collective), written by rank 0."""
    import torch

    from jobs.sample import generate, save_grid
    from model.denoiser import SamplerConfig
    from model.mmjit import MMJiT

    emas = ema.full()
    if rank != 0:
        return
    decay = max(emas)
    net = MMJiT(model_cfg)
    net.load_state_dict(emas[decay])
    net.to(encoder.device).eval()
    prompts = cfg.logging.sample_prompts
    sampler = SamplerConfig(sampler="euler", steps=cfg.logging.sample_steps, noise_scale=cfg.denoiser.noise_scale)
    with torch.no_grad():
        images = generate(net, encoder, prompts, sampler, seed=0)
    path = save_grid(images, os.path.join(log_dir, f"samples-{step:07d}.png"), captions=prompts)
    print(f"[train] step {step}: sample grid {path} (ema {decay})", flush=True)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

def main(cfg: TrainConfig):
    """Validate the config and data, then run the TorchTrainer; returns Ray Train's Result."""
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train_data import build_index, steps_per_epoch

    W, G = cfg.scaling.num_workers, cfg.data.batch_size
    if W < 1 or G % W:
        raise ValueError(f"data.batch_size {G} must be a positive multiple of scaling.num_workers {W}")
    if cfg.data.partitions < 0 or (cfg.data.partitions and G % cfg.data.partitions):
        raise ValueError(f"data.partitions {cfg.data.partitions} must divide data.batch_size {G} (or be 0: one per worker)")
    micro, passes = cfg.optim.accumulation(G // W)
    if cfg.optim.steps < 1 or cfg.checkpoint.every < 1 or cfg.logging.every < 1:
        raise ValueError("optim.steps, checkpoint.every and logging.every must be >= 1")
    index = build_index(cfg.data)
    spe = steps_per_epoch(index, G)
    if index.text is not None:       # cached features must be what cfg.text_encoder would compute
        made = (index.text["encoder"], index.text["prompt_length"])
        if made != (cfg.text_encoder.name_or_path, cfg.text_encoder.prompt_length):
            raise ValueError(f"the cached T5 features were made by {made[0]} at prompt length {made[1]}, but text_encoder "
                             f"says {cfg.text_encoder.name_or_path} at {cfg.text_encoder.prompt_length}; set text_encoder "
                             f"to match (checkpoints record it for sampling) or re-run minit2i encode-text")
        if cfg.model.overrides.get("text_dim", index.text["width"]) != index.text["width"]:
            raise ValueError(f"model.overrides.text_dim {cfg.model.overrides['text_dim']} differs from the cached "
                             f"features' width {index.text['width']}")
    # resume_from and init_from start a fresh run; a run with checkpoints of its own continues from
    # them (Ray Train restores its newest) and does not read either. They are pinned to the folder
    # they resolve to now, so every worker sees the same one while another run writes checkpoints.
    resume = None
    own = newest_checkpoint(storage.join(cfg.storage_path, cfg.name))
    if own is not None:
        if cfg.checkpoint.resume_from or cfg.checkpoint.init_from:
            print(f"[train] {cfg.name} has checkpoints of its own: continuing from them; checkpoint.resume_from "
                  "and init_from are not read", flush=True)
        cfg.checkpoint.resume_from = cfg.checkpoint.init_from = None
    if cfg.checkpoint.resume_from:
        cfg.checkpoint.resume_from = resume_checkpoint(cfg.checkpoint.resume_from)
        fs, path = storage.resolve(cfg.checkpoint.resume_from)
        resume = Checkpoint(path, filesystem=fs)
    if cfg.checkpoint.init_from:
        try:
            cfg.checkpoint.init_from = weights_folder(cfg.checkpoint.init_from)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"checkpoint.init_from: {err}") from None
    if cfg.logging.dir is None:
        cfg.logging.dir = os.path.join("outputs", "train", cfg.name)
    cfg.logging.dir = os.path.abspath(cfg.logging.dir)
    if cfg.logging.trace_dir:
        cfg.logging.trace_dir = os.path.abspath(cfg.logging.trace_dir)
    for key, module in (("wandb_project", "wandb"), ("mlflow_tracking_uri", "mlflow")):
        if getattr(cfg.logging, key):
            require_tracker(module, key)

    if storage.is_s3(cfg.storage_path):
        storage_path, storage_fs = cfg.storage_path[len("s3://"):], storage.s3_filesystem()
    else:
        storage_path, storage_fs = os.path.abspath(cfg.storage_path), None
    rid = run_id(cfg.storage_path if storage_fs else storage_path, cfg.name)

    from jobs.ray_init import init_ray

    init_ray()
    env = {k: os.environ[k] for k in ("PYTHONPATH", "MINIT2I_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                      "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_REGION", "AWS_DEFAULT_REGION") if k in os.environ}
    # The trackers' own settings (offline mode, API keys, telemetry opt-outs) reach rank 0 too.
    env.update({k: v for k, v in os.environ.items() if k.startswith(("WANDB_", "MLFLOW_")) or k == "DO_NOT_TRACK"})
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # Ray Train patches print() in workers to also log each line, which shows every console line
    # twice on the driver; the workers' prints already reach it through Ray's log forwarding.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"))
    print(f"[train] {cfg.name}: {index.num_rows} usable rows in {len(index.shards)} shards, "
          f"{spe} steps/epoch at global batch {G} = {W} workers x {passes} passes x micro batch {micro}, "
          f"{cfg.data.partitions or 'one per worker'} data partitions, "
          f"ZeRO-{cfg.optim.zero_stage}, text {'cached T5 features' if index.text else 'encoded online'}, "
          f"{cfg.optim.steps} steps -> {storage.join(cfg.storage_path, cfg.name)}", flush=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": config_lib.to_dict(cfg), "index": index, "run_id": rid, "own_checkpoint": own},
        scaling_config=ScalingConfig(num_workers=W, use_gpu=cfg.scaling.use_gpu, placement_strategy=cfg.scaling.placement_strategy,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            worker_runtime_env={"env_vars": env},
        ),
        resume_from_checkpoint=resume,
    )
    return trainer.fit()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML (jobs/configs/<run>.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 scaling.num_workers=4")


def run(args: argparse.Namespace) -> int:
    from ray.train import TrainingFailedError

    cfg = config_lib.load(TrainConfig, args.config, args.overrides)
    try:
        result = main(cfg)
    except TrainingFailedError as err:                 # the workers' own error is in its message
        print(f"minit2i train: failed: {err}", flush=True)
        return 1
    if result.error is not None:
        print(f"minit2i train: failed: {result.error}", flush=True)
        return 1
    ckpt = result.checkpoint
    print(f"[train] done: {result.metrics}\n[train] latest checkpoint: {ckpt.path if ckpt else None}", flush=True)
    return 0
