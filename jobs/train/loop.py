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

import numpy as np
import torch

from jobs.train.checkpoints import check_resume, read_checkpoint, write_checkpoint
from jobs.train.config import TrainConfig
from jobs.train.data import DataConfig
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
    from jobs.inference import network

    emas = ema.full()
    if rank != 0:
        return None, None
    try:
        decay = max(emas) if which is None else float(which.removeprefix("ema_"))
    except ValueError:
        decay = None
    if decay not in emas:
        raise ValueError(f"eval.weights {which!r}: this run keeps the EMA decays {sorted(emas)} (ema_<decay>)")
    return network(model_cfg, emas[decay], device), decay


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
    resumed_feedback = resumed.get("feedback") if resumed else None
    del resumed, weights

    log_dir = cfg.logging.dir
    logger = Logger(cfg, log_dir, loop_config["run_id"], start_step) if rank == 0 else None
    evaluation = Evaluation(cfg, rank) if cfg.eval.every else None
    train_flops = 3 * forward_flops(model_cfg)["total"]            # forward + backward per image
    peak = peak_flops(device)
    skipped = torch.zeros((), dtype=torch.float64)
    t_last, step_last = time.perf_counter(), start_step
    keys_file = open(os.path.join(trace, f"keys-rank{rank}.jsonl"), "a") if trace else None
    step_hist = start_step

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
            if data_cfg.feedback.active:
                state["feedback"] = critic.record(index, data_cfg, step)
            write_checkpoint(tmp, weights_, moments_, {str(d): sd for d, sd in emas_.items()}, state, model_cfg,
                             cfg.text_encoder, cfg.denoiser, cfg.lora)
            critic.save(tmp)
            if eval_grid:                                          # the scores' images travel with the weights
                shutil.copyfile(eval_grid, os.path.join(tmp, "eval_grid.png"))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    total = cfg.optim.steps
    critic = CriticState.restore(resumed_feedback, data_cfg)

    def batches():
        """The run's batches, cut at each critic version: a segment's order uses the scores then in effect."""
        at = start_step
        while at < total:
            end = critic.segment_end(at, total)
            yield from iter_batches(index, data_cfg, model_cfg.image_size, at, end, rank, world, scores=critic.scores)
            at = end

    for step, batch in batches():
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
        if critic.due(done):                                  # before the checkpoint, which saves it
            metrics.update(critic.update(index, data_cfg, done, ema, model_cfg, cfg, rank))
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
            if is_log and index.attrs is not None:
                logger.histograms(attribute_histograms(index, data_cfg, step_hist, done, critic.scores), done)
                step_hist = done
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


class CriticState:
    """The critic in effect (version, scores) on every rank; its weights on rank 0 for checkpoints."""

    def __init__(self, cfg: DataConfig, result=None, scores=None, summary: dict | None = None):
        self.cfg, self.result = cfg.feedback.critic, result
        self.scores = scores
        self.summary = summary or {}

    @classmethod
    def restore(cls, resumed: dict | None, cfg: DataConfig) -> "CriticState":
        """From a checkpoint's saved critic (scores and their version), or none yet."""
        if not resumed or resumed.get("scores") is None:
            return cls(cfg)
        return cls(cfg, scores=resumed["scores"], summary=resumed["state"], result=resumed.get("weights"))

    def segment_end(self, at: int, total: int) -> int:
        if not self.cfg.enabled:
            return total
        return min(total, (at // self.cfg.every + 1) * self.cfg.every)

    def due(self, done: int) -> bool:
        """At every multiple of `every`, the last step too: a run continued past it must find the
        critic a longer run would have had there."""
        return self.cfg.enabled and done % self.cfg.every == 0

    def update(self, index, data_cfg: DataConfig, done: int, ema, model_cfg, cfg: TrainConfig, rank: int) -> dict:
        """Run the critic job on the EMA weights (rank 0) and share its scores with every rank."""
        import torch.distributed as dist

        from jobs.train.critic import run_critic

        emas = ema.full()                                          # a collective: every rank takes part
        shared = [None]
        if rank == 0:
            t0 = time.perf_counter()
            res = run_critic(index, data_cfg, done // self.cfg.every, done, model_cfg, emas[max(emas)],
                             cfg.text_encoder, cfg.denoiser, data_cfg.seed)
            self.result = res.weights
            shared = [(res.scores, {**res.summary(), "critic_seconds": time.perf_counter() - t0})]
            print(f"[train] step {done}: critic v{res.version}: {res.labelled} captions checked, model right on "
                  f"{100 * res.success:.1f}%, critic loss {res.loss:.3f}", flush=True)
        dist.broadcast_object_list(shared, src=0)
        self.scores, self.summary = shared[0]
        return {k: float(v) for k, v in self.summary.items()}

    def record(self, index, data_cfg: DataConfig, step: int) -> dict:
        """What the order decided, for train_state.json: the critic version and its scores' hash,
        and the drops, skips and repeats of the epoch the checkpoint is in."""
        from jobs.train.data import feedback_epoch, steps_per_epoch
        from jobs.train.feedback import scores_digest

        epoch = step // steps_per_epoch(index, data_cfg.batch_size)
        _, decided = feedback_epoch(index, data_cfg, epoch, self.scores)
        return {"critic_version": int(self.summary.get("critic_version", 0)), "critic_step": self.summary.get("critic_step"),
                "scores_sha256": scores_digest(self.scores), "critic": self.summary,
                "epoch": epoch, "decided": decided.__dict__}

    def save(self, folder: str) -> None:
        if self.scores is None:
            return
        from jobs.train.checkpoints import save_critic

        save_critic(folder, self.scores, self.result)


def attribute_histograms(index, data_cfg: DataConfig, first: int, last: int, scores) -> dict[str, np.ndarray]:
    """Per attribute category: the value ids (vocabulary order) of every row the steps [first, last) used."""
    from jobs.train.data import worker_rows
    from jobs.train.feedback import CATEGORIES

    attrs = index.attrs
    rows = worker_rows(index, data_cfg, first, last, 0, 1, scores)
    cat_of = attrs.category_of()
    vals = np.concatenate([attrs.values[attrs.offsets[r]:attrs.offsets[r + 1]] for r in rows] or [np.zeros(0, np.int32)])
    out = {}
    for k, c in enumerate(CATEGORIES):
        if (cat_of == k).any():
            local = np.cumsum(cat_of == k) - 1                     # value id -> its rank within the category
            out[f"data/attr_{c}"] = local[vals[cat_of[vals] == k]]
    return out


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
