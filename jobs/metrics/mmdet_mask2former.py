"""mmdetection 2.x Mask2Former (Swin) checkpoint -> transformers Mask2FormerForUniversalSegmentation.

GenEval's official detector is `mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth`, an mmdetection
2.x checkpoint ({"meta", "state_dict"}). Its modules and transformers' are the same network
(Swin backbone with per-stage output norms, MSDeformAttn pixel decoder with one FPN level, 9-layer
masked-attention decoder with post-norm, all post-norm layers), so the weights map one to one:

  mmdetection (state_dict)                                  transformers
  backbone.patch_embed.{projection,norm}                   ...swin.embeddings.{patch_embeddings.projection,norm}
  backbone.stages.S.blocks.B.norm1 / norm2                 ...layers.S.blocks.B.layernorm_before / layernorm_after
  backbone.stages.S.blocks.B.attn.w_msa.qkv [3C, C]        ...attention.{q,k,v}_proj (rows split in thirds)
  backbone.stages.S.blocks.B.attn.w_msa.proj               ...attention.o_proj
  backbone.stages.S.blocks.B.attn.w_msa.relative_position_bias_table  ...relative_position_bias.relative_position_bias_table
  backbone.stages.S.blocks.B.ffn.layers.{0.0,1}            ...mlp.fc1 / fc2
  backbone.stages.S.downsample.{reduction,norm}            ...layers.S.downsample.{reduction,norm}  (channel order, below)
  backbone.normS                                           ...hidden_states_norms.stage{S+1}
  panoptic_head.pixel_decoder.input_convs.L.{conv,gn}      ...pixel_level_module.decoder.input_projections.L.{0,1}
  panoptic_head.pixel_decoder.encoder.layers.i.attentions.0.*   ...decoder.encoder.layers.i.self_attn.*
  ...encoder.layers.i.norms.{0,1}, ffns.0.layers.{0.0,1}   ...self_attn_layer_norm, final_layer_norm, fc1, fc2
  panoptic_head.pixel_decoder.level_encoding               ...decoder.level_embed
  panoptic_head.pixel_decoder.{lateral,output}_convs.0     ...decoder.adapter_1 / layer_1
  panoptic_head.pixel_decoder.mask_feature                 ...decoder.mask_projection
  panoptic_head.transformer_decoder.layers.i.attentions.0  (cross) ...transformer_module.decoder.layers.i.cross_attn (same in_proj)
  panoptic_head.transformer_decoder.layers.i.attentions.1  (self)  ...self_attn.{q,k,v,out}_proj (in_proj split)
  panoptic_head.transformer_decoder.layers.i.norms.{0,1,2} ...cross_attn_layer_norm, self_attn_layer_norm, final_layer_norm
  panoptic_head.transformer_decoder.post_norm              ...transformer_module.decoder.layernorm
  panoptic_head.{query_embed,query_feat,level_embed}       ...transformer_module.{queries_embedder,queries_features,level_embed}
  panoptic_head.cls_embed / mask_embed.{0,2,4}             class_predictor / ...mask_predictor.mask_embedder.{0,1,2}.0

Two tensors change layout. mmdetection's PatchMerging gathers each 2x2 neighbourhood with
nn.Unfold (channel-major: index c * 4 + 2 * dy + dx) where Swin (and transformers) concatenate the
four pixels (index k * C + c, k = dy + 2 * dx); mmdetection's swin_converter reorders the original
weights on load, and this undoes that for `reduction.weight` columns and `norm` weight/bias.
`relative_position_index` buffers are checked to be Swin's standard index, then dropped
(transformers builds the same one). Every key of the checkpoint must be consumed.
Key names follow mmdetection 2.x `SwinTransformer` / `Mask2FormerHead` (the names the reference
PeppaKing8/minit2i-jax `external/jax_geneval/convert.py` reads from the same file).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from jobs.metrics.geneval import CLASSES

HF_BACKBONE = "model.pixel_level_module.encoder."
HF_PIXEL = "model.pixel_level_module.decoder."
HF_DECODER = "model.transformer_module."
# The 80 COCO names in mmdetection's CLASSES order (labels of a converted model without meta):
# GenEval's object_names.txt is that list with three names spelled out.
COCO_NAMES = tuple({"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}.get(n, n)
                   for n in CLASSES)


def swin_relative_index(window: int) -> torch.Tensor:
    """Swin's relative position index [w*w, w*w]: (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :] + window - 1) * (2 * window - 1) + (xs[:, None] - xs[None, :] + window - 1)


def unfold_to_concat(x: torch.Tensor) -> torch.Tensor:
    """Last dim 4C in nn.Unfold order (c * 4 + 2 * dy + dx) -> Swin concat order ((dy + 2 * dx) * C + c)."""
    lead, c = x.shape[:-1], x.shape[-1] // 4
    x = x.reshape(*lead, c, 2, 2)                        # [..., C, dy, dx]
    return x.transpose(-1, -2).reshape(*lead, c, 4).transpose(-1, -2).reshape(*lead, 4 * c)   # [..., dx, dy, C]


class _Consumer:
    """Hands out checkpoint tensors by name and remembers which were taken."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.taken = state, set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise ValueError(f"mmdetection Mask2Former checkpoint lacks {key}")
        self.taken.add(key)
        return self.state[key]

    def count(self, pattern: str) -> int:
        """Number of distinct integers captured by the regex `pattern` over the keys."""
        return len({m.group(1) for k in self.state if (m := re.fullmatch(pattern, k))})

    def left(self) -> list[str]:
        return sorted(set(self.state) - self.taken)


def _linear(out: dict, take: _Consumer, src: str, dst: str, bias: bool = True) -> None:
    out[f"{dst}.weight"] = take(f"{src}.weight")
    if bias:
        out[f"{dst}.bias"] = take(f"{src}.bias")


def _split_qkv(out: dict, weight: torch.Tensor, bias: torch.Tensor, dst: str) -> None:
    """A fused [3D, D] projection (rows q, k, v) -> dst{q,k,v}_proj.{weight,bias}."""
    for name, w, b in zip("qkv", weight.chunk(3), bias.chunk(3)):
        out[f"{dst}{name}_proj.weight"], out[f"{dst}{name}_proj.bias"] = w, b


def _swin(take: _Consumer, out: dict) -> dict:
    """Backbone tensors -> out; returns the SwinConfig keyword arguments they imply."""
    src, dst = "backbone.", HF_BACKBONE + "swin."
    proj = take(src + "patch_embed.projection.weight")                   # [C, 3, p, p]
    out[dst + "embeddings.patch_embeddings.projection.weight"] = proj
    out[dst + "embeddings.patch_embeddings.projection.bias"] = take(src + "patch_embed.projection.bias")
    _linear(out, take, src + "patch_embed.norm", dst + "embeddings.norm")
    stages = take.count(r"backbone\.stages\.(\d+)\..*")
    depths, heads, window = [], [], None
    for s in range(stages):
        depth = take.count(rf"backbone\.stages\.{s}\.blocks\.(\d+)\..*")
        depths.append(depth)
        for b in range(depth):
            a, h = f"{src}stages.{s}.blocks.{b}.", f"{dst}encoder.layers.{s}.blocks.{b}."
            _linear(out, take, a + "norm1", h + "layernorm_before")
            _linear(out, take, a + "norm2", h + "layernorm_after")
            table = take(a + "attn.w_msa.relative_position_bias_table")   # [(2w-1)^2, heads]
            w = (int(round(table.shape[0] ** 0.5)) + 1) // 2
            window = window or w
            if w != window:
                raise ValueError(f"{a}: window {w} differs from the first block's {window}")
            if b == 0:
                heads.append(table.shape[1])
            index = take(a + "attn.w_msa.relative_position_index")
            if not torch.equal(index.long().reshape(w * w, w * w), swin_relative_index(w)):
                raise ValueError(f"{a}attn.w_msa.relative_position_index is not Swin's standard index")
            out[h + "attention.relative_position_bias.relative_position_bias_table"] = table
            _split_qkv(out, take(a + "attn.w_msa.qkv.weight"), take(a + "attn.w_msa.qkv.bias"), h + "attention.")
            _linear(out, take, a + "attn.w_msa.proj", h + "attention.o_proj")
            _linear(out, take, a + "ffn.layers.0.0", h + "mlp.fc1")
            _linear(out, take, a + "ffn.layers.1", h + "mlp.fc2")
        if s < stages - 1:
            a, h = f"{src}stages.{s}.downsample.", f"{dst}encoder.layers.{s}.downsample."
            out[h + "reduction.weight"] = unfold_to_concat(take(a + "reduction.weight"))
            out[h + "norm.weight"] = unfold_to_concat(take(a + "norm.weight"))
            out[h + "norm.bias"] = unfold_to_concat(take(a + "norm.bias"))
        _linear(out, take, f"{src}norm{s}", f"{HF_BACKBONE}hidden_states_norms.stage{s + 1}")
    mlp = out[dst + "encoder.layers.0.blocks.0.mlp.fc1.weight"].shape[0] / proj.shape[0]
    return dict(embed_dim=proj.shape[0], patch_size=proj.shape[-1], depths=depths, num_heads=heads,
                window_size=window, mlp_ratio=mlp, out_features=[f"stage{s + 1}" for s in range(stages)])


def _conv_module(out: dict, take: _Consumer, src: str, dst: str, bias: bool) -> None:
    """mmcv ConvModule (conv + gn) -> an nn.Sequential(conv, GroupNorm)."""
    _linear(out, take, f"{src}.conv", f"{dst}.0", bias)
    _linear(out, take, f"{src}.gn", f"{dst}.1")


def _head(take: _Consumer, out: dict) -> dict:
    """Pixel decoder + transformer decoder tensors -> out; returns the Mask2FormerConfig kwargs they imply."""
    src = "panoptic_head."
    p = src + "pixel_decoder."
    levels = take.count(r"panoptic_head\.pixel_decoder\.input_convs\.(\d+)\..*")
    if levels != 3 or take.count(r"panoptic_head\.pixel_decoder\.lateral_convs\.(\d+)\..*") != 1:
        raise ValueError("expected a pixel decoder with 3 encoder levels and one FPN level (Mask2Former on 4 backbone stages)")
    for i in range(levels):
        _conv_module(out, take, f"{p}input_convs.{i}", f"{HF_PIXEL}input_projections.{i}", bias=True)
    enc_layers = take.count(r"panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\..*")
    for i in range(enc_layers):
        a, h = f"{p}encoder.layers.{i}.", f"{HF_PIXEL}encoder.layers.{i}."
        for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            _linear(out, take, a + f"attentions.0.{name}", h + f"self_attn.{name}")
        _linear(out, take, a + "norms.0", h + "self_attn_layer_norm")
        _linear(out, take, a + "ffns.0.layers.0.0", h + "fc1")
        _linear(out, take, a + "ffns.0.layers.1", h + "fc2")
        _linear(out, take, a + "norms.1", h + "final_layer_norm")
    out[HF_PIXEL + "level_embed"] = take(p + "level_encoding.weight")
    _conv_module(out, take, p + "lateral_convs.0", HF_PIXEL + "adapter_1", bias=False)
    _conv_module(out, take, p + "output_convs.0", HF_PIXEL + "layer_1", bias=False)
    _linear(out, take, p + "mask_feature", HF_PIXEL + "mask_projection")

    d = src + "transformer_decoder."
    dec_layers = take.count(r"panoptic_head\.transformer_decoder\.layers\.(\d+)\..*")
    for i in range(dec_layers):
        a, h = f"{d}layers.{i}.", f"{HF_DECODER}decoder.layers.{i}."
        out[h + "cross_attn.in_proj_weight"] = take(a + "attentions.0.attn.in_proj_weight")
        out[h + "cross_attn.in_proj_bias"] = take(a + "attentions.0.attn.in_proj_bias")
        _linear(out, take, a + "attentions.0.attn.out_proj", h + "cross_attn.out_proj")
        _split_qkv(out, take(a + "attentions.1.attn.in_proj_weight"), take(a + "attentions.1.attn.in_proj_bias"),
                   h + "self_attn.")
        _linear(out, take, a + "attentions.1.attn.out_proj", h + "self_attn.out_proj")
        _linear(out, take, a + "norms.0", h + "cross_attn_layer_norm")
        _linear(out, take, a + "norms.1", h + "self_attn_layer_norm")
        _linear(out, take, a + "ffns.0.layers.0.0", h + "fc1")
        _linear(out, take, a + "ffns.0.layers.1", h + "fc2")
        _linear(out, take, a + "norms.2", h + "final_layer_norm")
    _linear(out, take, d + "post_norm", HF_DECODER + "decoder.layernorm")
    out[HF_DECODER + "queries_embedder.weight"] = query = take(src + "query_embed.weight")
    out[HF_DECODER + "queries_features.weight"] = take(src + "query_feat.weight")
    out[HF_DECODER + "level_embed.weight"] = take(src + "level_embed.weight")
    _linear(out, take, src + "cls_embed", "class_predictor")
    for i, k in enumerate((0, 2, 4)):
        _linear(out, take, f"{src}mask_embed.{k}", f"{HF_DECODER}decoder.mask_predictor.mask_embedder.{i}.0")

    hidden = query.shape[1]
    feature = out[HF_PIXEL + "level_embed"].shape[1]
    # MSDeformAttn: attention_weights has heads x levels x points outputs; transformers fixes 3
    # levels and 4 points and uses one head count for the pixel decoder and the decoder (8 and 8
    # in the mmdetection config).
    heads = out[HF_PIXEL + "encoder.layers.0.self_attn.attention_weights.weight"].shape[0] // (3 * 4)
    return dict(
        num_queries=query.shape[0], hidden_dim=hidden,
        feature_size=feature, mask_feature_size=out[HF_PIXEL + "mask_projection.weight"].shape[0],
        encoder_layers=enc_layers, decoder_layers=dec_layers + 1,   # transformers builds decoder_layers - 1
        encoder_feedforward_dim=out[HF_PIXEL + "encoder.layers.0.fc1.weight"].shape[0],
        dim_feedforward=out[HF_DECODER + "decoder.layers.0.fc1.weight"].shape[0],
        num_attention_heads=heads, common_stride=4, feature_strides=[4, 8, 16, 32],
    )


def convert_state_dict(state: dict[str, torch.Tensor], class_names=COCO_NAMES):
    """mmdetection state_dict -> (Mask2FormerConfig, transformers state dict). Every key is consumed."""
    from transformers import Mask2FormerConfig, SwinConfig

    take, out = _Consumer(state), {}
    swin = SwinConfig(**_swin(take, out))
    head = _head(take, out)
    if take.left():
        raise ValueError(f"mmdetection Mask2Former checkpoint has {len(take.left())} keys this converter does not "
                         f"know: {', '.join(take.left()[:8])}")
    n = out["class_predictor.weight"].shape[0] - 1                       # cls_embed: classes + "no object"
    names = list(class_names) if len(class_names) == n else [str(i) for i in range(n)]
    config = Mask2FormerConfig(backbone_config=swin, id2label=dict(enumerate(names)),
                               label2id={n: i for i, n in enumerate(names)}, **head)
    return config, out


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of an mmdetection .pth, loaded without running pickled code."""
    import numpy

    # mmcv's checkpoint meta may hold numpy scalars (e.g. a best score); allow those, nothing else.
    core = getattr(numpy, "_core", None) or numpy.core
    safe = [numpy.dtype, numpy.ndarray, core.multiarray.scalar, core.multiarray._reconstruct,
            *{type(numpy.dtype(t)) for t in "fdil?"}]
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:   # torch raises UnpicklingError/RuntimeError with long messages; keep one line
        raise ValueError(f"{path} is not a loadable mmdetection checkpoint: {str(err).splitlines()[0]}") from err
    if isinstance(obj, dict) and "state_dict" in obj:
        return obj["state_dict"], obj.get("meta") or {}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ValueError(f"{path} holds neither {{'state_dict': ...}} nor a state dict")


def load_mmdet_checkpoint(path: str | Path):
    """The official GenEval .pth as a transformers Mask2FormerForUniversalSegmentation (eval mode)."""
    from transformers import Mask2FormerForUniversalSegmentation

    state, meta = read_checkpoint(path)
    classes = meta.get("CLASSES") or COCO_NAMES
    config, weights = convert_state_dict(state, tuple(classes))
    model = Mask2FormerForUniversalSegmentation(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # swin.layernorm is the classifier's final norm, unused by the backbone; criterion.empty_weight is
    # a training buffer (no-object weight), both keep transformers' values.
    missing = [k for k in missing if not k.startswith((HF_BACKBONE + "swin.layernorm.", "criterion."))]
    if missing or unexpected:
        raise ValueError(f"converted {path} does not fit transformers' Mask2Former: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Convert an mmdetection 2.x Mask2Former .pth into a transformers folder.")
    p.add_argument("checkpoint", help="e.g. mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth")
    p.add_argument("out", help="output folder (config.json + model.safetensors)")
    args = p.parse_args(argv)
    load_mmdet_checkpoint(args.checkpoint).save_pretrained(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
