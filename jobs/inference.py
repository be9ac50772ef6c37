"""Running a trained MM-JiT: load it, seed each image's noise, sample, make uint8 images and grids.

The one place inference is set up, shared by `minit2i sample` (a grid), `generate` (Ray Data
shards), `eval`, `tune sampling` trials and the train job's sample grids and evaluations:

- `load_model`: a weights folder, a training checkpoint or a run's folder (its newest complete
  checkpoint), local or s3://, or a fresh preset model; the text encoder recorded beside it.
- `image_noise`: image (index i, seed s) always starts from the same noise, whatever batch or job
  it is made in, so any single image of a `generate` run can be re-made alone.
- `sampler_settings`: a command's `sampler` section (a named preset and single settings) made into
  the SamplerConfig it samples with: a setting given wins, then the preset, then the checkpoint's
  published default (model.json "sampling", which `weights import` writes), then the command's
  default; the noise scale is the one the weights were trained with. A preset or setting that
  contradicts the checkpoint (noise scale, image size, text length) is an error naming both values.
- `resolve_sampler`: the train job's grids: its own sampler settings with its training noise.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jobs import repo_path
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
        meta["path"] = checkpoint
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
    meta.setdefault("model", dataclasses.asdict(net.config))
    return net, encoder, meta


def read_checkpoint_meta(checkpoint: str) -> dict:
    """model.json of a weights folder, checkpoint or run folder (its newest), local or s3://, without
    loading the weights: what a driver checks sampler settings against before starting workers."""
    from jobs.train.checkpoints import weights_folder
    from model.checkpoint import META_NAME
    from pipelines import storage

    folder = weights_folder(checkpoint)
    return {**json.loads(storage.read_bytes(storage.join(folder, META_NAME))), "path": folder}


# --------------------------------------------------------------------------------------------
# Sampler settings: presets, the checkpoint's defaults, what the command line gives
# --------------------------------------------------------------------------------------------

PRESETS_FILE = "jobs/configs/samplers.yaml"
# A benchmark name as a preset means the checkpoint's own settings for it (model.json "sampling"),
# else the published ones of the released model the checkpoint has the shape of.
USES = ("default", "geneval", "dpg_bench", "coco_fid", "general")
SHORT = {"B/16": "b16", "B/32": "b32", "L/16": "l16"}     # preset names in PRESETS_FILE: <short>-<use>


@dataclass
class SamplerSection:
    """A command's sampler settings. A key left null comes from `preset`, else from the checkpoint's
    published default (model.json "sampling"), else from the command's default."""
    preset: str | None = None                        # geneval, dpg_bench, coco_fid, general, default, or a name in jobs/configs/samplers.yaml
    sampler: str | None = None                       # euler, heun, euler-4e-2, sde
    steps: int | None = None                         # network evaluations from t=0 to t=1 (x2 for Heun)
    cfg_scale: float | None = None                   # classifier-free guidance scale (1.0 = none)
    cfg_interval: tuple[float, float] | None = None  # guide only for t in [lo, hi]
    time_shift: float | None = None                  # >1 spends more steps at high noise
    noise_scale: float | None = None                 # start noise; must be the one the weights were trained with
    a_min: float | None = None                       # floor of (1 - t) in the x->v conversion


def sampler_presets() -> dict[str, dict]:
    """The named presets of jobs/configs/samplers.yaml: name -> {model: {...}, sampler fields}."""
    import yaml

    with open(repo_path(PRESETS_FILE)) as f:
        return yaml.safe_load(f)


def preset_settings(name: str, meta: dict) -> dict:
    """The SamplerConfig fields of preset `name` for this checkpoint, checked against its model."""
    from model.released import normalise
    from model.mmjit import MMJiTConfig

    model = meta.get("model", {})
    where = meta.get("path") or meta.get("weights") or "the checkpoint"
    if name in USES and name in meta.get("sampling", {}):
        return dict(meta["sampling"][name])                   # written by `weights import` for this very model
    presets = sampler_presets()
    if name in USES:
        shape = normalise(MMJiTConfig(**model))[1] if model else None
        if shape not in SHORT:
            raise ValueError(f"sampler preset {name!r}: {where} publishes no sampler settings (model.json has no "
                             f"'sampling') and is no released model shape (B/16, B/32, L/16); give a named preset "
                             f"({', '.join(presets)}) or the settings themselves")
        name = f"{SHORT[shape]}-{name}"
    if name not in presets:
        raise ValueError(f"unknown sampler preset {name!r}: one of {', '.join(USES)} (the checkpoint's own) or "
                         f"{', '.join(presets)} ({PRESETS_FILE})")
    fields = dict(presets[name])
    for key, value in fields.pop("model", {}).items():
        if key in model and model[key] != value:
            what = {"image_size": "px images", "text_length": " text tokens"}.get(key, f" {key}")
            raise ValueError(f"sampler preset {name} is for {value}{what}, but {where} has {model[key]}{what}")
    return fields


def sampler_settings(section: SamplerSection, meta: dict, default: SamplerConfig,
                     noise_scale: float | None = None) -> SamplerConfig:
    """The SamplerConfig a command samples with (see the module docstring for the order). `meta` is
    the checkpoint's model.json (load_model's meta); `noise_scale` a command's own start-noise key."""
    trained = meta.get("denoiser", {}).get("noise_scale")
    fields = dataclasses.asdict(default)
    fields.update(meta.get("sampling", {}).get("default", {}))
    if trained is not None:
        fields["noise_scale"] = trained
    if section.preset:
        fields.update(preset_settings(section.preset, meta))
    given = {k: v for k, v in dataclasses.asdict(section).items() if k != "preset" and v is not None}
    if noise_scale is not None:
        given["noise_scale"] = noise_scale
    fields.update(given)
    # Weights that publish how they are sampled (an import) or a published preset fix the start noise
    # to the training noise; a checkpoint trained here may sample at another (a `tune sampling` knob).
    if trained is not None and float(fields["noise_scale"]) != float(trained) and ("sampling" in meta or section.preset):
        source = "noise_scale" if "noise_scale" in given else f"sampler preset {section.preset}"
        raise ValueError(f"{source} {fields['noise_scale']} contradicts {meta.get('path') or 'the checkpoint'}: its "
                         f"weights were trained with noise_scale {trained} (model.json denoiser.noise_scale)")
    fields["cfg_interval"] = tuple(fields["cfg_interval"]) if fields.get("cfg_interval") is not None else None
    return SamplerConfig(**fields)


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
