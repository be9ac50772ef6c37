"""GenEval's detector: Mask2Former (COCO instance segmentation) run the way mmdetection runs it.

The official GenEval judge is mmdetection 2.x `mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`
through `inference_detector`. Here the network is transformers' `Mask2FormerForUniversalSegmentation`,
loaded from a save_pretrained folder (e.g. facebook/mask2former-swin-small-coco-instance saved
locally) or from the official mmdetection `.pth` through `mmdet_mask2former.py`. Around it runs
mmdetection's test pipeline and post-processing, because those decide what the rules see:
  input    the config's test_pipeline: Resize keep_ratio to (1333, 800) (mmcv.imrescale: one scale,
           min(1333 / long side, 800 / short side), size int(x * scale + 0.5), cv2 bilinear on
           uint8), Normalize (ImageNet mean/std, RGB), Pad to a multiple of 32 with zeros;
  masks    mask logits bilinearly upsampled to the padded input, cropped to the resized image,
           resized bilinearly to the original size (Mask2FormerHead / MaskFormerFusionHead simple_test);
  instances MaskFormerFusionHead.instance_postprocess: softmax over classes without "no object",
           top 100 (query, class) pairs, mask = logit > 0, score = class prob x mean sigmoid inside
           the mask, box = the mask's extent (mask2bbox, x1/y1 exclusive).
transformers' own post_process_instance_segmentation differs (it resizes masks to 384 px, then
nearest to the target, and drops scores below 0.5), so it is not used. The folder's image processor
is not used either: the pipeline above is the judge's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SCALE = (1333, 800)                                  # (long side limit, short side target)
SIZE_DIVISOR = 32
MEAN = np.array([123.675, 116.28, 103.53], np.float32)      # img_norm_cfg, RGB
STD = np.array([58.395, 57.12, 57.375], np.float32)
MAX_PER_IMAGE = 100                                         # test_cfg.max_per_image


@dataclass
class Instances:
    labels: np.ndarray      # [K] int, index into the 80 COCO classes
    boxes: np.ndarray       # [K, 4] float, x0, y0, x1, y1 in original pixels
    scores: np.ndarray      # [K] float
    masks: np.ndarray       # [K, H, W] bool at the original size


def rescale_size(height: int, width: int, scale: tuple[int, int] = IMAGE_SCALE) -> tuple[int, int]:
    """mmcv.rescale_size with keep_ratio: (new height, new width)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def preprocess(image: np.ndarray, scale: tuple[int, int] = IMAGE_SCALE) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 [H, W, 3] RGB -> (normalised, padded float32 [3, Hp, Wp], the resized (h, w))."""
    import cv2

    h, w = rescale_size(*image.shape[:2], scale)
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    hp, wp = (-(-h // SIZE_DIVISOR) * SIZE_DIVISOR), (-(-w // SIZE_DIVISOR) * SIZE_DIVISOR)
    out = np.zeros((hp, wp, 3), np.float32)                  # padding after Normalize: zeros
    out[:h, :w] = (resized - MEAN) / STD
    return out.transpose(2, 0, 1), (h, w)


def mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """[K, H, W] bool -> [K, 4] float (x0, y0, x1 + 1, y1 + 1); zeros for an empty mask (mmdet mask2bbox)."""
    boxes = torch.zeros((len(masks), 4), dtype=torch.float32, device=masks.device)
    cols, rows = masks.any(1), masks.any(2)                  # [K, W], [K, H]
    for k in range(len(masks)):
        xs, ys = torch.nonzero(cols[k])[:, 0], torch.nonzero(rows[k])[:, 0]
        if len(xs) and len(ys):
            boxes[k] = torch.stack([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]).float()
    return boxes


def instance_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                         max_per_image: int = MAX_PER_IMAGE) -> Instances:
    """class_logits [Q, C + 1], mask_logits [Q, H, W] at the original size -> top instances."""
    num_classes = class_logits.shape[-1] - 1
    scores = class_logits.softmax(-1)[:, :-1]                               # [Q, C]
    top, index = scores.flatten().topk(min(max_per_image, scores.numel()))  # over (query, class) pairs
    labels, queries = index % num_classes, index // num_classes
    logits = mask_logits[queries]                                           # [K, H, W]
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return Instances(labels.cpu().numpy(), mask_to_box(masks).cpu().numpy(),
                     (top * mask_scores).float().cpu().numpy(), masks.cpu().numpy())


def load_model(path: str | Path):
    """Mask2FormerForUniversalSegmentation from a save_pretrained folder or an mmdetection .pth."""
    from transformers import Mask2FormerForUniversalSegmentation

    path = Path(path).expanduser()
    if path.is_file():
        from jobs.metrics.mmdet_mask2former import load_mmdet_checkpoint

        return load_mmdet_checkpoint(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"Mask2Former {path} is neither a folder with config.json nor an mmdetection .pth file")
    return Mask2FormerForUniversalSegmentation.from_pretrained(str(path))


class Mask2FormerDetector:
    """uint8 images [B, H, W, 3] -> Instances per image, with mmdetection's pipeline around the model."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", image_scale: tuple[int, int] = IMAGE_SCALE):
        self.device, self.image_scale = torch.device(device), image_scale   # image_scale: the official one; tests shrink it
        self.model = load_model(path).to(self.device).eval()
        if self.model.config.num_labels != 80:
            raise ValueError(f"GenEval needs a COCO instance model with 80 classes; {path} has "
                             f"{self.model.config.num_labels}")

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> list[Instances]:
        out = []
        for image in images:                 # one at a time: [Q, H, W] float masks at 800 px are ~250 MB
            pixels, (h, w) = preprocess(np.asarray(image), self.image_scale)
            x = torch.from_numpy(pixels)[None].to(self.device)                  # [1, 3, Hp, Wp]
            pred = self.model(pixel_values=x)
            masks = F.interpolate(pred.masks_queries_logits.float(), size=x.shape[-2:], mode="bilinear",
                                  align_corners=False)[:, :, :h, :w]            # [1, Q, h, w]
            masks = F.interpolate(masks, size=image.shape[:2], mode="bilinear", align_corners=False)[0]
            out.append(instance_postprocess(pred.class_queries_logits[0].float(), masks))
        return out
