"""Inference weights on disk: `<name>.safetensors` + `model.json`, loadable without DeepSpeed.

A weights folder holds one or more safetensors files (the raw weights and one per EMA decay, e.g.
`ema_0.9999.safetensors`) next to `model.json`, which records the MM-JiT config, the text encoder
and the denoiser settings the weights were trained with, so sampling needs nothing else. Imported
weights (`model/released.py`) also record the published sampler settings under "sampling".

Folders written before MM-JiT took the released parameter names and norm gains load too: their
names are mapped and every gain is 1, which is exactly the network they were trained as.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path

import torch

from model.denoiser import DenoiserConfig
from model.mmjit import MMJiT, MMJiTConfig, RMSNorm, predates_released_layout
from model.text_encoder import TextEncoderConfig

META_NAME = "model.json"

# Parameter names before the released layout (old -> new, first match wins); those folders had no
# norm gains and a mask token of shape [C_txt].
LEGACY_NAMES = [
    (r"^patch_embed\.", "img_embedder."),
    (r"^text_embed\.", "txt_embedder."),
    (r"^text_blocks\.(\d+)\.text\.proj\.", r"txt_preamble_blocks.\1.attn_proj."),
    (r"^text_blocks\.(\d+)\.text\.", r"txt_preamble_blocks.\1."),
    (r"^blocks\.(\d+)\.image\.proj\.", r"double_blocks.\1.img_attn_proj."),
    (r"^blocks\.(\d+)\.image\.", r"double_blocks.\1.img_"),
    (r"^blocks\.(\d+)\.text\.proj\.", r"double_blocks.\1.txt_attn_proj."),
    (r"^blocks\.(\d+)\.text\.", r"double_blocks.\1.txt_"),
    (r"^final\.", "final_layer.linear."),
]


def rename(key: str, rules: list[tuple[str, str]]) -> str:
    """key under the first (regex, replacement) rule that matches it, else unchanged."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def upgrade_legacy(state: dict[str, torch.Tensor], net: MMJiT) -> dict[str, torch.Tensor]:
    """A pre-release-layout state dict under the current names, with every norm gain 1."""
    out = {rename(key, LEGACY_NAMES): value for key, value in state.items()}
    if "mask_token" in out and out["mask_token"].dim() == 1:
        out["mask_token"] = out["mask_token"].view(1, 1, -1)
    for name, module in net.named_modules():
        if isinstance(module, RMSNorm):
            out.setdefault(f"{name}.weight", torch.ones_like(module.weight, device="cpu"))
    return out


def check_state(state: dict[str, torch.Size | torch.Tensor], expected: dict[str, torch.Size], where: str) -> None:
    """ValueError naming each missing, unexpected or mis-shaped key (with both shapes) in one line."""
    shape = lambda v: list(v.shape if isinstance(v, torch.Tensor) else v)  # noqa: E731
    problems = [f"missing {k} {shape(expected[k])}" for k in expected if k not in state]
    problems += [f"unexpected {k} {shape(state[k])}" for k in state if k not in expected]
    problems += [f"{k} is {shape(state[k])} but the model expects {shape(expected[k])}"
                 for k in expected if k in state and shape(state[k]) != shape(expected[k])]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{where} does not match the model: " + "; ".join(problems[:5]) + more)


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
    save_meta(out_dir, model, text_encoder, denoiser, extra)
    return target


def save_meta(out_dir: str | Path, model: MMJiTConfig, text_encoder: TextEncoderConfig, denoiser: DenoiserConfig,
              extra: dict | None = None) -> None:
    """`model.json` (the configs the weights were trained with, plus `extra`), atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": dataclasses.asdict(model),
        "text_encoder": dataclasses.asdict(text_encoder),
        "denoiser": dataclasses.asdict(denoiser),
        **(extra or {}),
    }
    tmp_meta = out_dir / (META_NAME + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_meta, out_dir / META_NAME)


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
    if "lora_base" in meta:
        raise ValueError(f"{weights_dir} holds LoRA adapters, not weights: fold them into their base with "
                         f"`minit2i weights merge {weights_dir} OUT` and load OUT")
    names = available_weights(weights_dir)
    if not names:
        raise FileNotFoundError(f"{weights_dir} holds no .safetensors weights")
    name = name or names[0]
    if name not in names:
        raise FileNotFoundError(f"{weights_dir} has no {name}.safetensors; it has: {', '.join(names)}")
    # Built on the meta device and given the file's tensors (assign): no random init of weights
    # that are overwritten anyway (~9 s of a B/16 load), no second copy in memory.
    with torch.device("meta"):
        net = MMJiT(MMJiTConfig(**meta["model"]))
    path = weights_dir / f"{name}.safetensors"
    state = load_file(str(path))
    if predates_released_layout(state):
        warnings.warn(f"{path} predates the released parameter layout: names mapped, every norm gain set to 1 "
                      "(the network it was trained as); a training run of that age cannot be resumed, "
                      "start a new one from it with checkpoint.init_from", stacklevel=2)
        state = upgrade_legacy(state, net)
        meta["legacy_layout"] = True
    check_state(state, {k: v.shape for k, v in net.state_dict().items()}, f"{path} (model in {META_NAME})")
    # The module is fp32 whatever the file stores (a bf16 file is upcast, as a copy into fp32 did).
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state, assign=True)
    net.init_buffers(device="cpu")
    meta["weights"] = name
    return net.to(device).eval(), meta
