"""Does the demo's MM-JiT learn the synthetic world? `minit2i bench learn`: prompt following per
category against training steps, over a grid of settings, as a Ray Tune experiment.

    minit2i bench learn -- [--config benchmarks/learn_full.yaml] [--out DIR] [key=value ...]
    minit2i bench learn -- --single [key=value ...]          one setting in this process, no Ray
    minit2i bench learn -- --audit DATASET ...               the train reader's batches vs the rows
    minit2i bench learn -- --count-swap --load WEIGHTS       blob counts per count word
    minit2i bench learn -- --score --load WEIGHTS [eval.*=...] one weights folder at other eval settings

A trial trains one setting in its own process with the train job's own step (jobs.train.step:
`build_engine` + `TrainStep`: DeepSpeed ZeRO on one CPU process, per-sample seeded t/noise/caption
dropout draws, AdamW, warmup, clipping, the sharded EMA) on the demo's world rendered in memory
(the pixels the fetch and curate stages store; `--audit` checks that the Ray Data reader ships
exactly those), with the frozen text encoder's features computed once per distinct caption (it is
frozen and deterministic, so this is exact). One process with global batch G draws what the demo's
two Ray Train workers draw for the same sample positions; only the row order differs.

Every `eval.every` steps (and at the end) the EMA weights sample held-out world prompts (another
world seed, single objects, counts and relations in turn) with the noise `minit2i generate` draws,
at each `eval.cfg_scales`, and are scored per category with the exact world checks
(jobs/metrics/world.py); a fixed validation batch gives the v-loss per t bucket. Each evaluation is
one Tune report. The experiment writes `learn.csv` (one row per setting, step, CFG and category),
`learn_wide.csv`, a printed table and `learn.png` (score against step per category, a line per
setting) under --out.

The default grid (`grid` below) is small enough for a 2-core laptop in minutes; the grid the issue
lists (depth, width, patch, lr and warmup, EMA decay, batch, prompt length, caption dropout, noise
scale, time schedule, sampler) is benchmarks/learn_full.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from jobs.train.step import EMAConfig, ModelConfig, OptimConfig
from model.denoiser import DenoiserConfig, SamplerConfig
from model.text_encoder import TextEncoderConfig
from pipelines import config as config_lib

CATEGORIES = ("single_object", "counting", "colours", "shapes", "position", "colour_attribution", "overall")
COUNT_CHECKS = ("counting_count", "counting_shape")   # which check the counting prompts fail (score())


@dataclass
class WorldSection:
    n: int = 4000                    # training scenes (world seed `seed`); the demo's world
    size: int = 32                   # image side in pixels
    seed: int = 0
    relation_fraction: float = 0.4   # share of two-object relation scenes


@dataclass
class EvalSection:
    every: int = 250                 # steps between evaluations (0: only at the end)
    per_kind: int = 32               # held-out prompts per prompt kind (single, counting, relation)
    seeds: list[int] = field(default_factory=lambda: [0])
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(sampler="heun", steps=25, cfg_scale=3.0))
    cfg_scales: list[float] = field(default_factory=list)   # CFG scales scored at each evaluation ([]: sampler.cfg_scale)
    weights: str = "ema"             # "ema" (highest decay) or "model" (the raw weights)
    t_buckets: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])   # validation v-loss at these t


@dataclass
class SweepSection:
    out: str = "outputs/bench_learn"  # learn.csv, learn.png; Tune's experiment under <out>/ray
    name: str = "learn"
    cpus_per_trial: float = 1.0       # also the trial's torch threads
    max_concurrent: int = 0           # 0: as many as the cluster's CPUs allow
    mode: str = "product"             # "product" (every combination) or "one_at_a_time" (the base, then one key changed)

    def __post_init__(self):
        if self.mode not in ("product", "one_at_a_time"):
            raise ValueError(f"sweep.mode must be product or one_at_a_time, got {self.mode!r}")


@dataclass
class LearnConfig:
    world: WorldSection = field(default_factory=WorldSection)
    # The base is the demo's model and encoder (jobs/configs/demo.yaml): the debug preset at depth 6 with patch 8
    # (16 image tokens at 32 px) and the world's word-level T5 with 16-token prompts (pipelines/world.py;
    # `text_encoder.name_or_path=tiny-t5 text_encoder.prompt_length=64` is the byte-level ByT5 one).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(overrides={"depth": 6, "patch_size": 8}))
    text_encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(name_or_path="world", prompt_length=16))
    denoiser: DenoiserConfig = field(default_factory=lambda: DenoiserConfig(noise_scale=1.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20, steps=500))
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(decays=[0.995]))
    batch_size: int = 32             # global batch (the demo: 2 workers x 16)
    seed: int = 0                    # the row order and the per-sample noise
    threads: int = 0                 # torch CPU threads (0: torch's default; Tune trials: cpus_per_trial)
    eval: EvalSection = field(default_factory=EvalSection)
    sweep: SweepSection = field(default_factory=SweepSection)
    # The searched settings: dotted keys of this config -> a list of values (every combination is a
    # trial). The default compares depths, the setting that moved every category most per step (and per
    # second past ~300 s of training; BENCHMARKS.md, "bench learn"), at a laptop size;
    # benchmarks/learn_full.yaml is the full grid.
    grid: dict[str, list] = field(default_factory=lambda: {"model.overrides.depth": [2, 4, 6]})


# --------------------------------------------------------------------------------------------
# Data: the world in memory, text features once per caption
# --------------------------------------------------------------------------------------------

def world_images(cfg: WorldSection) -> tuple[np.ndarray, list[str]]:
    """uint8 [n, S, S, 3] renders and their captions, scenes 0..n-1 of the world."""
    from pipelines.world import WorldConfig, make_scene, render

    wc = WorldConfig(seed=cfg.seed, size=cfg.size, relation_fraction=cfg.relation_fraction).validate()
    scenes = [make_scene(i, wc) for i in range(cfg.n)]
    return np.stack([np.asarray(render(s)) for s in scenes]), [s.caption for s in scenes]


class FeatureCache:
    """Frozen-encoder features per distinct caption: (features [L, C], mask [L]), computed once.
    Called like the encoder: captions -> (features [B, L, C], mask [B, L])."""

    def __init__(self, encoder):
        self.encoder, self.cache = encoder, {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        new = sorted({c for c in captions if c not in self.cache})
        for i in range(0, len(new), 256):
            chunk = new[i:i + 256]
            feats, mask = self.encoder(chunk)
            self.cache.update({c: (f, m) for c, f, m in zip(chunk, feats, mask)})
        return (torch.stack([self.cache[c][0] for c in captions]),      # [B, L, C]
                torch.stack([self.cache[c][1] for c in captions]))      # [B, L]


def eval_prompts(cfg: LearnConfig) -> list[str]:
    """Held-out captions (world seed + 1000), balanced over single objects, counts and relations."""
    from pipelines.world import WorldConfig, held_out_captions

    return held_out_captions(3 * cfg.eval.per_kind, WorldConfig(seed=cfg.world.seed + 1_000, size=cfg.world.size))


# --------------------------------------------------------------------------------------------
# Scoring and direct checks
# --------------------------------------------------------------------------------------------

def score(images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Per-category shares (jobs.metrics.world.summarize) of images judged against their prompts, and
    which check fails the counting prompts (`counting_count`: the colour's blobs number exactly the
    count; `counting_shape`: that many of them have the named shape)."""
    from jobs.metrics.world import check_image, summarize

    verdicts = [check_image(im, p) for im, p in zip(images, prompts)]
    out = summarize(verdicts)
    counts = [v for v in verdicts if v.category == "counting"]
    if counts:
        out["counting_count"] = float(np.mean([v.count for v in counts]))
        out["counting_shape"] = float(np.mean([v.shape for v in counts]))
    return out


def count_response(net, encoder, sampler: SamplerConfig, pairs: list[tuple[str, str]], seeds: int = 4) -> dict[int, list[float]]:
    """Does the output follow the count word? For each (colour, shape) pair and each count word,
    sample `seeds` images from the same noises (only the word differs) and count the blobs of that
    colour. Returns {asked count: share of images with 0, 1, 2, 3, 4+ blobs}."""
    from jobs.inference import sample_images
    from jobs.metrics.world import find_objects
    from pipelines.world import COUNT_WORDS, Obj, Scene

    colours = [c for c, _ in pairs for _ in range(seeds)]
    out = {}
    for n in COUNT_WORDS:
        prompts = [Scene("count", (Obj(c, s),) * n).caption for c, s in pairs for _ in range(seeds)]
        images = sample_images(net, encoder, sampler, prompts, seeds=0, batch_size=64)   # image j: the same noise for every n
        found = [sum(b.colour == c for b in find_objects(im)) for im, c in zip(images, colours)]
        out[n] = [round(float(v), 3) for v in np.bincount(np.minimum(found, 4), minlength=5) / len(found)]
    return out


@torch.no_grad()
def val_loss_by_t(net, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, cfg: DenoiserConfig,
                  ts: list[float], seed: int = 12345) -> dict[str, float]:
    """The v-loss of a fixed batch at fixed t values and fixed noise (captions kept)."""
    from model.denoiser import training_loss

    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * cfg.noise_scale
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    out = {}
    for t in ts:
        loss, _ = training_loss(net, x, text, mask, cfg, t=torch.full((x.shape[0],), t), eps=eps, keep=keep)
        out[f"vloss_t{t:g}"] = float(loss)
    return out


def eval_net(engine, ema, cfg: LearnConfig, model_cfg):
    """An eval-mode MMJiT holding the EMA (highest decay) or the raw weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    from model.mmjit import MMJiT

    if cfg.eval.weights == "ema" and ema is not None:
        state = ema.full()[max(ema.decays)]
    else:
        state = {n: safe_get_full_fp32_param(p).cpu() for n, p in engine.module.named_parameters()}
    net = MMJiT(model_cfg)
    net.load_state_dict(state)
    return net.eval()


def evaluate(net, encoder, cfg: LearnConfig, noise_scale: float) -> tuple[dict[float, dict[str, float]], np.ndarray, list[str]]:
    """({cfg scale: scores averaged over eval.seeds}, the first images, prompts) of a network."""
    from jobs.inference import sample_images

    prompts = eval_prompts(cfg)
    out, first = {}, None
    for scale in cfg.eval.cfg_scales or [cfg.eval.sampler.cfg_scale]:
        # The sampler starts from the training noise scale, as `minit2i generate` takes it from the checkpoint.
        sampler = dataclasses.replace(cfg.eval.sampler, noise_scale=noise_scale, cfg_scale=float(scale))
        scores: dict[str, float] = {}
        for seed in cfg.eval.seeds:
            images = sample_images(net, encoder, sampler, prompts, seeds=seed, batch_size=64)
            first = images if first is None else first
            for key, v in score(images, prompts).items():
                scores[key] = scores.get(key, 0.0) + v / len(cfg.eval.seeds)
        out[float(scale)] = scores
    return out, first, prompts


def score_weights(net, encoder, meta: dict, cfg: LearnConfig, where: str) -> dict:
    """A trained weights folder scored at `cfg.eval`'s settings (the eval-time half of the grid:
    sampler, steps, CFG scales and interval, seeds), as one row like a training run's evaluation."""
    from jobs.inference import resolve_sampler

    if net.config.image_size != cfg.world.size:
        raise ValueError(f"{where}: the weights draw {net.config.image_size}px images, the world's eval prompts "
                         f"are for world.size={cfg.world.size}")
    sampler = cfg.eval.sampler
    t0 = time.perf_counter()
    by_scale, _, _ = evaluate(net, encoder, cfg, resolve_sampler(sampler, meta).noise_scale)
    return {"weights": where, "step": meta.get("step"),
            "sampler": f"{sampler.sampler} {sampler.steps} steps, cfg interval {sampler.cfg_interval}",
            **{f"{k}@cfg{s:g}": v for s, scores in by_scale.items() for k, v in scores.items()},
            "eval_s": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------------
# One setting
# --------------------------------------------------------------------------------------------

def run(cfg: LearnConfig, emit=print, save: str | None = None) -> dict:
    """Train and evaluate one setting; emits one flat dict per evaluation (scores as
    `<category>@cfg<scale>`) and returns the last with the network, encoder, prompts and images."""
    from jobs.train.data import to_model_range
    from jobs.train.step import ShardedEMA, TrainStep, build_engine
    from model.text_encoder import FrozenT5
    from pipelines.world import resolve_text_encoder

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    # text_encoder.name_or_path=world: the world's word-level encoder (pipelines/world.py).
    cfg = dataclasses.replace(cfg, text_encoder=dataclasses.replace(
        cfg.text_encoder, name_or_path=resolve_text_encoder(cfg.text_encoder.name_or_path)))
    images, captions = world_images(cfg.world)
    features = FeatureCache(FrozenT5(cfg.text_encoder))
    features(captions)
    model_cfg = cfg.model.build(features.encoder.dim, cfg.text_encoder.prompt_length)
    engine, precision = build_engine(model_cfg, cfg.optim, cfg.batch_size, torch.device("cpu"))
    ema = ShardedEMA(engine, cfg.ema.decays) if cfg.ema.decays else None
    step_fn = TrainStep(engine, precision, cfg.denoiser, cfg.optim, ema, cfg.seed)

    val_idx = np.random.default_rng(cfg.seed + 1).choice(len(captions), size=min(64, len(captions)), replace=False)
    val_x = to_model_range(torch.from_numpy(images[val_idx]).float())
    val_text, val_mask = features([captions[i] for i in val_idx])

    G, n = cfg.batch_size, len(captions)
    if n < G:
        raise ValueError(f"world.n={n} is below batch_size={G}")
    spe = n // G
    setup_s = time.perf_counter() - t0
    train_s, losses, last, net, sampled, prompts = 0.0, [], {}, None, None, []
    for step in range(cfg.optim.steps):
        epoch, k = divmod(step, spe)
        if k == 0:
            order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        idx = order[k * G:(k + 1) * G]
        text, mask = features([captions[i] for i in idx])
        t1 = time.perf_counter()
        out = step_fn(step, torch.from_numpy(images[idx]), text, mask, [step * G + j for j in range(G)])
        train_s += time.perf_counter() - t1
        losses.append(float(out["loss"]))
        done = step + 1
        if done % 50 == 0:
            print(f"[learn] step {done}/{cfg.optim.steps} loss {np.mean(losses[-50:]):.4f} "
                  f"{train_s / done * 1e3:.0f} ms/step", file=sys.stderr, flush=True)
        if (cfg.eval.every and done % cfg.eval.every == 0) or done == cfg.optim.steps:
            net = eval_net(engine, ema, cfg, model_cfg)
            t2 = time.perf_counter()
            by_scale, sampled, prompts = evaluate(net, features, cfg, cfg.denoiser.noise_scale)
            last = {"step": done, "train_loss": float(np.mean(losses[-50:])),
                    **{f"{k}@cfg{s:g}": v for s, scores in by_scale.items() for k, v in scores.items()},
                    **val_loss_by_t(net, val_x, val_text, val_mask, cfg.denoiser, cfg.eval.t_buckets),
                    "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t2, 1), "setup_s": round(setup_s, 1)}
            emit(last)
    if save:
        from model.checkpoint import save_weights

        name = f"ema_{max(cfg.ema.decays)}" if cfg.eval.weights == "ema" and cfg.ema.decays else "model"
        save_weights(save, net.state_dict(), model_cfg, cfg.text_encoder, cfg.denoiser, name=name,
                     extra={"step": cfg.optim.steps})
    return {**last, "net": net, "encoder": features, "prompts": prompts, "images": sampled}


# --------------------------------------------------------------------------------------------
# The grid as a Ray Tune experiment
# --------------------------------------------------------------------------------------------

def grid_settings(cfg: LearnConfig) -> list[dict[str, Any]]:
    """The trials' settings as {dotted key: value}: every combination of the grid's values
    (sweep.mode "product"), or the base plus each value of each key alone ("one_at_a_time", the
    full grid's mode: its product would be thousands of runs). Each is checked against the config."""
    for key, values in cfg.grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid.{key} must be a non-empty list of values, got {values!r}")
        for value in values:
            try:
                with_setting(cfg, {key: value})     # a bad key or value is an error before any trial starts
            except ValueError as err:
                raise ValueError(f"grid.{key}: {err}") from None
    if cfg.sweep.mode == "product":
        keys = list(cfg.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(cfg.grid[k] for k in keys))]
    return [{}] + [{key: value} for key, values in cfg.grid.items() for value in values]


def with_setting(cfg: LearnConfig, setting: dict[str, Any]) -> LearnConfig:
    """cfg with the dotted keys of `setting` set (checked by the config library)."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in setting.items()]
    return config_lib.from_dict(LearnConfig, config_lib.apply_overrides(config_lib.to_dict(cfg), overrides), "bench learn grid")


def label(setting: dict[str, Any]) -> str:
    return " ".join(f"{k.split('.')[-1]}={v}" for k, v in setting.items()) or "base"


def _trial(config: dict) -> None:
    """A Tune trial: one setting of the grid, each evaluation reported."""
    from ray import tune

    cfg = with_setting(config_lib.from_dict(LearnConfig, config["base"], "bench learn"), config["setting"])
    cfg = dataclasses.replace(cfg, threads=max(1, int(cfg.sweep.cpus_per_trial)))
    run(cfg, emit=lambda row: tune.report({k: v for k, v in row.items() if isinstance(v, (int, float))}))


def run_grid(cfg: LearnConfig) -> list[dict[str, Any]]:
    """Run every setting as a Tune trial on the cluster Ray is joined to; returns the long rows
    (setting, step, cfg, category, score, and the step's losses and times)."""
    from ray import tune

    from jobs.ray_init import init_ray

    settings = grid_settings(cfg)
    # A local Ray starts its workers at niceness 15 (RAY_worker_niceness) to keep its daemons
    # responsive; trials are the measurement, so they run at 0, as a plain process would.
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray()
    out = os.path.abspath(cfg.sweep.out)
    # The trial function by its importable name: run as `python -m benchmarks.learn` this file is
    # __main__, whose functions Ray pickles by value, without the module's other names.
    from benchmarks import learn as importable

    trainable = tune.with_resources(importable._trial, {"cpu": cfg.sweep.cpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={"base": config_lib.to_dict(cfg), "setting": tune.grid_search(settings)},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.sweep.max_concurrent or None),
        run_config=tune.RunConfig(name=cfg.sweep.name, storage_path=os.path.join(out, "ray"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    results = tuner.fit()
    rows = []
    for result in results:
        setting = result.config["setting"]
        if result.error:
            print(f"bench learn: {label(setting)} failed: {str(result.error).strip().splitlines()[-1][:200]}")
        history = result.metrics_dataframe
        for _, r in (history.iterrows() if history is not None else []):
            for key, value in r.items():
                if "@cfg" not in key:
                    continue
                category, scale = key.split("@cfg")
                if category not in CATEGORIES and category not in COUNT_CHECKS:
                    continue
                rows.append({"setting": label(setting), **setting, "step": int(r["step"]), "cfg": float(scale),
                             "category": category, "score": float(value), "train_loss": float(r["train_loss"]),
                             "train_s": float(r["train_s"]), "vloss_t0.5": float(r.get("vloss_t0.5", float("nan")))})
    return rows


def write_reports(rows: list[dict[str, Any]], out: str) -> None:
    """learn.csv (long), learn_wide.csv and a printed table (a row per setting, step and CFG, a
    column per category), learn.png (score against step, a panel per category, a line per setting)."""
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.console import Console
    from rich.table import Table

    os.makedirs(out, exist_ok=True)
    df = pd.DataFrame(rows)
    if df.empty:
        raise RuntimeError("bench learn: no trial reported an evaluation")
    df.to_csv(os.path.join(out, "learn.csv"), index=False)
    wide = df.pivot_table(index=["setting", "step", "cfg"], columns="category", values="score").reset_index()
    wide = wide[["setting", "step", "cfg", *[c for c in (*CATEGORIES, *COUNT_CHECKS) if c in wide]]]
    wide.to_csv(os.path.join(out, "learn_wide.csv"), index=False)
    table = Table(title=f"bench learn: prompt following per category ({out})")
    for c in wide.columns:
        table.add_column(str(c).replace("colour_attribution", "attribution").replace("single_object", "single")
                         .replace("counting_", "count: "), overflow="fold")
    for _, r in wide.iterrows():
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) and c not in ("cfg",) else str(v) for c, v in r.items()])
    Console(width=200).print(table)

    cats = [c for c in CATEGORIES if c in set(df["category"])]
    fig, axes = plt.subplots(1, len(cats), figsize=(3.2 * len(cats), 3.2), squeeze=False, sharey=True)
    for ax, cat in zip(axes[0], cats):
        for (setting, scale), g in df[df["category"] == cat].groupby(["setting", "cfg"]):
            g = g.sort_values("step")
            ax.plot(g["step"], g["score"], marker="o", label=f"{setting} cfg {scale:g}")
        ax.set_title(cat.replace("_", " "))
        ax.set_xlabel("step")
        ax.axhline(0.8, color="grey", lw=0.5, ls="--")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share correct")
    axes[0][-1].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "learn.png"), dpi=100)
    plt.close(fig)
    print(f"bench learn: {os.path.join(out, 'learn.csv')}, {os.path.join(out, 'learn.png')}")


# --------------------------------------------------------------------------------------------
# Direct checks of what reaches the step
# --------------------------------------------------------------------------------------------

def audit_batches(datasets: list[str], batch_size: int = 32, workers: int = 2, steps: int = 20,
                  prompt_length: int = 64, encoder: str = "tiny-t5") -> dict[str, int]:
    """What reaches the train step, checked row by row: every worker's batches from the train job's
    own Ray Data reader (jobs.train.data.iter_batches) over world datasets, each image judged
    against its caption with the exact world checks, and each text mask against the caption's
    token count. Returns counts; any row not `ok` is a pipeline bug (or an unreadable image)."""
    from jobs.metrics.world import check_image
    from jobs.ray_init import init_ray
    from jobs.train.data import DataConfig, build_index, iter_batches, with_partitions
    from model.text_encoder import FrozenT5, count_tokens

    init_ray()
    cfg = with_partitions(DataConfig(datasets=list(datasets), batch_size=batch_size), workers)
    index = build_index(cfg)
    from pipelines.world import resolve_text_encoder

    enc = FrozenT5(TextEncoderConfig(resolve_text_encoder(encoder), prompt_length=prompt_length))
    out = {"rows": 0, "ok": 0, "image_mismatch": 0, "invalid": 0, "mask_mismatch": 0, "cut_captions": 0}
    for rank in range(workers):
        for _, batch in iter_batches(index, cfg, image_size_of(index), 0, steps, rank, workers):
            _, mask = enc(batch["caption"])
            lengths = count_tokens(enc.tokenizer, batch["caption"])
            for image, caption, valid, m, n in zip(batch["image"].numpy(), batch["caption"], batch["valid"], mask, lengths):
                good_image = bool(valid) and check_image(image, caption).correct
                good_mask = int(m.sum()) == min(n, prompt_length)
                out["rows"] += 1
                out["invalid"] += not bool(valid)
                out["image_mismatch"] += bool(valid) and not good_image
                out["mask_mismatch"] += not good_mask
                out["cut_captions"] += n > prompt_length
                out["ok"] += good_image and good_mask and n <= prompt_length
    return out


def image_size_of(index) -> int:
    """The side of a dataset's first image (world images are square)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from pipelines import storage

    fs, path = storage.resolve(index.shards[0])
    data = pq.ParquetFile(fs.open_input_file(path)).read_row_group(0, columns=["image"]).column("image")[0].as_py()
    return Image.open(io.BytesIO(data)).size[0]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def load_config(path: str | None, overrides: list[str]) -> LearnConfig:
    """LearnConfig from its defaults, then a YAML file's keys, then key=value overrides, all on the
    full default tree (so `optim.steps=1000` keeps this bench's lr and warmup)."""
    import yaml

    data = config_lib.to_dict(LearnConfig())
    if path:
        with open(path) as f:
            top = yaml.safe_load(f) or {}
        if not isinstance(top, dict):
            raise ValueError(f"{path} must hold a mapping at the top level")
        rest = {k: v for k, v in top.items() if k != "grid"}
        data = config_lib.apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in config_lib.flatten(rest)])
        data["grid"] = top.get("grid", data["grid"])      # the grid is replaced, not merged
    return config_lib.from_dict(LearnConfig, config_lib.apply_overrides(data, list(overrides)), path or "bench learn")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minit2i bench learn --", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML with LearnConfig keys (benchmarks/learn_full.yaml: the full grid)")
    p.add_argument("--single", action="store_true", help="train and score one setting (the config, no grid) in this process")
    p.add_argument("--jsonl", help="with --single: append each evaluation as a JSON line here")
    p.add_argument("--save", help="with --single: write the evaluated weights as a weights folder here")
    p.add_argument("--audit", nargs="+", metavar="DATASET", help="check the train reader's batches of these world datasets row by row")
    p.add_argument("--count-swap", action="store_true", help="with --load: blob-count histograms per count word")
    p.add_argument("--score", action="store_true",
                   help="with --load: score the weights per category at the config's eval settings (sampler, CFG scales, seeds)")
    p.add_argument("--load", help="a weights folder for --count-swap or --score")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. optim.steps=1000 'grid={optim.lr: [1e-3, 2e-3]}'")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    def emit(row: dict) -> None:
        line = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")

    if args.audit:
        emit({"audit": audit_batches(args.audit, cfg.batch_size, prompt_length=cfg.text_encoder.prompt_length,
                                     encoder=cfg.text_encoder.name_or_path)})
    elif args.count_swap or args.score:
        if not args.load:
            raise ValueError(f"{'--count-swap' if args.count_swap else '--score'} needs --load WEIGHTS")
        from jobs.inference import load_model, resolve_sampler
        from pipelines.world import PALETTE, SHAPES

        net, encoder, meta = load_model(args.load)
        if args.count_swap:
            pairs = [(c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(PALETTE)]
            emit({"count_swap": count_response(net, encoder, resolve_sampler(cfg.eval.sampler, meta), pairs)})
        else:
            emit(score_weights(net, encoder, meta, cfg, args.load))
    elif args.single:
        run(cfg, emit, args.save)
    else:
        write_reports(run_grid(cfg), cfg.sweep.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
