"""`minit2i weights import|export`: MiniT2I's released weights in and out of our weights folders.

    minit2i weights import SRC OUT [model=minit2i-b-16]
        SRC: a released diffusers folder (`<model>/transformer/` or the whole MiniT2I/MiniT2I folder,
        then `model=` picks one) or a minit2i-torch training checkpoint `.pt` (raw and EMA weights)
    minit2i weights export SRC OUT [format=diffusers] [weights=NAME]
        SRC's weights (default: best EMA) as OUT/transformer/{config.json, diffusion_pytorch_model.safetensors}

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
