"""Test helpers: Pillow renderings of world scenes and tiny random vision models built offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jobs.metrics.world import BACKGROUND, PALETTE, parse_caption


def draw(shapes: list[tuple[str, str, float, float, float]], size: int = 64) -> np.ndarray:
    """shapes: (colour, shape, cx, cy, half-size) in pixels -> [size, size, 3] uint8."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    for colour, shape, cx, cy, r in shapes:
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = PALETTE[colour]
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return np.asarray(img)


def render_caption(caption: str, size: int = 64) -> np.ndarray:
    """A correct image for a world caption: groups laid out left-to-right (or top-to-bottom)."""
    p = parse_caption(caption)
    objs = p.objects if p.relation not in ("right of", "below") else p.objects[::-1]
    vertical = p.relation in ("above", "below")
    items = [(o.colour, o.shape) for o in objs for _ in range(o.count)]
    r = size / (4 * max(2, len(items)))
    shapes = []
    for i, (colour, shape) in enumerate(items):
        along = (i + 0.5) * size / len(items)
        cx, cy = (size / 2, along) if vertical else (along, size / 2)
        shapes.append((colour, shape, cx, cy, r))
    return draw(shapes, size)


def build_tiny_vit(path: Path, image_size: int = 32) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel
    import torch

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    image_size=image_size, patch_size=8)
    ViTModel(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def build_tiny_clip(path: Path, image_size: int = 32) -> Path:
    """A random CLIP with the byte-level ByT5 tokenizer (needs no vocabulary file)."""
    from transformers import ByT5Tokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel
    import torch

    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def build_tiny_vqa(path: Path, image_size: int = 32) -> Path:
    """A random ViLT VQA classifier answering yes/no, with a small WordPiece vocabulary."""
    from transformers import BertTokenizer, ViltConfig, ViltForQuestionAnswering, ViltImageProcessor
    import torch

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "there", "a", "an", "the", "?", "yes", "no",
             *PALETTE, "circle", "square", "triangle", "left", "right", "above", "below", "of"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    cfg = ViltConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, image_size=image_size, patch_size=8, max_position_embeddings=40,
                     id2label={0: "yes", 1: "no"}, label2id={"yes": 0, "no": 1})
    ViltForQuestionAnswering(cfg).save_pretrained(path)
    ViltImageProcessor(size={"shortest_edge": image_size}, size_divisor=8).save_pretrained(path)
    return path


def make_checkpoint(root: Path, depth: int = 1, weights=("ema_0.999", "model")) -> Path:
    """A tiny debug MM-JiT (32 px, patch 4) + tiny T5 weights folder with an EMA and a raw file."""
    import torch

    from model.checkpoint import save_weights
    from model.denoiser import DenoiserConfig
    from model.mmjit import MMJiT, preset
    from model.text_encoder import TextEncoderConfig, build_tiny_t5

    t5 = build_tiny_t5(root / "t5", d_model=32, num_layers=1, num_heads=2)
    cfg = preset("debug", text_dim=32, text_length=16, depth=depth, width=64, num_heads=2, head_dim=32, bottleneck=16)
    torch.manual_seed(0)
    net = MMJiT(cfg)
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.05)
    for i, name in enumerate(weights):
        state = {k: v + 0.01 * i for k, v in net.state_dict().items()}
        save_weights(root / "ckpt", state, cfg, TextEncoderConfig(str(t5), 16), DenoiserConfig(noise_scale=1.0), name=name)
    return root / "ckpt"


def write_prompts(path: Path, captions: list[str]) -> Path:
    path.write_text("\n".join(captions) + "\n")
    return path


def write_generated(out: Path, prompts: list[str], images: list[np.ndarray], metadata: list[dict] | None = None,
                    settings: dict | None = None) -> Path:
    """A finished `generate` folder holding given images (known-correct / known-wrong renderings)."""
    import json

    from jobs.generate import write_shard
    from pipelines import manifest

    n = len(prompts)
    meta = [json.dumps(m or {}) for m in (metadata or [{}] * n)]
    write_shard(str(out), 0, list(range(n)), [0] * n, prompts, meta, np.stack(images),
                json.dumps(settings or {"patch_size": 16}), "parquet", "test")
    manifest.write(str(out), manifest.Manifest(kind="generate", config={}, shards=[
        manifest.shard_entry(str(out), str(out / "shard-00000.parquet"), n)]))
    return out
