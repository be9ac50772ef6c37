"""Patch-boundary artifact ratio: mean image-gradient magnitude on patch boundaries over the mean elsewhere.

A pixel-space patch model (MM-JiT predicts each P x P patch from one token) can leave seams where
patches meet; MiniT2I reports gradients 17-22% higher on its 16-pixel boundaries (ratio 1.17-1.22).
A seam-free image scores ~1.0. Gradients are absolute finite differences between neighbouring
pixels, averaged over RGB; a difference is "on a boundary" when its two pixels lie in different
patches (column/row x and x+1 with (x+1) % P == 0).
"""

from __future__ import annotations

import numpy as np


def boundary_gradients(images: np.ndarray, patch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per image (mean |gradient| across patch boundaries, mean |gradient| elsewhere). images [B, H, W, C] or [H, W, C]."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images [B, H, W, C], got shape {x.shape}")
    B, H, W, _ = x.shape
    if H <= patch or W <= patch:
        raise ValueError(f"images of {H}x{W} px have no {patch}-px patch boundaries")
    gx = np.abs(x[:, :, 1:] - x[:, :, :-1]).mean(-1)             # [B, H, W-1]
    gy = np.abs(x[:, 1:] - x[:, :-1]).mean(-1)                   # [B, H-1, W]
    on_x = (np.arange(1, W) % patch) == 0                        # difference between columns x-1 and x
    on_y = (np.arange(1, H) % patch) == 0
    on_sum = gx[:, :, on_x].sum((1, 2)) + gy[:, on_y, :].sum((1, 2))
    off_sum = gx[:, :, ~on_x].sum((1, 2)) + gy[:, ~on_y, :].sum((1, 2))
    n_on = on_x.sum() * H + on_y.sum() * W
    n_off = (~on_x).sum() * H + (~on_y).sum() * W
    return on_sum / n_on, off_sum / n_off


def per_image_ratio(images: np.ndarray, patch: int = 16) -> np.ndarray:
    """[B] ratios; NaN for a flat image (no gradient anywhere off the boundaries)."""
    on, off = boundary_gradients(images, patch)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(off > 0, on / np.where(off > 0, off, 1), np.nan)


def artifact_ratio(images: np.ndarray, patch: int = 16) -> float:
    """Set-level ratio: mean boundary gradient over mean off-boundary gradient, across all images."""
    on, off = boundary_gradients(images, patch)
    return float(on.mean() / off.mean()) if off.mean() > 0 else float("nan")
