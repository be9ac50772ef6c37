"""CLIP score (Hessel et al. 2021): 100 * max(cos(image embedding, text embedding), 0) per image.

The CLIP comes from a user path (any transformers `CLIPModel` folder with its tokenizer and image
processor, e.g. openai/clip-vit-large-patch14 saved locally); nothing is downloaded. Its unit
embeddings also serve GenEval's colour classifier (geneval.ColourClassifier; the official judge
uses OpenAI's CLIP ViT-L/14, the weights of openai/clip-vit-large-patch14).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _embeds(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"CLIP model folder {path} does not exist or has no config.json")
        self.device, self.batch_size = torch.device(device), batch_size
        self.model = CLIPModel.from_pretrained(str(path)).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.processor = AutoImageProcessor.from_pretrained(str(path))
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        """uint8 arrays [H, W, 3] or PIL images (any sizes) -> unit embeddings [N, D] (float32)."""
        out = []
        for s in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[s:s + self.batch_size]), return_tensors="pt")["pixel_values"]
            out.append(_embeds(self.model.get_image_features(pixel_values=pixels.to(self.device))).float())
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        """Texts -> unit embeddings [N, D] (float32)."""
        out = []
        for s in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[s:s + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            out.append(_embeds(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                            attention_mask=tokens["attention_mask"])).float())
        emb = torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True)

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """uint8 images [B, H, W, 3] + B prompts -> [B] CLIP scores in [0, 100]."""
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score needs one prompt per image: {len(images)} images, {len(prompts)} prompts")
        cos = (self.image_embeds(list(images)) * self.text_embeds(list(prompts))).sum(-1)
        return (100 * cos.clamp(min=0)).cpu().numpy()
