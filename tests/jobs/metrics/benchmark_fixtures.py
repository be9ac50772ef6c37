"""Benchmark files in their published layouts and tiny random judges, all built offline.

Layouts (see jobs/metrics/*.py for the public sources):
  GenEval   prompts/evaluation_metadata.jsonl lines (one per tag, as in the release)
  DPG-Bench ELLA's dpg_bench.csv (9 columns) and the Parquet with nested `questions`
  COCO      coco-30-val-2014-captions.json: one JSON object {image id: caption}
  mmdet     an mmdetection 2.x Mask2Former-Swin state_dict (key names and shapes of its modules)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# One line per tag, in the release's format (values taken from the published file).
GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
     "prompt": "a photo of a bench and a sports ball"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}],
     "prompt": "a photo of a blue fire hydrant"},
    {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a teddy bear"},
    {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                      {"class": "apple", "count": 1, "color": "black"}],
     "prompt": "a photo of a purple wine glass and a black apple"},
]


def write_geneval_metadata(path: Path, lines=GENEVAL_LINES) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# DPG-Bench questions: (item_id, prompt, proposition_id, dependency, broad, detailed, tuple, question).
# The first row stands for the release's first data row, which the official script skips.
DPG_ROWS = [
    ("first", "a cat on a mat", 1, "0", "entity", "whole", "entity - whole (cat)", "Is there a cat?"),
    ("first", "a cat on a mat", 2, "1", "entity", "whole", "entity - whole (mat)", "Is there a mat?"),
    ("p1", "a red circle left of a blue square", 1, "0", "entity", "whole", "entity - whole (circle)", "Is there a circle?"),
    ("p1", "a red circle left of a blue square", 2, "0", "entity", "whole", "entity - whole (square)", "Is there a square?"),
    ("p1", "a red circle left of a blue square", 3, "1", "attribute", "color", "attribute - color (circle, red)", "Is the circle red?"),
    ("p1", "a red circle left of a blue square", 4, "1,2", "relation", "spatial", "relation - spatial (circle, square, left of)",
     "Is the circle left of the square?"),
    ("p1", "a red circle left of a blue square", 5, "3", "attribute", "color", "attribute - color (square, blue)", "Is the red circle bright?"),
    ("p2", "two yellow triangles", 1, "0", "entity", "whole", "entity - whole (triangle)", "Are there triangles?"),
    ("p2", "two yellow triangles", 2, "1", "other", "count", "other - count (triangle, ==2)", "Are there two triangles?"),
]
DPG_HEADER = ["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad", "category_detailed",
              "tuple", "question_natural_language"]


def write_dpg_csv(path: Path, rows=DPG_ROWS) -> Path:
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(DPG_HEADER)
        for item, text, pid, dep, broad, detailed, tup, question in rows:
            w.writerow([item, text, "kw1|kw2", pid, dep, broad, detailed, tup, question])
    return path


def write_dpg_parquet(path: Path, rows=DPG_ROWS) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    items: dict[str, dict] = {}
    for item, text, pid, dep, broad, detailed, _, question in rows:
        entry = items.setdefault(item, {"item_id": item, "prompt": text, "questions": []})
        entry["questions"].append({"proposition_id": pid, "dependency": dep, "category_broad": broad,
                                   "category_detailed": detailed, "question": question})
    question = pa.struct([("proposition_id", pa.int64()), ("dependency", pa.string()), ("category_broad", pa.string()),
                          ("category_detailed", pa.string()), ("question", pa.string())])
    schema = pa.schema([("item_id", pa.string()), ("prompt", pa.string()), ("questions", pa.list_(question))])
    pq.write_table(pa.Table.from_pylist(list(items.values()), schema=schema), path)
    return path


def write_coco_captions(path: Path, n: int = 4) -> Path:
    captions = {str(391895 + 7 * i): f"A man riding a bicycle number {i} down a dirt road." for i in range(n)}
    path.write_text(json.dumps(captions))
    return path


# ---------------------------------------------------------------------------------------------
# Tiny judges


def build_tiny_inception(path: Path) -> Path:
    """pytorch-fid's weight layout (torchvision Inception3, 1008 classes, no aux head), random weights
    with He-scaled convolutions so activations stay finite, saved like pt_inception-*.pth."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


TINY_M2F = dict(embed=8, depths=(1, 1, 2, 1), heads=(1, 1, 2, 2), window=7, feat=32, msda_heads=2,
                enc_layers=1, dec_layers=2, queries=10, enc_ffn=64, dec_ffn=64)


def build_tiny_mask2former(path: Path, favour: int | None = None) -> Path:
    """A random transformers Mask2Former (Swin backbone, 80 COCO labels) saved with save_pretrained.
    favour: a class index whose logit is raised for every query, so that class is detected."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    d = TINY_M2F
    swin = SwinConfig(embed_dim=d["embed"], depths=list(d["depths"]), num_heads=list(d["heads"]),
                      window_size=d["window"], out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, id2label={i: str(i) for i in range(80)}, num_queries=d["queries"],
                            hidden_dim=d["feat"], feature_size=d["feat"], mask_feature_size=d["feat"],
                            encoder_layers=d["enc_layers"], decoder_layers=d["dec_layers"] + 1,
                            encoder_feedforward_dim=d["enc_ffn"], dim_feedforward=d["dec_ffn"],
                            num_attention_heads=d["msda_heads"])
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(cfg)
    if favour is not None:
        with torch.no_grad():
            model.class_predictor.weight.zero_()
            model.class_predictor.bias.zero_()
            model.class_predictor.bias[favour] = 20.0
    model.save_pretrained(path)
    return path


def mmdet_mask2former_state(embed=8, depths=(1, 1, 2, 1), heads=(1, 1, 2, 2), window=7, feat=32, msda_heads=2,
                            enc_layers=1, dec_layers=2, queries=10, enc_ffn=64, dec_ffn=64, classes=80,
                            seed=0) -> dict[str, torch.Tensor]:
    """Random tensors under mmdetection 2.x Mask2Former-Swin key names, shaped as its modules make them
    (SwinTransformer, MSDeformAttnPixelDecoder, DetrTransformerDecoder, Mask2FormerHead)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def norm(key, n):
        sd[f"{key}.weight"], sd[f"{key}.bias"] = 1 + rnd(n, scale=0.1), rnd(n, scale=0.1)

    def linear(key, o, i, bias=True):
        sd[f"{key}.weight"] = rnd(o, i, scale=i ** -0.5)
        if bias:
            sd[f"{key}.bias"] = rnd(o, scale=0.1)

    b = "backbone."
    sd[b + "patch_embed.projection.weight"], sd[b + "patch_embed.projection.bias"] = rnd(embed, 3, 4, 4, scale=0.1), rnd(embed)
    norm(b + "patch_embed.norm", embed)
    # WindowMSA's buffer as mmdetection builds it (double_step_seq, then flipped).
    seq = (torch.arange(0, (2 * window - 1) * window, 2 * window - 1)[:, None] + torch.arange(window)[None]).reshape(1, -1)
    index = (seq + seq.T).flip(1).contiguous()
    for s, (depth, h) in enumerate(zip(depths, heads)):
        c = embed * 2 ** s
        for k in range(depth):
            p = f"{b}stages.{s}.blocks.{k}."
            norm(p + "norm1", c)
            norm(p + "norm2", c)
            sd[p + "attn.w_msa.relative_position_bias_table"] = rnd((2 * window - 1) ** 2, h)
            sd[p + "attn.w_msa.relative_position_index"] = index.clone()
            linear(p + "attn.w_msa.qkv", 3 * c, c)
            linear(p + "attn.w_msa.proj", c, c)
            linear(p + "ffn.layers.0.0", 4 * c, c)
            linear(p + "ffn.layers.1", c, 4 * c)
        if s < len(depths) - 1:
            norm(f"{b}stages.{s}.downsample.norm", 4 * c)
            linear(f"{b}stages.{s}.downsample.reduction", 2 * c, 4 * c, bias=False)
        norm(f"{b}norm{s}", c)
    p = "panoptic_head.pixel_decoder."
    chans = [embed * 2 ** s for s in range(len(depths))]
    for i in range(3):                                         # input_convs.0 takes the last (coarsest) stage
        sd[f"{p}input_convs.{i}.conv.weight"], sd[f"{p}input_convs.{i}.conv.bias"] = rnd(feat, chans[-1 - i], 1, 1), rnd(feat)
        norm(f"{p}input_convs.{i}.gn", feat)
    for j in range(enc_layers):
        a = f"{p}encoder.layers.{j}."
        linear(a + "attentions.0.sampling_offsets", msda_heads * 3 * 4 * 2, feat)
        linear(a + "attentions.0.attention_weights", msda_heads * 3 * 4, feat)
        linear(a + "attentions.0.value_proj", feat, feat)
        linear(a + "attentions.0.output_proj", feat, feat)
        norm(a + "norms.0", feat)
        norm(a + "norms.1", feat)
        linear(a + "ffns.0.layers.0.0", enc_ffn, feat)
        linear(a + "ffns.0.layers.1", feat, enc_ffn)
    sd[p + "level_encoding.weight"] = rnd(3, feat)
    sd[p + "lateral_convs.0.conv.weight"] = rnd(feat, chans[0], 1, 1)
    norm(p + "lateral_convs.0.gn", feat)
    sd[p + "output_convs.0.conv.weight"] = rnd(feat, feat, 3, 3, scale=0.05)
    norm(p + "output_convs.0.gn", feat)
    sd[p + "mask_feature.weight"], sd[p + "mask_feature.bias"] = rnd(feat, feat, 1, 1), rnd(feat)
    d = "panoptic_head.transformer_decoder."
    for k in range(dec_layers):
        a = f"{d}layers.{k}."
        for m in (0, 1):                                       # 0 cross-attention, 1 self-attention
            sd[f"{a}attentions.{m}.attn.in_proj_weight"] = rnd(3 * feat, feat, scale=feat ** -0.5)
            sd[f"{a}attentions.{m}.attn.in_proj_bias"] = rnd(3 * feat)
            linear(f"{a}attentions.{m}.attn.out_proj", feat, feat)
        for m in range(3):
            norm(f"{a}norms.{m}", feat)
        linear(a + "ffns.0.layers.0.0", dec_ffn, feat)
        linear(a + "ffns.0.layers.1", feat, dec_ffn)
    norm(d + "post_norm", feat)
    h = "panoptic_head."
    sd[h + "query_embed.weight"], sd[h + "query_feat.weight"] = rnd(queries, feat, scale=1), rnd(queries, feat, scale=1)
    sd[h + "level_embed.weight"] = rnd(3, feat, scale=1)
    linear(h + "cls_embed", classes + 1, feat)
    for k in (0, 2, 4):
        linear(f"{h}mask_embed.{k}", feat, feat)
    return sd


def write_mmdet_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """The file layout mmcv's save_checkpoint writes: {"meta": {...}, "state_dict": {...}}."""
    from jobs.metrics.mmdet_mask2former import COCO_NAMES

    meta = {"mmdet_version": "2.25.0", "CLASSES": COCO_NAMES, "epoch": 50, "iter": 368750,
            "config": "model = dict(type='Mask2Former')"}
    torch.save({"meta": meta, "state_dict": state}, path)
    return path


def build_tiny_blip_vqa(path: Path, image_size: int = 32) -> Path:
    """A random generative BLIP VQA (answers by `generate`) with a small WordPiece vocabulary."""
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "is", "there", "a", "the", "red", "circle",
             "square", "?", "yes", "no"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(path / "vocab.txt"), bos_token="[DEC]").save_pretrained(path)
    torch.manual_seed(0)
    text = dict(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=32, bos_token_id=words.index("[DEC]"), pad_token_id=0, sep_token_id=3,
                encoder_hidden_size=16)
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  image_size=image_size, patch_size=8)
    BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def blank_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
