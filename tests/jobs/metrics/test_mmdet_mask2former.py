"""The mmdetection -> transformers Mask2Former converter on a state dict in mmdetection's key layout.

Where a piece can be rebuilt the way mmdetection defines it (PatchMerging through nn.Unfold,
WindowMSA's fused qkv with its relative position bias, mmcv's MultiheadAttention = torch's
nn.MultiheadAttention with positions added to query and key), that piece loaded with the
mmdetection tensors is checked against the transformers module loaded through the converter.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs.metrics import mmdet_mask2former as conv
from jobs.metrics.mask2former import Mask2FormerDetector
from tests.jobs.metrics.benchmark_fixtures import (TINY_M2F, blank_images, mmdet_mask2former_state,
                                                   write_mmdet_checkpoint)


@pytest.fixture(scope="module")
def converted():
    from transformers import Mask2FormerForUniversalSegmentation

    state = mmdet_mask2former_state(**TINY_M2F)
    config, weights = conv.convert_state_dict(state)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    return state, config, weights, model, missing, unexpected


def test_every_key_is_consumed_and_every_shape_fits(converted):
    state, config, weights, model, missing, unexpected = converted
    assert unexpected == []
    assert sorted(missing) == sorted([conv.HF_BACKBONE + "swin.layernorm.weight", conv.HF_BACKBONE + "swin.layernorm.bias",
                                      "criterion.empty_weight"])           # unused by inference, see the module
    own = model.state_dict()
    assert all(own[k].shape == v.shape for k, v in weights.items())
    assert sum(v.numel() for v in weights.values()) == sum(
        v.numel() for k, v in state.items() if not k.endswith("relative_position_index"))
    swin = config.backbone_config
    assert (swin.embed_dim, swin.depths, swin.num_heads, swin.window_size, swin.mlp_ratio) == (8, [1, 1, 2, 1], [1, 1, 2, 2], 7, 4.0)
    assert (config.num_labels, config.num_queries, config.hidden_dim, config.encoder_layers, config.decoder_layers,
            config.num_attention_heads, config.encoder_feedforward_dim, config.dim_feedforward) == (80, 10, 32, 1, 3, 2, 64, 64)
    assert config.id2label[64] == "mouse"
    with pytest.raises(ValueError, match="does not know: backbone.extra"):
        conv.convert_state_dict({**state, "backbone.extra": torch.zeros(1)})
    cut = {k: v for k, v in state.items() if k != "panoptic_head.query_feat.weight"}
    with pytest.raises(ValueError, match="lacks panoptic_head.query_feat.weight"):
        conv.convert_state_dict(cut)
    bad = {**state, "backbone.stages.0.blocks.0.attn.w_msa.relative_position_index": torch.zeros(49, 49, dtype=torch.long)}
    with pytest.raises(ValueError, match="not Swin's standard index"):
        conv.convert_state_dict(bad)


def test_patch_merging_matches_mmdetections_unfold(converted):
    state, _, _, model, _, _ = converted
    c = TINY_M2F["embed"]
    x = torch.randn(2, 6, 10, c)                                                  # [B, H, W, C]
    # mmdetection PatchMerging: nn.Unfold(2, stride 2) -> LayerNorm(4C) -> Linear(4C, 2C, no bias)
    cols = torch.nn.Unfold(kernel_size=2, stride=2)(x.permute(0, 3, 1, 2)).transpose(1, 2)   # [B, L, 4C]
    p = "backbone.stages.0.downsample."
    cols = F.layer_norm(cols, (4 * c,), state[p + "norm.weight"], state[p + "norm.bias"])
    mmdet = cols @ state[p + "reduction.weight"].T
    hf = model.model.pixel_level_module.encoder.swin.encoder.layers[0].downsample
    with torch.no_grad():
        assert torch.allclose(hf(x.reshape(2, 60, c), (6, 10)), mmdet, atol=1e-5)


def test_window_attention_matches_mmdetections_window_msa(converted):
    state, _, _, model, _, _ = converted
    s, heads, w = 2, TINY_M2F["heads"][2], TINY_M2F["window"]
    c, n = TINY_M2F["embed"] * 4, w * w
    p = f"backbone.stages.{s}.blocks.1.attn.w_msa."
    x = torch.randn(3, n, c)                                                       # 3 windows of 7 x 7
    # WindowMSA: one fused qkv, [B, N, 3, heads, d]; bias = table[index] as [heads, N, N]
    qkv = F.linear(x, state[p + "qkv.weight"], state[p + "qkv.bias"]).reshape(3, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = (qkv[0] * (c // heads) ** -0.5) @ qkv[1].transpose(-2, -1)
    bias = state[p + "relative_position_bias_table"][state[p + "relative_position_index"].view(-1)].view(n, n, -1)
    attn = (attn + bias.permute(2, 0, 1)).softmax(-1)
    mmdet = F.linear((attn @ qkv[2]).transpose(1, 2).reshape(3, n, c), state[p + "proj.weight"], state[p + "proj.bias"])
    hf = model.model.pixel_level_module.encoder.swin.encoder.layers[s].blocks[1].attention
    with torch.no_grad():
        assert torch.allclose(hf(x)[0], mmdet, atol=1e-5)
        rel = hf.relative_position_bias.relative_position_index.view(n, n)
    assert torch.equal(rel, state[p + "relative_position_index"])                  # the same index both ways


def test_decoder_attention_matches_mmcvs_multihead_attention(converted):
    state, _, _, model, _, _ = converted
    d = TINY_M2F["feat"]
    layer = model.model.transformer_module.decoder.layers[1]
    q, pos = torch.randn(10, 2, d), torch.randn(10, 2, d)                         # [queries, B, D]
    ref = torch.nn.MultiheadAttention(d, TINY_M2F["msda_heads"])                 # what mmcv's MultiheadAttention wraps
    p = "panoptic_head.transformer_decoder.layers.1.attentions.1.attn."          # attentions.1: the self-attention
    ref.load_state_dict({k: state[p + k] for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
    with torch.no_grad():
        mmdet = ref(q + pos, q + pos, q)[0]                                        # query_pos on query and key
        assert torch.allclose(layer.self_attn(hidden_states=q, position_embeddings=pos)[0], mmdet, atol=1e-5)
    assert torch.equal(layer.cross_attn.in_proj_weight, state["panoptic_head.transformer_decoder.layers.1.attentions.0.attn.in_proj_weight"])
    assert torch.equal(layer.cross_attn_layer_norm.weight, state["panoptic_head.transformer_decoder.layers.1.norms.0.weight"])
    assert torch.equal(layer.final_layer_norm.weight, state["panoptic_head.transformer_decoder.layers.1.norms.2.weight"])


def test_the_pth_and_the_converted_folder_give_the_same_detections(tmp_path):
    pth = write_mmdet_checkpoint(tmp_path / "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth", mmdet_mask2former_state(**TINY_M2F))
    assert conv.main([str(pth), str(tmp_path / "hf")]) == 0
    images = blank_images(1, 40)
    a = Mask2FormerDetector(pth, image_scale=(213, 128))(images)[0]
    b = Mask2FormerDetector(tmp_path / "hf", image_scale=(213, 128))(images)[0]
    assert np.array_equal(a.labels, b.labels) and np.allclose(a.scores, b.scores, atol=1e-6)
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.boxes, b.boxes)
    assert np.isfinite(a.scores).all() and a.masks.shape == (100, 40, 40)


def test_unfold_order_round_trip():
    c = 3
    concat = torch.arange(4 * c, dtype=torch.float32)            # Swin order: (dy + 2 dx) * C + c
    unfold = torch.empty_like(concat)                            # nn.Unfold order: c * 4 + 2 dy + dx
    for ch in range(c):
        for dy in (0, 1):
            for dx in (0, 1):
                unfold[ch * 4 + 2 * dy + dx] = concat[(dy + 2 * dx) * c + ch]
    assert torch.equal(conv.unfold_to_concat(unfold), concat)
    assert torch.equal(conv.unfold_to_concat(unfold[None].repeat(2, 1)), concat[None].repeat(2, 1))
