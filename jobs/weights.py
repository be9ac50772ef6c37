"""`minit2i weights import|export|merge`: MiniT2I's released weights in and out of our weights folders.

    minit2i weights import SRC OUT [model=minit2i-b-16]
        SRC: a released diffusers folder (`<model>/transformer/` or the whole MiniT2I/MiniT2I folder,
        then `model=` picks one) or a minit2i-torch training checkpoint `.pt` (raw and EMA weights)
    minit2i weights export SRC OUT [format=diffusers] [weights=NAME]
        SRC's weights (default: best EMA) as OUT/transformer/{config.json, diffusion_pytorch_model.safetensors}
    minit2i weights merge RUN_OR_CHECKPOINT OUT [weights=ema_0.999|model]
        a LoRA run's adapters (default: the highest-decay EMA) folded into its base weights: a plain
        weights folder every command loads

The conversion itself is plain torch + safetensors in `model/released.py`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ImportConfig:
    src: str = ""                        # released folder (transformer, model or whole Hub folder) or a .pt checkpoint
    out: str = ""                        # the weights folder to write (must not exist or be empty)
    model: str | None = None             # which model of a whole Hub folder, e.g. minit2i-b-16 or minit2i-l-16
    ema_decay: float | None = None       # the EMA decay a diffusers folder's weights have; None = the released model's


@dataclass
class ExportConfig:
    src: str = ""                        # a weights folder (model.json + safetensors)
    out: str = ""                        # the model folder to write (gets transformer/)
    format: str = "diffusers"            # the released layout (the only one)
    weights: str | None = None           # which weights in the folder (e.g. model, ema_0.9999); default: best EMA


@dataclass
class MergeConfig:
    src: str = ""                        # a LoRA run folder (its newest checkpoint) or checkpoint, local or s3://
    out: str = ""                        # the weights folder to write (must not exist or be empty)
    weights: str | None = None           # which adapters: ema_<decay> or model (the raw ones); default: best EMA


def import_(args: ImportConfig) -> int:
    from model import released

    r = released.import_weights(args.src, args.out, args.model, args.ema_decay)
    print(f"imported {args.src} -> {r.out} in {r.seconds:.1f} s: preset {r.preset or '(none)'}, "
          f"weights {', '.join(r.weights)}")
    for key, shape in r.dropped.items():
        print(f"  dropped (stored, never used by the forward): {key} {shape}")
    return 0


def export(args: ExportConfig) -> int:
    from model import released

    if args.format != "diffusers":
        raise ValueError(f"format {args.format!r}: the only export format is diffusers (the released layout)")
    out = released.export_diffusers(args.src, args.out, args.weights)
    print(f"exported {args.src} -> {out} (diffusers layout, keys {released.PREFIX}*)")
    return 0


def merge(args: MergeConfig) -> int:
    import os
    import shutil
    from pathlib import Path

    from jobs.train.checkpoints import local_copy, weights_folder
    from jobs.train.lora import merge as merge_lora
    from jobs.train.lora import read_adapters
    from model.checkpoint import load_weights, read_meta, save_weights
    from model.denoiser import DenoiserConfig
    from model.text_encoder import TextEncoderConfig

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new out folder")
    src = weights_folder(args.src)
    path, tmp = local_copy(src)
    try:
        meta = read_meta(path)
        if "lora_base" not in meta:
            raise ValueError(f"{src} holds no LoRA adapters (its model.json has no lora_base): nothing to merge")
        decays = sorted((p.name for p in Path(path).glob("ema_*") if p.is_dir()), key=lambda n: -float(n[4:]))
        name = args.weights or (decays[0] if decays else "model")
        if name != "model" and name not in decays:
            raise FileNotFoundError(f"{src} has no adapters {name}; it has: {', '.join(decays + ['model'])}")
        lora, adapters = read_adapters(Path(path) if name == "model" else Path(path) / name)
    finally:
        if tmp:
            tmp.cleanup()
    base = meta["lora_base"]
    base_path, base_tmp = local_copy(base["path"])
    try:
        net, base_meta = load_weights(base_path, base["weights"])
    finally:
        if base_tmp:
            base_tmp.cleanup()
    merged = merge_lora(net, lora, adapters, f"{src}/{name}")
    # The base's published sampling settings and preset still describe the merged model.
    extra = {k: base_meta[k] for k in ("preset", "sampling") if k in base_meta}
    extra.update(step=meta.get("step"), merged_from={"adapters": f"{src}/{name}", "base": base["path"],
                                                     "base_weights": base_meta["weights"]})
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_weights(staging, merged.state_dict(), merged.config, TextEncoderConfig(**meta["text_encoder"]),
                     DenoiserConfig(**meta["denoiser"]), name=name, extra=extra)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"merged {src} ({name}, LoRA rank {lora.rank} on {', '.join(lora.target_modules)}) into {base['path']} "
          f"-> {out} ({name}.safetensors)")
    return 0
