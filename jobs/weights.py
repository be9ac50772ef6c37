"""`minit2i weights import|export`: MiniT2I's released weights in and out of our weights folders.

    minit2i weights import SRC --out DIR [--model minit2i-b-16]
        SRC: a released diffusers folder (`<model>/transformer/` or the whole MiniT2I/MiniT2I folder,
        then --model picks one) or a minit2i-torch training checkpoint `.pt` (raw and EMA weights)
    minit2i weights export DIR --format diffusers --out OUT [--weights NAME]
        DIR's weights (default: best EMA) as OUT/transformer/{config.json, diffusion_pytorch_model.safetensors}

The conversion itself is plain torch + safetensors in `model/released.py`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    imp = sub.add_parser("import", help="released diffusers folder or minit2i-torch .pt -> a weights folder")
    imp.add_argument("src", help="released folder (transformer, model or whole Hub folder) or a .pt checkpoint")
    imp.add_argument("--out", required=True, help="the weights folder to write (must not exist or be empty)")
    imp.add_argument("--model", help="which model of a whole Hub folder, e.g. minit2i-b-16 or minit2i-l-16")
    exp = sub.add_parser("export", help="a weights folder -> the released diffusers layout")
    exp.add_argument("weights_dir", help="a weights folder (model.json + safetensors)")
    exp.add_argument("--format", required=True, choices=["diffusers"], help="the released layout")
    exp.add_argument("--out", required=True, help="the model folder to write (gets transformer/)")
    exp.add_argument("--weights", help="which weights in the folder (e.g. model, ema_0.9999); default: best EMA")


def run(args: argparse.Namespace) -> int:
    from model import released

    if args.action == "import":
        r = released.import_weights(args.src, args.out, args.model)
        print(f"imported {args.src} -> {r.out} in {r.seconds:.1f} s: preset {r.preset or '(none)'}, "
              f"weights {', '.join(r.weights)}")
        for key, shape in r.dropped.items():
            print(f"  dropped (stored, never used by the forward): {key} {shape}")
        return 0
    out = released.export_diffusers(args.weights_dir, args.out, args.weights)
    print(f"exported {args.weights_dir} -> {out} (diffusers layout, keys {released.PREFIX}*)")
    return 0
