"""Inference weights on disk: `<name>.safetensors` + `model.json`, loadable without DeepSpeed.

A weights folder holds one or more safetensors files (the raw weights and one per EMA decay, e.g.
`ema_0.9999.safetensors`) next to `model.json`, which records the MM-JiT config, the text encoder
and the denoiser settings the weights were trained with, so sampling needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from model.denoiser import DenoiserConfig
from model.mmjit import MMJiT, MMJiTConfig
from model.text_encoder import TextEncoderConfig

META_NAME = "model.json"


def save_weights(
    out_dir: str | Path, state_dict: dict[str, torch.Tensor], model: MMJiTConfig,
    text_encoder: TextEncoderConfig, denoiser: DenoiserConfig, name: str = "model", extra: dict | None = None,
) -> Path:
    """Write `<name>.safetensors` and `model.json` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    target = out_dir / f"{name}.safetensors"
    tmp = target.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, target)
    meta = {
        "model": dataclasses.asdict(model),
        "text_encoder": dataclasses.asdict(text_encoder),
        "denoiser": dataclasses.asdict(denoiser),
        **(extra or {}),
    }
    tmp_meta = out_dir / (META_NAME + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_meta, out_dir / META_NAME)
    return target


def read_meta(weights_dir: str | Path) -> dict:
    path = Path(weights_dir) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{weights_dir} has no {META_NAME}: not a weights folder written by minit2i")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def available_weights(weights_dir: str | Path) -> list[str]:
    """Names of the weight files in a folder, EMA first (highest decay first), then raw."""
    names = sorted(p.stem for p in Path(weights_dir).glob("*.safetensors"))
    return sorted(names, key=lambda n: (not n.startswith("ema"), -float(n.split("_", 1)[1]) if n.startswith("ema_") else 0))


def load_weights(weights_dir: str | Path, name: str | None = None, device: str | torch.device = "cpu") -> tuple[MMJiT, dict]:
    """(MMJiT with weights loaded and in eval mode, meta dict). `name` picks a weight file
    ("model", "ema_0.9999", ...); by default the highest-decay EMA, else the raw weights."""
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {weights_dir} does not exist")
    meta = read_meta(weights_dir)
    names = available_weights(weights_dir)
    if not names:
        raise FileNotFoundError(f"{weights_dir} holds no .safetensors weights")
    name = name or names[0]
    if name not in names:
        raise FileNotFoundError(f"{weights_dir} has no {name}.safetensors; it has: {', '.join(names)}")
    net = MMJiT(MMJiTConfig(**meta["model"]))
    state = load_file(str(weights_dir / f"{name}.safetensors"))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights_dir / name}.safetensors does not match the model in {META_NAME}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    meta["weights"] = name
    return net.to(device).eval(), meta
