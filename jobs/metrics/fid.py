"""Frechet distance between two image sets in the feature space of a user-provided vision model.

FID (Heusel et al. 2017): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) over Gaussian fits
of the features. Published FID numbers need the standard InceptionV3 pool3 features (2048-dim, the
2015-12-05 TensorFlow weights): export that network as TorchScript (uint8 [B, 3, H, W] in ->
[B, 2048] out) and pass the .pt file. Any transformers vision backbone folder (ViT, CLIP, DINOv2,
...) works too, which gives an FD in that model's space (e.g. FD-DINOv2), not comparable with FID.
Nothing is downloaded: weights come only from the path given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.linalg
import torch


def _features_of(out) -> torch.Tensor:
    """Pooled features from whatever a vision model returns ([B, D] tensor or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 2 else out.flatten(1)
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and getattr(out, "image_embeds", None) is not None:
        pooled = out.image_embeds
    if pooled is None:
        pooled = out.last_hidden_state.mean(1)                                     # [B, N, D] -> [B, D]
    return pooled.flatten(1)


class FeatureExtractor:
    """uint8 images [B, H, W, 3] -> float64 features [B, D], from a TorchScript file or a transformers folder."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32):
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"feature model {path} does not exist (give a TorchScript .pt or a transformers folder)")
        self.device, self.batch_size, self.path = torch.device(device), batch_size, str(path)
        if path.is_file():
            self.script = torch.jit.load(str(path), map_location=self.device).eval()
            self.model = self.processor = None
        else:
            from transformers import AutoImageProcessor, AutoModel

            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"feature model folder {path} has no config.json (expected a save_pretrained layout)")
            self.script = None
            self.processor = AutoImageProcessor.from_pretrained(str(path))
            self.model = AutoModel.from_pretrained(str(path)).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = np.asarray(images[start:start + self.batch_size])
            if self.script is not None:
                x = torch.from_numpy(chunk).permute(0, 3, 1, 2).contiguous().to(self.device)   # [B, 3, H, W] uint8
                try:  # the StyleGAN/NVIDIA Inception export takes return_features=True
                    feats = self.script(x, return_features=True)
                except (RuntimeError, TypeError):
                    feats = self.script(x)
            else:
                pixels = self.processor(images=list(chunk), return_tensors="pt")["pixel_values"].to(self.device)
                if hasattr(self.model, "get_image_features"):
                    feats = self.model.get_image_features(pixel_values=pixels)
                else:
                    feats = self.model(pixel_values=pixels)
            out.append(_features_of(feats).double().cpu().numpy())
        return np.concatenate(out)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D]."""
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray, eps: float = 1e-6) -> float:
    diff = mu_a - mu_b
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # Singular product (fewer images than feature dims): regularise both, as is common practice.
        offset = np.eye(len(cov_a)) * eps
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)  # sqrtm can return tiny imaginary parts from round-off
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def save_stats(path: str | Path, mu: np.ndarray, cov: np.ndarray) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=cov)
    tmp.replace(path)


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"FID reference stats {path} must hold arrays 'mu' and 'sigma'")
        return f["mu"], f["sigma"]


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))
