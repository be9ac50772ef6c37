"""`minit2i sample [key=value ...]`: a checkpoint (or a fresh `debug` model) + prompts -> a PNG grid.

    minit2i sample checkpoint=outputs/runs/debug "prompts=[a red circle, two blue squares]" sampler.cfg_scale=4
    minit2i sample checkpoint=weights/minit2i-b16 sampler.preset=geneval "prompts=[a red apple]"

Runs in this process (GPU when there is one); batch generation over prompt files as a Ray Data job
is `minit2i generate`. Image i of the grid is exactly image (i, seed) of a `generate` run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.inference import SamplerSection
from model.denoiser import SamplerConfig

DEFAULT_SAMPLER = SamplerConfig(steps=50)
DEFAULT_PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "three purple circles"]


@dataclass
class SampleConfig:
    checkpoint: str | None = None          # weights folder, checkpoint or run folder (its newest); local or s3://; None = fresh model
    weights: str | None = None             # which weights file (ema_0.9999, model); None = the highest-decay EMA
    preset: str = "debug"                  # preset of the fresh model when no checkpoint is given
    text_encoder: str | None = None        # override the checkpoint's text encoder (local T5 folder, hub id or tiny-t5)
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    prompts_file: str | None = None        # a text file with one prompt per line (used instead of `prompts`)
    per_prompt: int = 1                    # images per prompt
    sampler: SamplerSection = field(default_factory=SamplerSection)   # preset and/or settings; unset: the checkpoint's, else DEFAULT_SAMPLER
    noise_scale: float | None = None       # ODE start noise; None = the checkpoint's training noise_scale
    seed: int = 0
    out: str = "outputs/sample_grid.png"


def run(cfg: SampleConfig) -> int:
    from jobs.inference import default_device, load_model, sample_images, sampler_settings, save_grid
    from pipelines import storage

    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        if not storage.exists(cfg.prompts_file):
            raise FileNotFoundError(f"prompts_file {cfg.prompts_file} does not exist")
        prompts = [line.strip() for line in storage.read_bytes(cfg.prompts_file).decode().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give prompts=[...] or prompts_file=FILE")
    if cfg.per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {cfg.per_prompt}")
    prompts = [p for p in prompts for _ in range(cfg.per_prompt)]
    net, encoder, meta = load_model(cfg.checkpoint, cfg.weights, cfg.preset, cfg.text_encoder, default_device())
    sampler = sampler_settings(cfg.sampler, meta, DEFAULT_SAMPLER, cfg.noise_scale)
    images = sample_images(net, encoder, sampler, prompts, seeds=cfg.seed)
    out = save_grid(images, cfg.out, captions=prompts)
    print(f"wrote {out} ({len(prompts)} images, {meta['weights']}, {sampler.sampler} {sampler.steps} steps, "
          f"cfg {sampler.cfg_scale}, a_min {sampler.a_min}, noise {sampler.noise_scale})")
    return 0
