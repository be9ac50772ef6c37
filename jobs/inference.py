"""`minit2i sample`: a checkpoint (or a fresh `debug` model) + prompts -> a PNG grid.

Runs in a plain process (GPU when there is one); batch generation over prompt files as a Ray Data
job is `minit2i generate`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.denoiser import SamplerConfig, sample
from model.mmjit import MMJiT, preset
from model.text_encoder import FrozenT5, TextEncoderConfig


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, captions: list[str] | None = None,
              ncol: int | None = None, min_tile: int = 128) -> Path:
    """Tile images into one PNG (nearest-upscaled to at least `min_tile` px), captions under each."""
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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(checkpoint: str | None, weights: str | None, preset_name: str, text_encoder: str | None,
               device: torch.device) -> tuple[MMJiT, FrozenT5, dict]:
    """(network, frozen text encoder, meta) from a weights folder, checkpoint or training run's
    folder (its newest checkpoint), local or s3://; or a fresh preset model."""
    if checkpoint:
        from jobs.train import local_copy, weights_folder
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
        torch.manual_seed(0)
        net = MMJiT(preset(preset_name, text_dim=encoder.dim, text_length=enc_cfg.prompt_length)).to(device).eval()
    if encoder.dim != net.config.text_dim:
        raise ValueError(f"text encoder {enc_cfg.name_or_path} gives {encoder.dim}-dim features but the model "
                         f"expects {net.config.text_dim}")
    return net, encoder, meta


@torch.no_grad()
def generate(net: MMJiT, encoder: FrozenT5, prompts: list[str], cfg: SamplerConfig, seed: int,
             batch_size: int = 16) -> torch.Tensor:
    """Images [len(prompts), C, H, W] in [-1, 1]; image i depends only on (seed, i, prompt i)."""
    device = next(net.parameters()).device
    c = net.config
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        text, mask = encoder(chunk)
        # One generator per image so a prompt's image does not depend on its batch neighbours.
        noise = torch.stack([
            torch.randn((c.in_channels, c.image_size, c.image_size), generator=torch.Generator().manual_seed(seed * 1_000_003 + start + j))
            for j in range(len(chunk))
        ]).to(device)
        out.append(sample(net, text, mask, tuple(noise.shape), cfg, noise=noise).cpu())
    return torch.cat(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="weights folder, checkpoint or training run folder (its newest checkpoint); "
                   "local or s3://; default: a fresh model")
    p.add_argument("--weights", help="which weights in the folder (e.g. ema_0.9999, model); default: best EMA")
    p.add_argument("--preset", default="debug", help="preset of the fresh model when no checkpoint is given")
    p.add_argument("--text-encoder", help="override the text encoder (local T5 directory, hub id or tiny-t5)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--per-prompt", type=int, default=1, help="images per prompt")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("T_LO", "T_HI"), help="guide only in [t_lo, t_hi]")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=["euler", "heun"], default="heun")
    p.add_argument("--time-shift", type=float, default=1.0)
    p.add_argument("--noise-scale", type=float, default=None, help="default: the checkpoint's training value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/sample_grid.png")


def run(args: argparse.Namespace) -> int:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        prompts = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "three purple circles"]
    prompts = [p for p in prompts for _ in range(args.per_prompt)]
    device = default_device()
    net, encoder, meta = load_model(args.checkpoint, args.weights, args.preset, args.text_encoder, device)
    noise_scale = args.noise_scale if args.noise_scale is not None else meta.get("denoiser", {}).get("noise_scale", 2.0)
    cfg = SamplerConfig(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg,
                        cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
                        time_shift=args.time_shift, noise_scale=noise_scale)
    images = generate(net, encoder, prompts, cfg, args.seed)
    out = save_grid(images, args.out, captions=prompts)
    print(f"wrote {out} ({len(prompts)} images, {meta['weights']}, {cfg.sampler} {cfg.steps} steps, cfg {cfg.cfg_scale})")
    return 0
