"""`minit2i tune sampling|schedule`: Ray Tune over the sampling knobs or the training noise schedule.

JiT-style results only reproduce after sweeping CFG and EMA, and MiniT2I picks its CFG per benchmark
(2.0 for FID, 6.0 for GenEval); this job makes the sweep reproducible.

sampling  a fixed checkpoint; searches cfg_scale, cfg_interval, sampler, steps, time_shift,
          noise_scale and the weights file (EMA or raw). A trial scores growing prompt subsets and
          reports after each, so ASHA stops poor settings after the first, cheapest subset.
schedule  short training trials over the logit-normal t (t_mu, t_sigma) and noise_scale; a trial
          reports every `report_every` steps (ASHA over training steps), scored by the same metrics.

The objective is any summary key of `jobs.evaluate.Scorers.score` (default world/overall), with an
optional constraint on the patch-boundary artifact ratio. A run resumes with `Tuner.restore` when
its experiment folder exists; trials that raise are retried (FailureConfig) and then recorded as
errored without stopping the run. Reports: results.csv (+ a printed table), plot.png,
best_config.yaml and best/worst sample grids.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from pipelines import config as config_lib
from jobs.evaluate import MetricsConfig, Scorers
from model.denoiser import DenoiserConfig, SamplerConfig
from pipelines import storage

INFEASIBLE = -1e6   # objective of a trial that breaks the artifact constraint in "infeasible" mode


@dataclass
class ObjectiveConfig:
    metric: str = "world/overall"       # a summary key of jobs.evaluate (world/overall, clip_score, fid, ...)
    mode: str = "max"                   # "max" or "min" (e.g. fid); Tune always maximises `objective`
    artifact_max: float | None = None   # constraint: artifact_ratio must stay at or below this
    artifact_mode: str = "penalize"     # "penalize": minus weight * excess; "infeasible": rank below all feasible
    artifact_weight: float = 1.0

    def __post_init__(self):
        if self.mode not in ("max", "min"):
            raise ValueError(f"objective.mode must be max or min, got {self.mode!r}")
        if self.artifact_mode not in ("penalize", "infeasible"):
            raise ValueError(f"objective.artifact_mode must be penalize or infeasible, got {self.artifact_mode!r}")


@dataclass
class RunConfig:
    out: str = "outputs/tune"           # reports here; Tune's experiment under <out>/ray/<name>
    name: str = "tune"                  # experiment name (reusing it resumes the run)
    num_samples: int = 8                # samples of the search space (x the grid, if any)
    max_concurrent: int = 0             # 0 = as many as resources allow
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
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


def search_space(space: dict[str, Any]) -> dict[str, Any]:
    """YAML search space -> Tune's. Each key is a constant or a one-key mapping:
    {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}, {choice: [...]}, {grid: [...]}."""
    from ray import tune

    kinds = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
             "choice": tune.choice, "grid": tune.grid_search}
    out = {}
    for key, spec in space.items():
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in kinds:
                raise ValueError(f"search space {key}: use one of {', '.join(kinds)} (e.g. {{uniform: [1, 8]}}), got {spec!r}")
            kind, args = next(iter(spec.items()))
            out[key] = kinds[kind](*args) if kind in ("uniform", "loguniform", "randint") else kinds[kind](list(args))
        else:
            out[key] = spec
    return out


def _save_grid(images: np.ndarray, captions: list[str], path: Path) -> None:
    from jobs.sample import save_grid

    save_grid(images, path, captions)


def _report(metrics: dict, files: dict[str, Callable[[Path], None]]) -> None:
    """tune.report with a checkpoint folder filled by `files` (name -> writer)."""
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        for name, write in files.items():
            write(Path(tmp) / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


# ---------------------------------------------------------------------------------------------
# tune sampling


def default_sampling_space() -> dict[str, Any]:
    return {
        "cfg_scale": {"loguniform": [1.0, 8.0]},
        "cfg_interval": {"choice": [None, [0.1, 1.0], [0.0, 0.75]]},
        "sampler": {"choice": ["euler", "heun"]},
        "steps": {"choice": [16, 32, 64]},
        "time_shift": {"uniform": [1.0, 4.0]},
        "noise_scale": None,            # None: the checkpoint's training value
        "weights": None,                # None: the best EMA in the checkpoint; e.g. {choice: [ema_0.9999, model]}
    }


@dataclass
class SamplingTuneConfig:
    checkpoint: str = ""                                     # weights folder, checkpoint or run folder (its newest)
    text_encoder: str | None = None                          # override the checkpoint's text encoder
    prompts: str | None = None                               # prompt file; None = `subsets[-1]` world prompts
    subsets: list[int] = field(default_factory=lambda: [8, 16, 32])   # growing prompt counts = ASHA rungs
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 16
    space: dict[str, Any] = field(default_factory=default_sampling_space)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunConfig = field(default_factory=RunConfig)


def sampler_from(config: dict, meta: dict) -> SamplerConfig:
    interval = config.get("cfg_interval")
    noise = config.get("noise_scale")
    return SamplerConfig(
        sampler=config.get("sampler", "heun"), steps=int(config.get("steps", 32)),
        cfg_scale=float(config.get("cfg_scale", 2.0)), cfg_interval=tuple(interval) if interval else None,
        time_shift=float(config.get("time_shift", 1.0)),
        noise_scale=float(noise if noise is not None else meta.get("denoiser", {}).get("noise_scale", 2.0)),
    )


def sampling_trial(config: dict, setup: dict) -> None:
    """One Tune trial: sample and score growing prompt subsets, report after each (ASHA rungs)."""
    import torch
    from ray import tune

    from jobs.generate import sample_images
    from jobs.sample import load_model

    cfg = config_lib.from_dict(SamplingTuneConfig, setup["cfg"])
    prompts: list[str] = setup["prompts"]
    device = torch.device("cuda" if cfg.run.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")
    net, encoder, meta = load_model(cfg.checkpoint, config.get("weights"), "debug", cfg.text_encoder, device)
    sampler = sampler_from(config, meta)
    scorers = Scorers(cfg.metrics)
    patch = cfg.metrics.patch_size or net.config.patch_size

    images, rows, done = [], [], 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:            # a retried or restored trial continues after its last subset
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / "state.json").read_text())
            rows = state["rows"]
            images = list(np.load(Path(d) / "images.npy"))
            done = state["done"]
    for n in cfg.subsets:
        if n <= done:
            continue
        new = [(i, s) for i in range(done, n) for s in cfg.seeds]
        imgs = sample_images(net, encoder, sampler, [prompts[i] for i, _ in new], [i for i, _ in new],
                             [s for _, s in new], cfg.batch_size)
        images += list(imgs)
        rows += [{"index": i, "seed": s, "prompt": prompts[i], "metadata": {}} for i, s in new]
        done = n
        _, summary = scorers.score([{**r, "image": im} for r, im in zip(rows, images)], patch)
        objective, feasible = objective_of(summary, cfg.objective)
        stack = np.stack(images)
        k = cfg.run.grid_images
        _report(
            {"objective": objective, "feasible": feasible, "prompts": n, **summary},
            {"state.json": lambda p: p.write_text(json.dumps({"rows": rows, "done": done})),
             "images.npy": lambda p: np.save(p, stack),
             "grid.png": lambda p: _save_grid(stack[:k], [r["prompt"] for r in rows[:k]], p)},
        )


# ---------------------------------------------------------------------------------------------
# tune schedule


def default_schedule_space() -> dict[str, Any]:
    return {
        "t_mu": {"uniform": [-1.6, 0.4]},
        "t_sigma": {"uniform": [0.4, 1.6]},
        "noise_scale": {"choice": [1.0, 2.0]},
    }


@dataclass
class ScheduleTuneConfig:
    data: str = ""                          # Parquet dataset folder with `image` bytes + a caption column
    caption_column: str = "caption"
    max_images: int = 512                   # images held in memory for the short trials
    preset: str = "debug"
    model: dict[str, Any] = field(default_factory=dict)   # preset overrides, e.g. {depth: 1}
    text_encoder: str = "tiny-t5"
    prompt_length: int = 32
    steps: int = 400                        # training steps of a full trial
    report_every: int = 100                 # steps between evaluations (= ASHA rungs)
    batch_size: int = 16
    lr: float = 4e-4
    ema: float = 0.999
    eval_prompts: str | None = None         # prompt file; None = `eval_count` world prompts
    eval_count: int = 16
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(sampler="euler", steps=25, cfg_scale=2.0))
    space: dict[str, Any] = field(default_factory=default_schedule_space)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class TrialData:
    """What every schedule trial trains on, put in Ray's object store once (tune.with_parameters)."""
    images: np.ndarray                      # uint8 [N, S, S, 3], centre-cropped and resized
    captions: list[str]
    eval_prompts: list[str]


def load_trial_data(cfg: ScheduleTuneConfig, image_size: int) -> TrialData:
    import pyarrow.parquet as pq
    from PIL import Image

    from jobs.generate import read_prompts
    from jobs.metrics.world import random_prompts

    shards = storage.list_files(cfg.data, ".parquet")
    if not shards:
        raise FileNotFoundError(f"training data {cfg.data!r} holds no Parquet shards")
    images, captions = [], []
    for uri in shards:
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs)
        if "image" not in table.column_names or cfg.caption_column not in table.column_names:
            raise ValueError(f"{uri} lacks `image` or `{cfg.caption_column}` (columns: {', '.join(table.column_names)})")
        for data, cap in zip(table.column("image").to_pylist(), table.column(cfg.caption_column).to_pylist()):
            if data is None or cap is None:
                continue          # failed downloads: no image to train on
            im = Image.open(io.BytesIO(data)).convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BICUBIC)
            images.append(np.asarray(im))
            captions.append(str(cap))
            if len(images) >= cfg.max_images:
                break
        if len(images) >= cfg.max_images:
            break
    if not images:
        raise ValueError(f"training data {cfg.data} holds no usable images")
    prompts = ([r["prompt"] for r in read_prompts(cfg.eval_prompts)][: cfg.eval_count] if cfg.eval_prompts
               else random_prompts(cfg.eval_count, seed=1))
    return TrialData(np.stack(images), captions, prompts)


def train_trial(config: dict, data: TrialData, cfg: ScheduleTuneConfig, out_dir: str | Path,
                on_eval: Callable[[int, Path, dict], None] | None = None, resume: Path | None = None) -> Path:
    """Short training run of the schedule in `config` (t_mu, t_sigma, noise_scale) with the train
    job's own step (jobs/train_step.py: DeepSpeed ZeRO-1 in one process, AdamW beta2 0.95, grad
    clipping, per-sample noise draws, sharded EMA), on images held in memory.

    Every `report_every` steps the EMA weights are saved to `out_dir` (a loadable weights folder),
    the eval prompts are sampled and scored, and on_eval(step, out_dir, summary) is called (Tune
    reports there). `resume` is a folder from an earlier call to continue from. Returns `out_dir`.
    """
    import torch

    from jobs.generate import sample_images
    from jobs.train_step import OptimConfig, ShardedEMA, TrainStep, build_engine, full_state, load_moments
    from model.checkpoint import save_weights
    from model.mmjit import MMJiT, preset
    from model.text_encoder import FrozenT5, TextEncoderConfig

    den = DenoiserConfig(t_mu=float(config.get("t_mu", -0.8)), t_sigma=float(config.get("t_sigma", 0.8)),
                         noise_scale=float(config.get("noise_scale", 2.0)))
    if den.t_sigma <= 0 or den.noise_scale <= 0:
        raise ValueError(f"t_sigma and noise_scale must be > 0, got {den.t_sigma}, {den.noise_scale}")
    out_dir = Path(out_dir)
    device = torch.device("cuda" if cfg.run.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")   # read when DeepSpeed first picks its accelerator
    enc_cfg = TextEncoderConfig(cfg.text_encoder, cfg.prompt_length)
    encoder = FrozenT5(enc_cfg, device)
    model_cfg = preset(cfg.preset, **{**cfg.model, "text_dim": encoder.dim, "text_length": cfg.prompt_length})
    optim = OptimConfig(lr=cfg.lr, warmup_steps=0, steps=cfg.steps, zero_stage=1)
    step, weights, state = 0, None, None
    if resume is not None and (resume / "train_state.pt").is_file():
        state = torch.load(resume / "train_state.pt", map_location="cpu")
        step, weights = state["step"], state["weights"]
    torch.manual_seed(cfg.run.seed)
    engine, precision = build_engine(model_cfg, optim, cfg.batch_size, device, weights)
    if state is not None:
        load_moments(engine, state["moments"], step)
    ema = ShardedEMA(engine, [cfg.ema], init=None if state is None else {cfg.ema: state["ema"]})
    train_step = TrainStep(engine, precision, den, optim, ema, seed=cfg.run.seed)
    ema_net = MMJiT(model_cfg).to(device).eval().requires_grad_(False)

    x_all = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().div(127.5).sub(1)    # [N, 3, S, S] in [-1, 1]
    with torch.no_grad():
        text_all, mask_all = encoder(data.captions)                                       # [N, L, C], [N, L]
    gen = torch.Generator(device="cpu").manual_seed(cfg.run.seed + step)
    scorers = Scorers(cfg.metrics)
    sampler = dataclasses.replace(cfg.sampler, noise_scale=den.noise_scale)
    B = cfg.batch_size
    while step < cfg.steps:
        engine.train()
        idx = torch.randint(0, len(x_all), (B,), generator=gen)
        # Noise is drawn per position in the run (step * batch + i), as in the train job.
        out = train_step(step, x_all[idx], text_all[idx], mask_all[idx], list(range(step * B, (step + 1) * B)))
        loss = float(out["loss"])
        step += 1
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {step} (schedule {config})")
        if step % cfg.report_every == 0 or step == cfg.steps:
            ema_state = ema.full()[cfg.ema]
            weights, moments = full_state(engine)
            save_weights(out_dir, ema_state, model_cfg, enc_cfg, den, name=f"ema_{cfg.ema}")
            torch.save({"weights": weights, "moments": moments, "ema": ema_state, "step": step}, out_dir / "train_state.pt")
            ema_net.load_state_dict(ema_state)
            n = len(data.eval_prompts)
            images = sample_images(ema_net, encoder, sampler, data.eval_prompts, list(range(n)), [0] * n)
            _, summary = scorers.score([{"prompt": p, "metadata": {}, "image": im} for p, im in zip(data.eval_prompts, images)],
                                       cfg.metrics.patch_size or model_cfg.patch_size)
            summary["loss"] = loss
            _save_grid(images[: cfg.run.grid_images], data.eval_prompts[: cfg.run.grid_images], out_dir / "grid.png")
            if on_eval is not None:
                on_eval(step, out_dir, summary)
    return out_dir


def schedule_trial(config: dict, setup: dict, data: TrialData) -> None:
    """One Tune trial: train_trial reporting each evaluation (ASHA over training steps)."""
    import shutil

    from ray import tune

    cfg = config_lib.from_dict(ScheduleTuneConfig, setup["cfg"])
    work = Path(tempfile.mkdtemp(prefix="schedule-trial-"))
    ckpt = tune.get_checkpoint()

    def on_eval(step: int, out_dir: Path, summary: dict) -> None:
        objective, feasible = objective_of(summary, cfg.objective)
        tune.report({"objective": objective, "feasible": feasible, "step": step, **summary},
                    checkpoint=tune.Checkpoint.from_directory(str(out_dir)))

    try:
        if ckpt is not None:
            with ckpt.as_directory() as d:
                shutil.copytree(d, work, dirs_exist_ok=True)
        train_trial(config, data, cfg, work, on_eval, resume=work if ckpt is not None else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Running and reporting


def run_tune(kind: str, cfg: SamplingTuneConfig | ScheduleTuneConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep, write the reports; returns {"best": config, "table": rows, "interrupted": bool}."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from jobs.generate import ensure_ray, read_prompts
    from jobs.metrics.world import random_prompts

    run = cfg.run
    if kind == "sampling":
        if not cfg.checkpoint:
            raise ValueError("tune sampling needs checkpoint=<weights folder>")
        from jobs.train import weights_folder

        cfg.checkpoint = weights_folder(cfg.checkpoint)   # a clear error here, not inside every trial; one folder for all
        n = max(cfg.subsets)
        prompts = [r["prompt"] for r in read_prompts(cfg.prompts)] if cfg.prompts else random_prompts(n, seed=0)
        if len(prompts) < n:
            raise ValueError(f"subsets go up to {n} prompts but {cfg.prompts} has {len(prompts)}")
        trainable = tune.with_parameters(sampling_trial, setup={"cfg": config_lib.to_dict(cfg), "prompts": prompts[:n]})
        max_t = len(cfg.subsets)
    elif kind == "schedule":
        from model.mmjit import preset

        data = load_trial_data(cfg, preset(cfg.preset, **cfg.model).image_size)
        trainable = tune.with_parameters(schedule_trial, setup={"cfg": config_lib.to_dict(cfg)}, data=data)
        max_t = math.ceil(cfg.steps / cfg.report_every)
    else:
        raise ValueError(f"unknown tune kind {kind!r}: sampling or schedule")
    search_space(cfg.space)                           # validate before starting anything
    trainable = tune.with_resources(trainable, {"cpu": run.cpus_per_trial, "gpu": run.gpus_per_trial})
    ensure_ray()

    fs = storage.s3_filesystem() if storage.is_s3(run.out) else None
    ray_root = storage.join(run.out, "ray") if storage.is_s3(run.out) else os.path.abspath(storage.join(run.out, "ray"))
    exp_path = storage.join(ray_root, run.name)
    interrupted_before = False
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        print(f"tune: resuming {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=fs)
        interrupted_before = True
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg.space),
            tune_config=tune.TuneConfig(
                metric="objective", mode="max", num_samples=run.num_samples,
                max_concurrent_trials=run.max_concurrent or None, reuse_actors=True,
                search_alg=BasicVariantGenerator(random_state=run.seed),
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=1,
                                        reduction_factor=run.reduction_factor),
            ),
            run_config=tune.RunConfig(
                name=run.name, storage_path=ray_root, storage_filesystem=fs, verbose=0, callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=run.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
    results = tuner.fit()
    # Statuses as saved in the experiment state: after Ctrl+C Tune stops the live trials (marking
    # them terminated in memory) but saves them as running, which is what a restore resumes.
    saved = tune.ExperimentAnalysis(results.experiment_path, storage_filesystem=fs)
    rows = result_rows(results, list(cfg.space), {t.trial_id: t.status for t in saved.trials})
    interrupted = any(r["status"] not in ("TERMINATED", "ERROR") for r in rows)
    best = write_reports(kind, cfg, results, rows)
    if interrupted:
        print(f"tune: interrupted; rerun the same command (out={run.out}, name={run.name}) to resume")
    return {"best": best, "table": rows, "interrupted": interrupted, "resumed": interrupted_before}


def result_rows(results, params: list[str], saved_status: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per trial: id, Tune status, error, searched parameters, last reported metrics."""
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
        row.update({p: json.dumps(cfg.get(p)) if isinstance(cfg.get(p), (list, tuple)) else cfg.get(p) for p in params})
        for k, v in m.items():
            if isinstance(v, (int, float, bool)) and k not in row and k not in skip and not k.startswith("time_"):
                row[k] = v
        row["_checkpoint"] = r.checkpoint.path if r.checkpoint else None
        row["_checkpoint_fs"] = r.checkpoint.filesystem if r.checkpoint else None
        row["_config"] = cfg
        rows.append(row)
    return rows


def _write_text(uri: str, text: str) -> None:
    storage.write_bytes(uri, text.encode())


def write_reports(kind: str, cfg, results, rows: list[dict]) -> dict | None:
    """results.csv + printed table, plot.png, best_config.yaml, best_grid.png / worst_grid.png."""
    import pandas as pd

    out = cfg.run.out
    params = list(cfg.space)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    df = pd.DataFrame(public)
    if "objective" in df:
        df = df.sort_values("objective", ascending=False, na_position="last")
    _write_text(storage.join(out, "results.csv"), df.to_csv(index=False))
    print_table(df, params, cfg.objective.metric, f"tune {kind}: {len(df)} trials")
    _write_plot(kind, df, storage.join(out, "plot.png"))

    done = [r for r in rows if r["status"] == "TERMINATED" and r.get("objective") is not None and r["_checkpoint"]]
    if not done:
        return None
    done.sort(key=lambda r: r["objective"], reverse=True)
    best, worst = done[0], done[-1]
    for tag, row in (("best", best), ("worst", worst)):
        grid = storage.join(row["_checkpoint"], "grid.png")
        fs = row["_checkpoint_fs"]
        with fs.open_input_stream(grid) as f:
            storage.write_bytes(storage.join(out, f"{tag}_grid.png"), f.read())
    best_cfg = best_config(kind, cfg, best)
    header = (f"# best of {len(done)} finished trials: {best['trial_id']}, objective {best['objective']:.4f} "
              f"({cfg.objective.metric}{', artifact ratio %.3f' % best['artifact_ratio'] if 'artifact_ratio' in best else ''})\n")
    if kind == "sampling":
        s = best_cfg["sampler"]
        flags = (f"--checkpoint {best_cfg['checkpoint']} --sampler {s['sampler']} --steps {s['steps']} --cfg {s['cfg_scale']} "
                 f"--time-shift {s['time_shift']} --noise-scale {best_cfg['noise_scale']}"
                 + (f" --weights {best_cfg['weights']}" if best_cfg.get("weights") else "")
                 + (f" --cfg-interval {s['cfg_interval'][0]} {s['cfg_interval'][1]}" if s.get("cfg_interval") else ""))
        header += f"# minit2i generate --config best_config.yaml prompts=... out=...\n# minit2i sample {flags}\n"
    else:
        header += ("# the denoiser section of a train config: minit2i train --config <run>.yaml "
                   + " ".join(f"denoiser.{k}={v}" for k, v in best_cfg["denoiser"].items()) + "\n"
                   + f"# trained weights of this trial: {best['_checkpoint']}\n")
    _write_text(storage.join(out, "best_config.yaml"), header + yaml.safe_dump(best_cfg, sort_keys=False))
    return best_cfg


def best_config(kind: str, cfg, row: dict) -> dict:
    conf = row["_config"]
    if kind == "sampling":
        from model.checkpoint import read_meta

        sampler = sampler_from(conf, read_meta(cfg.checkpoint))
        d = {"checkpoint": cfg.checkpoint, "weights": conf.get("weights"), "text_encoder": cfg.text_encoder,
             "sampler": config_lib.to_dict(sampler), "noise_scale": sampler.noise_scale}
        return d
    den = DenoiserConfig(t_mu=float(conf.get("t_mu", -0.8)), t_sigma=float(conf.get("t_sigma", 0.8)),
                         noise_scale=float(conf.get("noise_scale", 2.0)))
    return {"denoiser": {"t_mu": den.t_mu, "t_sigma": den.t_sigma, "noise_scale": den.noise_scale}}


def print_table(df, params: list[str], metric: str, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ["trial_id", "status", *params, "objective", metric, "artifact_ratio", "training_iteration", "error"]
    cols = [c for c in dict.fromkeys(cols) if c in df]
    table = Table(title=title)
    for c in cols:
        table.add_column(c, overflow="fold")
    for _, r in df.iterrows():
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r[c] for c in cols)])
    Console(width=160).print(table)


def _write_plot(kind: str, df, uri: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = ["cfg_scale"] if kind == "sampling" else ["t_mu", "t_sigma"]
    xs = [x for x in xs if x in df and df[x].notna().any()] or [c for c in ("prompts", "step") if c in df][:1]
    fig, axes = plt.subplots(1, max(1, len(xs)), figsize=(5 * max(1, len(xs)), 4), squeeze=False)
    ok = df[df["status"] != "ERROR"] if "objective" in df else df.iloc[0:0]
    for ax, x in zip(axes[0], xs):
        if "objective" in ok and len(ok):
            groups = ok.groupby("sampler") if kind == "sampling" and "sampler" in ok else [("trials", ok)]
            for name, g in groups:
                ax.scatter(pd_numeric(g[x]), pd_numeric(g["objective"]), label=str(name))
            ax.legend()
        ax.set_xlabel(x)
        ax.set_ylabel("objective")
        ax.set_xscale("log" if x == "cfg_scale" else "linear")
        ax.grid(alpha=0.3)
    fig.suptitle(f"tune {kind}: objective")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def pd_numeric(series):
    import pandas as pd

    return pd.to_numeric(series, errors="coerce")


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["sampling", "schedule"], help="what to search")
    p.add_argument("--config", help="YAML with SamplingTuneConfig / ScheduleTuneConfig fields")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. checkpoint=ckpt run.num_samples=16 "
                                                "objective.artifact_max=1.2 'space.cfg_scale={uniform: [1, 8]}'")


def run(args: argparse.Namespace) -> int:
    cls = SamplingTuneConfig if args.kind == "sampling" else ScheduleTuneConfig
    cfg = config_lib.load(cls, args.config, args.overrides)
    out = run_tune(args.kind, cfg)
    print(f"wrote {cfg.run.out}/results.csv, plot.png" + (", best_config.yaml, best_grid.png, worst_grid.png" if out["best"] else
                                                        " (no trial finished: no best config)"))
    return 0
