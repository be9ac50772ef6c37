"""`minit2i train --config jobs/configs/<run>.yaml [key=value ...]`: MM-JiT on Ray Train + DeepSpeed.

The driver checks the config and the data (manifests -> the sample Index), pins the folders it
starts from, then builds ScalingConfig, RunConfig and a TorchTrainer around the per-worker loop
(jobs/train/loop.py). `trainer_for` is also what every `tune schedule` trial runs, so a trial
trains exactly as this command does.

Checkpoints (jobs/train/checkpoints.py) are reported to Ray Train, which keeps the last
`checkpoint.num_to_keep` under storage_path/name. Running the same command again (same name and
storage_path) continues from the newest one, with any number of workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from dataclasses import dataclass

from jobs.train.checkpoints import STATE_NAME, check_resume, newest_checkpoint, resume_checkpoint, weights_folder
from jobs.train import feedback
from jobs.train.config import TrainConfig, run_cpus
from jobs.train.tracking import require_tracker, run_id
from pipelines import config as config_lib
from pipelines import retry, storage


@dataclass
class Prepared:
    """What the driver resolved before starting workers: the sample index and the run's own newest
    checkpoint (None for a fresh run)."""
    index: object
    own_checkpoint: str | None


def check(cfg: TrainConfig) -> tuple[int, int]:
    """Config errors that need no data, as one-line ValueErrors; returns (micro batch, passes)."""
    W, G = cfg.scaling.num_workers, cfg.data.batch_size
    if W < 1 or G % W:
        raise ValueError(f"data.batch_size {G} must be a positive multiple of scaling.num_workers {W}")
    if cfg.data.partitions < 0 or (cfg.data.partitions and G % cfg.data.partitions):
        raise ValueError(f"data.partitions {cfg.data.partitions} must divide data.batch_size {G} (or be 0: one per worker)")
    if cfg.data.decode_actors < 0:
        raise ValueError(f"data.decode_actors {cfg.data.decode_actors} must be >= 0 (0: each worker's reader decodes)")
    if cfg.optim.steps < 1 or cfg.checkpoint.every < 1 or cfg.logging.every < 1 or cfg.eval.every < 0:
        raise ValueError("optim.steps, checkpoint.every and logging.every must be >= 1 (eval.every >= 0)")
    for key, module in (("wandb_project", "wandb"), ("mlflow_tracking_uri", "mlflow")):
        if getattr(cfg.logging, key):
            require_tracker(module, key)
    feedback.check(cfg.data.feedback)
    if cfg.eval.every and cfg.eval.prompts and not storage.exists(cfg.eval.prompts):
        raise FileNotFoundError(f"eval.prompts {cfg.eval.prompts} does not exist")
    if cfg.lora.enabled:
        check_lora(cfg)
    return cfg.optim.accumulation(G // W)


def check_lora(cfg: TrainConfig) -> None:
    """A LoRA run's settings, before any worker starts."""
    import torch

    from jobs.train.lora import linear_names
    from model.mmjit import MMJiT

    if not cfg.checkpoint.init_from:
        raise ValueError("lora.enabled needs checkpoint.init_from: the weights the adapters are trained on (e.g. an "
                         "imported folder from `minit2i weights import`)")
    if cfg.optim.zero_stage == 3:
        raise ValueError("lora with optim.zero_stage=3 is not supported (ZeRO-3 would partition the frozen base "
                         "weights); use zero_stage 1 or 2")
    if cfg.eval.every or cfg.logging.sample_every:
        # TODO: sample the merged EMA in the loop; until then merge a checkpoint and evaluate that.
        raise ValueError("lora runs do not yet sample during training (eval.every, logging.sample_every): set them "
                         "to 0, then `minit2i weights merge RUN OUT` and `minit2i eval generate.checkpoint=OUT`")
    if cfg.data.feedback.critic.enabled:
        # The critic samples the run's EMA, which in a LoRA run holds adapters only (see the TODO above).
        raise ValueError("lora runs cannot use data.feedback.critic yet (the critic samples the EMA weights, which "
                         "hold only adapters here); data.feedback.stats works")
    with torch.device("meta"):
        names = linear_names(MMJiT(cfg.model.build(8, 8)))
    unknown = [t for t in cfg.lora.target_modules if t not in names]
    if unknown:
        raise ValueError(f"lora.target_modules: {', '.join(map(repr, unknown))} names no linear layer of MM-JiT; "
                         f"its linear layers are {', '.join(names)}")


def check_text_features(cfg: TrainConfig, index) -> None:
    """Cached T5 features must be what cfg.text_encoder would compute."""
    if index.text is None:
        return
    made = (index.text["encoder"], index.text["prompt_length"])
    if made != (cfg.text_encoder.name_or_path, cfg.text_encoder.prompt_length):
        raise ValueError(f"the cached T5 features were made by {made[0]} at prompt length {made[1]}, but text_encoder "
                         f"says {cfg.text_encoder.name_or_path} at {cfg.text_encoder.prompt_length}; set text_encoder "
                         f"to match (checkpoints record it for sampling) or re-run minit2i encode-text")
    if cfg.model.overrides.get("text_dim", index.text["width"]) != index.text["width"]:
        raise ValueError(f"model.overrides.text_dim {cfg.model.overrides['text_dim']} differs from the cached "
                         f"features' width {index.text['width']}")


def prepare(cfg: TrainConfig, index=None) -> Prepared:
    """Check `cfg` and its data, and resolve in place what every worker must see the same way:
    resume_from and init_from start a fresh run; a run with checkpoints of its own continues from
    them (Ray Train restores its newest) and reads neither. They are pinned to the folder they
    resolve to now, so every worker sees the same one while another run writes checkpoints.
    `index` skips rebuilding the sample index when the caller built it for this data config."""
    from jobs.train.data import build_index

    check(cfg)
    index = index if index is not None else build_index(cfg.data)
    check_text_features(cfg, index)
    own = newest_checkpoint(storage.join(cfg.storage_path, cfg.name))
    if own is not None:                 # checked here too, so a mismatch fails before any worker starts
        check_resume(json.loads(storage.read_bytes(storage.join(own, STATE_NAME))), cfg, index, cfg.scaling.num_workers)
        if cfg.checkpoint.resume_from or cfg.checkpoint.init_from:
            print(f"[train] {cfg.name} has checkpoints of its own: continuing from them; checkpoint.resume_from "
                  "and init_from are not read", flush=True)
        cfg.checkpoint.resume_from = cfg.checkpoint.init_from = None
    if cfg.checkpoint.resume_from:
        cfg.checkpoint.resume_from = resume_checkpoint(cfg.checkpoint.resume_from)
        state = storage.join(cfg.checkpoint.resume_from, STATE_NAME)
        check_resume(json.loads(storage.read_bytes(state)), cfg, index, cfg.scaling.num_workers)
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
    if cfg.eval.prompts and not storage.is_s3(cfg.eval.prompts):
        cfg.eval.prompts = os.path.abspath(cfg.eval.prompts)
    return Prepared(index, own)


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment the Train workers need from the driver: imports, caches, S3, trackers."""
    env = {k: os.environ[k] for k in ("PYTHONPATH", "MINIT2I_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                      "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_REGION", "AWS_DEFAULT_REGION") if k in os.environ}
    # The trackers' own settings (offline mode, API keys, telemetry opt-outs) reach rank 0 too.
    env.update({k: v for k, v in os.environ.items() if k.startswith(("WANDB_", "MLFLOW_")) or k == "DO_NOT_TRACK"})
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # Ray Train patches print() in workers to also log each line, which shows every console line
    # twice on the driver; the workers' prints already reach it through Ray's log forwarding.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"))
    return env


def trainer_for(cfg: TrainConfig, prepared: Prepared, callbacks: list | None = None):
    """The TorchTrainer of a prepared run config (`callbacks`: Ray Train callbacks, e.g. Tune's)."""
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train.loop import train_loop

    if storage.is_s3(cfg.storage_path):
        storage_path, storage_fs = cfg.storage_path[len("s3://"):], storage.s3_filesystem()
    else:
        storage_path, storage_fs = os.path.abspath(cfg.storage_path), None
    resume = None
    if cfg.checkpoint.resume_from:
        fs, path = storage.resolve(cfg.checkpoint.resume_from)
        resume = Checkpoint(path, filesystem=fs)
    rid = run_id(cfg.storage_path if storage_fs else storage_path, cfg.name)
    s = cfg.scaling
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": config_lib.to_dict(cfg), "index": prepared.index, "run_id": rid,
                           "own_checkpoint": prepared.own_checkpoint},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, placement_strategy=s.placement_strategy,
                                     resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            worker_runtime_env={"env_vars": worker_env(s.use_gpu)},
        ),
        resume_from_checkpoint=resume,
    )


def describe(cfg: TrainConfig, index, title: str | None = None) -> str:
    """One line: the data, the batch split, ZeRO stage, text features, steps and destination."""
    from jobs.train.data import steps_per_epoch

    W, G = cfg.scaling.num_workers, cfg.data.batch_size
    micro, passes = cfg.optim.accumulation(G // W)
    return (f"{title or '[train] ' + cfg.name}: {index.num_rows} usable rows in {len(index.shards)} shards, "
            f"{steps_per_epoch(index, G)} steps/epoch at global batch {G} = {W} workers x {passes} passes x micro batch {micro}, "
            f"{cfg.data.partitions or 'one per worker'} data partitions, "
            f"ZeRO-{cfg.optim.zero_stage}, text {'cached T5 features' if index.text else 'encoded online'}, "
            f"{cfg.optim.steps} steps -> {storage.join(cfg.storage_path, cfg.name)}")


def main(cfg: TrainConfig):
    """Validate the config and data, then run the TorchTrainer; returns Ray Train's Result."""
    from jobs.ray_init import init_ray

    prepared = prepare(cfg)
    init_ray(min_cpus=run_cpus(cfg))
    print(describe(cfg, prepared.index), flush=True)
    try:
        with caller_sigint_handler():
            return trainer_for(cfg, prepared).fit()
    finally:
        # pyarrow uploads checkpoint files in multipart uploads and leaves them open when a connection
        # drops; once the run's own uploads are over, none under its folder is still wanted.
        if storage.is_s3(cfg.storage_path):
            try:
                storage.abort_uploads(storage.join(cfg.storage_path, cfg.name))
            except retry.StorageUnavailable as err:        # the run's own outcome matters more
                print(f"[train] unfinished uploads not swept: {err}", flush=True)


@contextlib.contextmanager
def caller_sigint_handler():
    """Give the caller its own Ctrl+C handler back once `fit()` returns.

    In the main thread Ray Train's `fit()` installs a SIGINT handler that aborts the run, and leaves
    it installed: its closure holds the run's controller actor, so after a run in a Python session
    the controller (and its dataset manager) stayed alive until the next run, and Ctrl+C only asked
    the finished run to abort instead of raising KeyboardInterrupt. During the run it stays Ray's."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def run(cfg: TrainConfig) -> int:
    from ray.train import TrainingFailedError

    try:
        result = main(cfg)
    except TrainingFailedError as err:                 # the workers' own error is in its message
        return failed(cfg, err)
    if result.error is not None:
        return failed(cfg, result.error)
    ckpt = result.checkpoint
    print(f"[train] done: {result.metrics}\n[train] latest checkpoint: {ckpt.path if ckpt else None}", flush=True)
    return 0


def failed(cfg: TrainConfig, err: BaseException) -> int:
    """A run whose workers failed past scaling.max_failures. With a complete checkpoint of its own the
    same command continues from it (prepare() resumes a run folder that has checkpoints), so that is
    the resumable exit (75, with the sentence that says so); without one, a plain failure (1)."""
    print(f"minit2i train: failed: {err}", flush=True)
    newest = newest_checkpoint(storage.join(cfg.storage_path, cfg.name))
    if newest is None:
        return 1
    step = json.loads(storage.read_bytes(storage.join(newest, STATE_NAME)))["step"]
    raise retry.Resumable(f"training failed after its checkpoint at step {step} ({newest}): "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}")
