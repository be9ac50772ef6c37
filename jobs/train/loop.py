"""The per-worker training loop that Ray Train runs: `train_loop(loop_config)` on every worker.

One DeepSpeed engine per worker (jobs/train/step.py), batches streamed by Ray Data in the recorded
order (jobs/train/data.py), the frozen T5 run online (or its features read from a `minit2i
encode-text` dataset). Every `logging.every` steps the all-reduced loss (and, every `eval.every`
steps, the EMA's scores on the eval prompts) goes to `ray.train.report`, with a checkpoint every
`checkpoint.every` steps; `minit2i train` logs those, and a `tune schedule` trial forwards them to
Ray Tune, whose scheduler stops poor trials. The same loop for both: a trial is a train run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import torch

from jobs.train.checkpoints import check_resume, read_checkpoint, write_checkpoint
from jobs.train.config import TrainConfig
from pipelines import config as config_lib


def start_state(cfg: TrainConfig, index, world: int, rank: int, own_checkpoint: str | None, model_cfg):
    """(first step, restored checkpoint dict or None, initial weights or None) of this attempt:
    the run's newest checkpoint (Ray Train restores it, also after a worker failure), else
    checkpoint.resume_from (passed as the trainer's resume checkpoint), else init_from, else fresh."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resumed = read_checkpoint(d)
        st = resumed["state"]
        check_resume(st, cfg, index, world)
        if rank == 0:
            print(f"[train] resuming at step {st['step']} (sample {st['step'] * cfg.data.batch_size}) from {ckpt.path}, "
                  f"saved by {st['world_size']} workers, now {world}", flush=True)
        if st.get("lora_base"):                   # the frozen weights the adapters sit on, as the run recorded them
            return st["step"], resumed, load_init(st["lora_base"]["path"], st["lora_base"]["weights"], model_cfg)
        return st["step"], resumed, resumed["weights"]
    if own_checkpoint:
        raise RuntimeError(f"{own_checkpoint} is a checkpoint of this run, but Ray Train restored none "
                           "(its run state under storage_path/name is missing?); refusing to start over: use a new run "
                           "name, or checkpoint.resume_from with a new name to continue from it")
    if cfg.checkpoint.init_from:
        return 0, None, init_weights(cfg, model_cfg)
    return 0, None, None


def init_weights(cfg: TrainConfig, model_cfg) -> dict[str, torch.Tensor]:
    """checkpoint.init_from's weights (a finetune's start), checked against this run's model."""
    return load_init(cfg.checkpoint.init_from, cfg.checkpoint.init_weights, model_cfg)


def load_init(uri: str, which: str | None, model_cfg) -> dict[str, torch.Tensor]:
    from jobs.train.checkpoints import local_copy
    from model.checkpoint import load_weights

    path, tmp = local_copy(uri)
    try:
        net, _ = load_weights(path, which)
    finally:
        if tmp:
            tmp.cleanup()
    from model.mmjit import same_network

    if not same_network(net.config, model_cfg):
        raise ValueError(f"checkpoint.init_from {uri} holds a different model config: {net.config}")
    return net.state_dict()


class Evaluation:
    """The EMA weights sampled on the eval prompts and scored (rank 0), every `eval.every` steps,
    with the same sampling and scoring code as `minit2i eval`. The summary goes to every rank, so
    whichever worker's report a caller reads, it carries the scores."""

    def __init__(self, cfg: TrainConfig, rank: int):
        self.cfg, self.rank = cfg, rank
        self.prompts, self.scorers = [], None
        if rank == 0:
            from jobs.evaluate import Scorers
            from jobs.generate import read_prompts
            from jobs.metrics.world import random_prompts

            e = cfg.eval
            self.prompts = ([r["prompt"] for r in read_prompts(e.prompts)][: e.count] if e.prompts
                            else random_prompts(e.count, seed=1))
            self.scorers = Scorers(e.metrics)

    def __call__(self, net, encoder, step: int, grid_path: str) -> dict[str, float]:
        import torch.distributed as dist

        summary = [None]
        if self.rank == 0:
            from jobs.inference import resolve_sampler, sample_images, save_grid

            e = self.cfg.eval
            sampler = resolve_sampler(e.sampler, {"denoiser": config_lib.to_dict(self.cfg.denoiser)})
            images = sample_images(net, encoder, sampler, self.prompts)
            _, scores = self.scorers.score([{"prompt": p, "metadata": {}, "image": im} for p, im in zip(self.prompts, images)],
                                           e.metrics.patch_size or net.config.patch_size)
            save_grid(images[: e.grid_images], grid_path, captions=self.prompts[: e.grid_images])
            summary = [{k: v for k, v in scores.items() if k != "images"}]
        dist.broadcast_object_list(summary, src=0)
        return summary[0]


def ema_network(ema, which: str | None, model_cfg, device, rank: int):
    """(eval-mode MM-JiT with the consolidated EMA weights `which`, its decay) on rank 0, (None,
    None) elsewhere; `which` is "ema_<decay>" or None for the highest decay. Consolidating is a
    collective: every rank calls this."""
    from model.mmjit import MMJiT

    emas = ema.full()
    if rank != 0:
        return None, None
    try:
        decay = max(emas) if which is None else float(which.removeprefix("ema_"))
    except ValueError:
        decay = None
    if decay not in emas:
        raise ValueError(f"eval.weights {which!r}: this run keeps the EMA decays {sorted(emas)} (ema_<decay>)")
    net = MMJiT(model_cfg)
    net.load_state_dict(emas[decay])
    return net.to(device).eval(), decay


def train_loop(loop_config: dict) -> None:
    import ray
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from jobs.train.data import iter_batches, order_settings, with_partitions
    from jobs.train.step import ShardedEMA, TrainStep, build_engine, full_state, load_moments
    from jobs.train.tracking import Logger, peak_flops
    from model.mmjit import forward_flops
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

    start_step, resumed, weights = start_state(cfg, index, world, rank, loop_config["own_checkpoint"], model_cfg)
    data_cfg = with_partitions(cfg.data, world)
    lora_base = None
    if cfg.lora.enabled:
        lora_base = (resumed["state"].get("lora_base") if resumed is not None
                     else {"path": cfg.checkpoint.init_from, "weights": cfg.checkpoint.init_weights})
        if lora_base is None:
            raise ValueError("lora.enabled, but the checkpoint to resume holds full weights, not LoRA adapters; "
                             "start a new run with checkpoint.init_from=<that checkpoint>")
    engine, precision = build_engine(model_cfg, cfg.optim, b, device, weights, init_seed=cfg.data.seed, lora=cfg.lora,
                                     adapters=resumed["weights"] if resumed is not None and lora_base else None)
    if resumed is not None:
        load_moments(engine, resumed["moments"], start_step)
    ema = ShardedEMA(engine, cfg.ema.decays, init=resumed["ema"] if resumed else None)
    step_fn = TrainStep(engine, precision, cfg.denoiser, cfg.optim, ema, cfg.data.seed)
    del resumed, weights

    log_dir = cfg.logging.dir
    logger = Logger(cfg, log_dir, loop_config["run_id"], start_step) if rank == 0 else None
    evaluation = Evaluation(cfg, rank) if cfg.eval.every else None
    train_flops = 3 * forward_flops(model_cfg)["total"]            # forward + backward per image
    peak = peak_flops(device)
    skipped = torch.zeros((), dtype=torch.float64)
    t_last, step_last = time.perf_counter(), start_step
    keys_file = open(os.path.join(trace, f"keys-rank{rank}.jsonl"), "a") if trace else None

    def save(step: int, metrics: dict, eval_grid: str | None) -> None:
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
            if lora_base:
                state["lora_base"] = lora_base
            write_checkpoint(tmp, weights_, moments_, {str(d): sd for d, sd in emas_.items()}, state, model_cfg,
                             cfg.text_encoder, cfg.denoiser, cfg.lora)
            if eval_grid:                                          # the scores' images travel with the weights
                shutil.copyfile(eval_grid, os.path.join(tmp, "eval_grid.png"))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    total = cfg.optim.steps
    for step, batch in iter_batches(index, data_cfg, model_cfg.image_size, start_step, total, rank, world):
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
        is_eval = bool(cfg.eval.every) and (done % cfg.eval.every == 0 or last)
        metrics = {}
        if is_log or is_ckpt or is_eval:
            stats = torch.stack([out["loss"].double().cpu(), skipped]).to(device)
            dist.all_reduce(stats)
            now = time.perf_counter()
            img_s = (done - step_last) * G / (now - t_last)
            metrics = {"step": done, "loss": stats[0].item() / world, "lr": out["lr"], "grad_norm": step_fn.grad_norm(),
                       "img_per_s": img_s, "skipped": stats[1].item()}
            if peak:
                metrics["mfu"] = train_flops * img_s / (peak * world)
            t_last, step_last = now, done
        is_grid = bool(cfg.logging.sample_every) and (done % cfg.logging.sample_every == 0 or last)
        if is_grid or is_eval:                                     # both sample the EMA named by eval.weights
            if grid_encoder is None and rank == 0:
                grid_encoder = FrozenT5(cfg.text_encoder, device)
            net, decay = ema_network(ema, cfg.eval.weights, model_cfg, device, rank)
        eval_grid = None
        if is_eval:
            eval_grid = os.path.join(log_dir, f"eval-{done:07d}.png")
            metrics.update(evaluation(net, grid_encoder, done, eval_grid))
        if is_grid:
            sample_grid(cfg, net, decay, grid_encoder, done, rank, log_dir)
        if logger and (is_log or is_eval):
            logger.log(metrics, done, total)
        if is_ckpt:
            save(done, metrics, eval_grid if rank == 0 else None)
        elif is_log or is_eval:
            ray.train.report(metrics)
        if last:
            break
    if keys_file:
        keys_file.close()
    if logger:
        logger.close()


def sample_grid(cfg: TrainConfig, net, decay, encoder, step: int, rank: int, log_dir: str) -> None:
    """A PNG grid of logging.sample_prompts from the EMA network (rank 0 writes it)."""
    from jobs.inference import resolve_sampler, sample_images, save_grid
    from model.denoiser import SamplerConfig

    if rank != 0:
        return
    prompts = cfg.logging.sample_prompts
    sampler = resolve_sampler(SamplerConfig(sampler="euler", steps=cfg.logging.sample_steps),
                              {"denoiser": config_lib.to_dict(cfg.denoiser)})
    images = sample_images(net, encoder, sampler, prompts)
    path = save_grid(images, os.path.join(log_dir, f"samples-{step:07d}.png"), captions=prompts)
    print(f"[train] step {step}: sample grid {path} (ema {decay})", flush=True)
