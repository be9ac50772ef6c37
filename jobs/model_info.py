"""`minit2i model-info PRESET [text_dim=1024 image_size=512]`: exact parameters and analytic FLOPs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from model.mmjit import count_params, forward_flops, preset
from model.released import unused_shapes


@dataclass
class ModelInfoConfig:
    preset: str = "B/16"                 # a name in model.mmjit.PRESETS (B/16, B/32, L/16, debug)
    text_dim: int | None = None          # text feature width (FLAN-T5-large: 1024); None = the preset's
    image_size: int | None = None        # image side in pixels (MiniT2I: 512)
    text_length: int | None = None       # prompt length in tokens (MiniT2I: 256)


def run(args: ModelInfoConfig) -> int:
    overrides = {k: v for k, v in dict(text_dim=args.text_dim, image_size=args.image_size,
                                      text_length=args.text_length).items() if v is not None}
    cfg = preset(args.preset, **overrides)
    params = count_params(cfg)
    gains = count_params(cfg, norm_gains_only=True)
    # The released checkpoints (and our diffusers export) also store a timestep embedder and a
    # pooled-text embedder that no forward reads; their width (cond_vec_size) is the model width.
    unused = {k: math.prod(s) for k, s in unused_shapes(cfg.text_dim, cfg.width).items()}
    t_emb = sum(n for k, n in unused.items() if k.startswith("t_embedder."))
    flops = forward_flops(cfg)
    print(f"MM-JiT {args.preset}: image {cfg.image_size}px, patch {cfg.patch_size} -> {cfg.num_patches} image tokens, "
          f"text {cfg.text_length} x {cfg.text_dim}")
    print(f"  width {cfg.width}, {cfg.depth} double-stream blocks + {cfg.text_depth} text blocks, "
          f"{cfg.num_heads} heads x {cfg.head_dim}, SwiGLU hidden {cfg.mlp_hidden}")
    print(f"  parameters: {params:,} ({params / 1e6:.1f}M), of which {gains:,} are RMSNorm gains")
    print(f"  stored but unused in the released checkpoint layout: {sum(unused.values()):,} "
          f"(timestep embedder {t_emb:,}, pooled-text embedder {unused['pooled_embedder.weight']:,}); "
          f"with them {params + sum(unused.values()):,} ({(params + sum(unused.values())) / 1e6:.1f}M)")
    print(f"  forward GFLOPs per image (denoiser only, text encoder excluded): {flops['total'] / 1e9:.1f}")
    for part, value in flops.items():
        if part != "total":
            print(f"    {part:<13} {value / 1e9:9.2f}")
    print(f"  training GFLOPs per image (~3x forward): {3 * flops['total'] / 1e9:.1f}")
    return 0
