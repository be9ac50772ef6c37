"""Running a trained MM-JiT: load it, seed each image's noise, sample, make uint8 images and grids.

The one place inference is set up, shared by `minit2i sample` (a grid), `generate` (Ray Data
shards), `eval`, `tune sampling` trials and the train job's sample grids and evaluations:

- `load_model`: a weights folder, a training checkpoint or a run's folder (its newest complete
  checkpoint), local or s3://, or a fresh preset model; the text encoder recorded beside it.
- `image_noise`: image (index i, seed s) always starts from the same noise, whatever batch or job
  it is made in, so any single image of a `generate` run can be re-made alone.
- `resolve_sampler`: sampler settings with the noise scale the weights were trained with
  (model.json's denoiser section) unless one is given.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from model.denoiser import SamplerConfig, sample
from model.mmjit import MMJiT, preset
from model.text_encoder import FrozenT5, TextEncoderConfig


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(checkpoint: str | None, weights: str | None = None, preset_name: str = "debug",
               text_encoder: str | None = None, device: torch.device | str = "cpu") -> tuple[MMJiT, FrozenT5, dict]:
    """(network in eval mode, frozen text encoder, meta) from a weights folder, checkpoint or run
    folder (its newest complete checkpoint), local or s3://; without a checkpoint, a fresh
    `preset_name` model (seeded). `weights` picks the file (ema_0.9999, model; default the
    highest-decay EMA); `text_encoder` overrides the recorded one."""
    if checkpoint:
        from jobs.train.checkpoints import local_copy, weights_folder
        from model.checkpoint import load_weights

        path, tmp = local_copy(weights_folder(checkpoint))
        try:
            net, meta = load_weights(path, weights, device)
        finally:
            if tmp:
                tmp.cleanup()
        enc_cfg = TextEncoderConfig(**meta["text_encoder"])
    else:
        enc_cfg = TextEncoderConfig()
        net, meta = None, {"weights": f"fresh {preset_name}"}
    if text_encoder:
        enc_cfg.name_or_path = text_encoder
    encoder = FrozenT5(enc_cfg, device)
    if net is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = MMJiT(preset(preset_name, text_dim=encoder.dim, text_length=enc_cfg.prompt_length)).to(device).eval()
    if encoder.dim != net.config.text_dim:
        raise ValueError(f"text encoder {enc_cfg.name_or_path} gives {encoder.dim}-dim features but the model "
                         f"expects {net.config.text_dim}")
    return net, encoder, meta


def network(model_cfg, state_dict: dict, device: torch.device | str = "cpu") -> MMJiT:
    """An eval-mode MM-JiT from in-memory weights (the train job's consolidated EMA)."""
    net = MMJiT(model_cfg)
    net.load_state_dict(state_dict)
    return net.to(device).eval()


def resolve_sampler(sampler: SamplerConfig, meta: dict, noise_scale: float | None = None) -> SamplerConfig:
    """`sampler` with the ODE's start noise set: `noise_scale` if given, else the one the weights
    were trained with (meta["denoiser"], as model.json records it), else the sampler's own."""
    if noise_scale is None:
        noise_scale = meta.get("denoiser", {}).get("noise_scale", sampler.noise_scale)
    return dataclasses.replace(sampler, noise_scale=float(noise_scale))


def image_noise(shape: tuple[int, ...], index: int, seed: int) -> torch.Tensor:
    """The unit-variance start noise [C, H, W] of image `index` (its prompt's position) under `seed`."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample_images(net, encoder, sampler: SamplerConfig, prompts: list[str], indices: list[int] | None = None,
                  seeds: list[int] | int = 0, batch_size: int = 16) -> np.ndarray:
    """uint8 [B, H, W, 3]: image j is prompt j sampled from `image_noise(index j, seed j)`.
    indices default to 0..B-1 and one seed may stand for all."""
    indices = list(range(len(prompts))) if indices is None else list(indices)
    seeds = [seeds] * len(prompts) if isinstance(seeds, int) else list(seeds)
    c = net.config
    shape = (c.in_channels, c.image_size, c.image_size)
    device = next(net.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        text, mask = encoder(prompts[start:end])
        noise = torch.stack([image_noise(shape, i, s) for i, s in zip(indices[start:end], seeds[start:end])]).to(device)
        out.append(to_uint8(sample(net, text, mask, tuple(noise.shape), sampler, noise=noise)))
    return np.concatenate(out)


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, captions: list[str] | None = None,
              ncol: int | None = None, min_tile: int = 128) -> Path:
    """Tile images into one PNG (nearest-upscaled to at least `min_tile` px), captions under each."""
    from PIL import Image, ImageDraw

    arr = to_uint8(images) if isinstance(images, torch.Tensor) else images
    B, H, W, _ = arr.shape
    ncol = ncol or min(B, max(1, math.ceil(math.sqrt(B))))
    nrow = math.ceil(B / ncol)
    scale = max(1, math.ceil(min_tile / max(H, W)))
    th, tw = H * scale, W * scale
    label_h = 24 if captions else 0
    grid = Image.new("RGB", (ncol * tw, nrow * (th + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(B):
        r, c = divmod(i, ncol)
        tile = Image.fromarray(arr[i]).resize((tw, th), Image.NEAREST)
        grid.paste(tile, (c * tw, r * (th + label_h)))
        if captions:
            text = captions[i]
            limit = max(4, tw // 6)
            text = text if len(text) <= limit else text[: limit - 1] + "…"
            draw.text((c * tw + 2, r * (th + label_h) + th + 4), text, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path
