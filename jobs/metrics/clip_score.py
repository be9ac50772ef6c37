"""CLIP score (Hessel et al. 2021): 100 * max(cos(image embedding, text embedding), 0) per image.

The CLIP comes from a user path (any transformers `CLIPModel` folder with its tokenizer and image
processor, e.g. openai/clip-vit-large-patch14 saved locally); nothing is downloaded.
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
    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """uint8 images [B, H, W, 3] + B prompts -> [B] CLIP scores in [0, 100]."""
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score needs one prompt per image: {len(images)} images, {len(prompts)} prompts")
        out = []
        for s in range(0, len(prompts), self.batch_size):
            pixels = self.processor(images=list(images[s:s + self.batch_size]), return_tensors="pt")["pixel_values"]
            tokens = self.tokenizer(list(prompts[s:s + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            img = _embeds(self.model.get_image_features(pixel_values=pixels.to(self.device)))
            txt = _embeds(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                       attention_mask=tokens["attention_mask"].to(self.device)))
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
            out.append((100 * cos.clamp(min=0)).cpu().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def classify(self, image: np.ndarray, texts: list[str]) -> int:
        """Zero-shot: index of the text closest to one uint8 image [H, W, 3] (GenEval's colour judge)."""
        pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"].to(self.device)
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        img = _embeds(self.model.get_image_features(pixel_values=pixels))
        txt = _embeds(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                   attention_mask=tokens["attention_mask"].to(self.device)))
        return int(torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).argmax())
