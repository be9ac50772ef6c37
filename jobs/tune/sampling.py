"""`minit2i tune sampling [key=value ...]`: Ray Tune over the sampling knobs of one checkpoint.

JiT-style results only reproduce after sweeping CFG and EMA together, and MiniT2I picks its CFG
per benchmark (2.0 for FID, 6.0 for GenEval); this sweep makes that search reproducible. It
searches cfg_scale, cfg_interval, sampler, steps, time_shift, noise_scale and, by default, the
weights file (every EMA decay the checkpoint keeps, and the raw weights). A trial scores growing
prompt subsets and reports after each, so ASHA stops poor settings after the first, cheapest one.

    minit2i tune sampling --config jobs/configs/tune_sampling.yaml checkpoint=outputs/runs/debug
    minit2i tune sampling checkpoint=weights/minit2i-b16 preset=geneval "space={cfg_scale: {grid: [4.5, 6, 7.5]}, weights: {grid: all}}"

A key the space does not search comes from `preset` (jobs/configs/samplers.yaml, or the
checkpoint's own published settings), else the checkpoint's default, else TRIAL_DEFAULT.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobs.evaluate import MetricsConfig, Scorers
from jobs.tune.search import ObjectiveConfig, SweepConfig, objective_of, run_sweep, search_space, space_keys
from model.denoiser import SamplerConfig
from pipelines import config as config_lib
from pipelines import storage

ALL_WEIGHTS = "all"     # in `weights`' choice/grid: every weights file of the checkpoint
TRIAL_DEFAULT = SamplerConfig(sampler="heun", steps=32, cfg_scale=2.0)


def default_sampling_space() -> dict[str, Any]:
    return {
        "cfg_scale": {"loguniform": [1.0, 8.0]},
        "cfg_interval": {"choice": [None, [0.1, 1.0], [0.0, 0.75]]},
        "sampler": {"choice": ["euler", "heun"]},
        "steps": {"choice": [16, 32, 64]},
        "time_shift": {"uniform": [1.0, 4.0]},
        "noise_scale": None,                    # None: the checkpoint's training value
        "weights": {"choice": ALL_WEIGHTS},     # every EMA decay and the raw weights; None: the highest-decay EMA
    }


@dataclass
class SamplingTuneConfig:
    checkpoint: str = ""                                     # weights folder, checkpoint or run folder (its newest)
    preset: str | None = None                                # sampler preset for the keys the space does not search
    text_encoder: str | None = None                          # override the checkpoint's text encoder
    prompts: str | None = None                               # prompt file; None = `subsets[-1]` world prompts
    subsets: list[int] = field(default_factory=lambda: [8, 16, 32])   # growing prompt counts = ASHA rungs
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 16
    space: dict[str, Any] = field(default_factory=default_sampling_space)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: SweepConfig = field(default_factory=SweepConfig)


def weight_files(folder: str) -> list[str]:
    """Names of a weights folder's weight files (ema_<decay>, model), local or s3://."""
    from jobs.train.checkpoints import MOMENTS_NAME

    names = [f.rsplit("/", 1)[-1] for f in storage.list_files(folder, ".safetensors")]
    return sorted(n.removesuffix(".safetensors") for n in names if n != MOMENTS_NAME)


def expand_weights(space: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """`weights: {choice|grid: all}` (or `weights: all`) -> the checkpoint's weight files."""
    spec = space.get("weights")
    if spec == ALL_WEIGHTS:
        spec = {"choice": ALL_WEIGHTS}
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec.values())) == ALL_WEIGHTS:
        return {**space, "weights": {next(iter(spec)): names}}
    return space


def sampler_from(config: dict, meta: dict, preset: str | None = None) -> SamplerConfig:
    """A trial's sampler: the searched keys, the rest from the preset or the checkpoint (jobs/inference.py);
    the noise scale is the checkpoint's training value unless searched."""
    from jobs.inference import SamplerSection, sampler_settings

    keys = ("sampler", "steps", "cfg_scale", "cfg_interval", "time_shift", "noise_scale")
    section = config_lib.from_dict(SamplerSection, {"preset": preset, **{k: config[k] for k in keys if k in config}})
    return sampler_settings(section, meta, TRIAL_DEFAULT)


def _report(metrics: dict, files: dict) -> None:
    """tune.report with a checkpoint folder filled by `files` (name -> writer)."""
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        for name, write in files.items():
            write(Path(tmp) / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def sampling_trial(config: dict, setup: dict) -> None:
    """One Tune trial: sample and score growing prompt subsets, report after each (ASHA rungs)."""
    import torch
    from ray import tune

    from jobs.inference import load_model, sample_images, save_grid
    from jobs.tune.reports import GRID_NAME

    cfg = config_lib.from_dict(SamplingTuneConfig, setup["cfg"])
    # A searched value that no sampler takes fails the trial now, not after the weights and the text
    # encoder have loaded (seconds of CPU a try on a small box).
    sampler_from(config, {}, None)
    prompts: list[str] = setup["prompts"]
    device = torch.device("cuda" if cfg.run.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")
    net, encoder, meta = load_model(cfg.checkpoint, config.get("weights"), "debug", cfg.text_encoder, device)
    sampler = sampler_from(config, meta, cfg.preset)
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
             GRID_NAME: lambda p: save_grid(stack[:k], p, [r["prompt"] for r in rows[:k]])},
        )


def run_sampling(cfg: SamplingTuneConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep and write the reports; returns {"best", "table", "interrupted", "resumed"}."""
    from ray import tune

    from jobs.generate import read_prompts
    from jobs.metrics.world import random_prompts
    from jobs.ray_init import init_ray
    from jobs.train.checkpoints import weights_folder
    from jobs.tune.reports import write_reports

    unknown = sorted(set(cfg.space) - set(default_sampling_space()))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in space: the sampling sweep searches {', '.join(default_sampling_space())}")
    if not cfg.checkpoint:
        raise ValueError("tune sampling needs checkpoint=<weights folder, checkpoint or run folder>")
    cfg.checkpoint = weights_folder(cfg.checkpoint)   # a clear error here, not inside every trial; one folder for all
    cfg.space = expand_weights(cfg.space, weight_files(cfg.checkpoint))
    check_space(cfg)                                  # the preset and noise against the checkpoint, before any trial
    n = max(cfg.subsets)
    prompts = [r["prompt"] for r in read_prompts(cfg.prompts)] if cfg.prompts else random_prompts(n, seed=0)
    if len(prompts) < n:
        raise ValueError(f"subsets go up to {n} prompts but {cfg.prompts} has {len(prompts)}")
    search_space(cfg.space)                           # validate before starting anything
    init_ray()
    trainable = tune.with_parameters(sampling_trial, setup={"cfg": config_lib.to_dict(cfg), "prompts": prompts[:n]})
    out = run_sweep(trainable, cfg.space, cfg.run, nested=False, time_attr="training_iteration", max_t=len(cfg.subsets), grace=1,
                    resources={"cpu": 1.0 if cfg.run.cpus_per_trial is None else cfg.run.cpus_per_trial,
                               "gpu": cfg.run.gpus_per_trial},
                    max_concurrent=cfg.run.max_concurrent, reuse_actors=True, callbacks=callbacks)
    params = space_keys(cfg.space)
    best = write_reports("tune sampling", cfg.run.out, out["rows"], params, cfg.objective.metric, ["cfg_scale"],
                         lambda row: best_config(cfg, row), best_header)
    return {"best": best, "table": out["rows"], "interrupted": out["interrupted"], "resumed": out["resumed"]}


def check_space(cfg: SamplingTuneConfig) -> None:
    """A clear error before the sweep for a preset or a searched noise scale the checkpoint refuses."""
    from jobs.inference import read_checkpoint_meta

    meta = read_checkpoint_meta(cfg.checkpoint)
    sampler_from({}, meta, cfg.preset)
    if cfg.space.get("noise_scale") is not None and "sampling" in meta:
        raise ValueError(f"space.noise_scale searches the start noise, but {cfg.checkpoint} publishes the noise its "
                         f"weights were trained with ({meta['denoiser']['noise_scale']}, model.json); "
                         "leave noise_scale out of the space (null)")


def best_config(cfg: SamplingTuneConfig, row: dict) -> dict:
    """The best trial as a GenerateConfig section (`minit2i generate --config best_config.yaml`)."""
    from jobs.inference import read_checkpoint_meta

    conf = row["_config"]
    meta = read_checkpoint_meta(cfg.checkpoint)
    sampler = sampler_from(conf, meta, cfg.preset)
    return {"checkpoint": cfg.checkpoint, "weights": conf.get("weights"), "text_encoder": cfg.text_encoder,
            "sampler": config_lib.to_dict(sampler), "noise_scale": sampler.noise_scale}


def best_header(row: dict, best: dict) -> str:
    s = best["sampler"]
    keys = [f"checkpoint={best['checkpoint']}", f"sampler.sampler={s['sampler']}", f"sampler.steps={s['steps']}",
            f"sampler.cfg_scale={s['cfg_scale']}", f"sampler.time_shift={s['time_shift']}", f"sampler.a_min={s['a_min']}",
            f"noise_scale={best['noise_scale']}"]
    if best.get("weights"):
        keys.append(f"weights={best['weights']}")
    if s.get("cfg_interval"):
        keys.append(f"sampler.cfg_interval=[{s['cfg_interval'][0]},{s['cfg_interval'][1]}]")
    return f"# minit2i generate --config best_config.yaml prompts=... out=...\n# minit2i sample {' '.join(keys)}\n"


def run(cfg: SamplingTuneConfig) -> int:
    out = run_sampling(cfg)
    print(f"wrote {cfg.run.out}/results.csv, plot.png" + (", best_config.yaml, best_grid.png, worst_grid.png" if out["best"] else
                                                        " (no trial finished: no best config)"))
    return 0
