"""FID (Heusel et al. 2017) as MiniT2I reports it: COCO FID-30K on the FID InceptionV3 pool3 features.

FID = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) over Gaussian fits of 2048-dim features.

The network is pytorch-fid's `InceptionV3` (the TF 2015-12-05 FID Inception, with its FID-specific
blocks), its weights read from the local `pt_inception-2015-12-05-6726825d.pth` the user gives,
never downloaded. How images reach it decides whether numbers match published statistics:
  "minit2i"      the reference (PeppaKing8/minit2i-jax `evaluators/fid.py` with
                 `external/jax_fid/resize.py`, taken from the TorchScript Inception of StyleGAN's
                 metrics): uint8 images as float 0..255, resized to 299 x 299 the way TF1's
                 resize_bilinear does (source pixel = target pixel x in/out, no half-pixel shift,
                 edges clamped), then (x - 128) / 128. Its `mscoco_fid_stats_512.npz` was written
                 this way (`mu`/`sigma`; `ref_mu`/`ref_sigma` in its JAX-style files).
  "pytorch-fid"  pytorch-fid's own path (`python -m pytorch_fid`): x / 255, torch bilinear resize
                 to 299 (half-pixel centres), 2x - 1. Use it with statistics made by pytorch-fid.
Generated images are uint8 either way (jobs/sample.to_uint8 rounds (x + 1) * 127.5, the same
values as the reference's clip(127.5 x + 128) cast), and reference images are first brought to the
generated size the reference's way: torchvision Resize(size, bicubic) of the short side, then
CenterCrop(size).

A transformers vision folder (DINOv2, CLIP, ViT, ...) instead of the weights file gives an FD in
that model's space (e.g. FD-DINOv2), which is not comparable with FID.
The COCO caption file is the published `coco-30-val-2014-captions.json`: one JSON object
{image id: caption}; the reference generates one image per caption, in file order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import storage

PREPROCESS = ("minit2i", "pytorch-fid")
INCEPTION_SIZE = 299
# pytorch-fid's FID_WEIGHTS_URL names the file by its sha256 prefix.
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"


def tf1_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """[B, C, H, W] float -> [B, C, size, size], TF1 resize_bilinear(align_corners=False) semantics.

    Target pixel i reads source position i * H / size (top-left aligned), bilinear, clamped at the
    border. grid_sample(align_corners=False) addresses source pixel p at (2p + 1) / H - 1. Written
    here because neither torch nor pytorch-fid offers this resize.
    """
    b, _, h, w = x.shape
    src_y = torch.arange(size, dtype=torch.float64) * (h / size)
    src_x = torch.arange(size, dtype=torch.float64) * (w / size)
    gy, gx = torch.meshgrid((2 * src_y + 1) / h - 1, (2 * src_x + 1) / w - 1, indexing="ij")
    grid = torch.stack([gx, gy], -1).to(x.dtype).to(x.device)                    # [size, size, (x, y)]
    return F.grid_sample(x, grid.expand(b, size, size, 2), mode="bilinear", padding_mode="border",
                         align_corners=False)


def load_inception(weights: str | Path, pytorch_fid_input: bool) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (pool3 block) with weights from a local file only.

    pytorch-fid fetches its weights inside fid_inception_v3() through `load_state_dict_from_url`;
    that one name is swapped for a reader of the given file while the network is built, so the
    library's own construction runs and nothing is downloaded.
    """
    from unittest import mock

    from pytorch_fid import inception as pfi

    weights = Path(weights).expanduser()
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as err:   # a TorchScript archive, a pickle with code, a truncated file ...
        raise ValueError(f"{weights} is not pytorch-fid's {INCEPTION_FILE} state dict: {str(err).splitlines()[0]}") from err
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ValueError(f"{weights} is not pytorch-fid's {INCEPTION_FILE} state dict (no Mixed_7c weights)")
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state):
        try:
            net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=pytorch_fid_input,
                                  normalize_input=pytorch_fid_input)
        except RuntimeError as err:   # load_state_dict: wrong shapes or keys
            raise ValueError(f"{weights} does not fit pytorch-fid's InceptionV3: {str(err).splitlines()[0]}") from err
    return net.eval()


def sha256_prefix(path: str | Path, n: int = 8) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:n]


class InceptionFeatures:
    """uint8 images [B, H, W, 3] -> float64 pool3 features [B, 2048] (pytorch-fid's FID Inception)."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu", batch_size: int = 50,
                 preprocess: str = "minit2i"):
        if preprocess not in PREPROCESS:
            raise ValueError(f"FID preprocess must be one of {', '.join(PREPROCESS)}, got {preprocess!r}")
        self.device, self.batch_size, self.preprocess = torch.device(device), batch_size, preprocess
        self.net = load_inception(weights, preprocess == "pytorch-fid").to(self.device)
        self.official = sha256_prefix(weights) == INCEPTION_SHA256_PREFIX
        if not self.official:
            print(f"fid: {weights} is not the published {INCEPTION_FILE} (sha256 differs): "
                  "FID values are not comparable with published statistics")

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        out = []
        for s in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.stack(images[s:s + self.batch_size])).to(self.device)
            x = x.permute(0, 3, 1, 2).float()                                   # [B, 3, H, W], 0..255
            x = x / 255 if self.preprocess == "pytorch-fid" else (tf1_resize(x) - 128) / 128
            out.append(self.net(x)[0].flatten(1).double().cpu().numpy())       # [B, 2048, 1, 1] -> [B, 2048]
        return np.concatenate(out)


def _features_of(out) -> torch.Tensor:
    """Pooled features from whatever a transformers vision model returns ([B, D] or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 2 else out.flatten(1)
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and getattr(out, "image_embeds", None) is not None:
        pooled = out.image_embeds
    if pooled is None:
        pooled = out.last_hidden_state.mean(1)                                   # [B, N, D] -> [B, D]
    return pooled.flatten(1)


class BackboneFeatures:
    """uint8 images [B, H, W, 3] -> float64 features [B, D] from a transformers vision folder (an FD, not FID)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import AutoImageProcessor, AutoModel

        self.device, self.batch_size = torch.device(device), batch_size
        self.processor = AutoImageProcessor.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        out = []
        for s in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[s:s + self.batch_size]), return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device)
            if hasattr(self.model, "get_image_features"):
                feats = self.model.get_image_features(pixel_values=pixels)
            else:
                feats = self.model(pixel_values=pixels)
            out.append(_features_of(feats).double().cpu().numpy())
        return np.concatenate(out)


def feature_extractor(path: str | Path, device: str | torch.device = "cpu", preprocess: str = "minit2i"):
    """The pytorch-fid Inception for a weights file, a transformers backbone for a folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return InceptionFeatures(path, device, preprocess=preprocess)
    if (path / "config.json").is_file():
        return BackboneFeatures(path, device)
    raise FileNotFoundError(f"FID model {path} does not exist (give pytorch-fid's {INCEPTION_FILE} or a "
                            "transformers vision folder)")


def reference_resize(image: np.ndarray, size: int) -> np.ndarray:
    """A reference image as the reference's FID statistics see it: torchvision Resize(size, bicubic)
    of the short side, then CenterCrop(size), on PIL (minit2i-jax evaluators/fid.py get_fid_stats)."""
    from PIL import Image
    from torchvision import transforms

    if image.shape[:2] == (size, size):
        return image
    crop = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(size)])
    return np.asarray(crop(Image.fromarray(image).convert("RGB")))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D]."""
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray, eps: float = 1e-6) -> float:
    """The Frechet distance of two Gaussians, computed as pytorch-fid's calculate_frechet_distance
    (kept here so FD on transformers backbones needs no torchvision; the tests check both agree)."""
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"FID statistics differ in size: mu {mu_a.shape} vs {mu_b.shape}, sigma {cov_a.shape} vs {cov_b.shape}")
    import scipy.linalg      # here, not at the top: see jobs/metrics/world.py's find_objects

    diff = mu_a - mu_b
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # Singular product (fewer images than feature dims): regularise both, as pytorch-fid does.
        offset = np.eye(len(cov_a)) * eps
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)  # sqrtm can return tiny imaginary parts from round-off
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


STATS_KEYS = (("mu", "sigma"), ("ref_mu", "ref_sigma"))   # pytorch-fid / the reference; the JAX-style files


def save_stats(path: str | Path, mu: np.ndarray, cov: np.ndarray) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=cov)
    tmp.replace(path)


def load_stats(uri: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) from an .npz with mu/sigma or ref_mu/ref_sigma (local or s3://)."""
    import io

    uri = str(uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"FID statistics {uri} do not exist")
    try:
        f = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"FID statistics {uri} are not an .npz file: {err}") from err
    with f:
        for mu_key, sigma_key in STATS_KEYS:
            if mu_key in f and sigma_key in f:
                mu, sigma = f[mu_key].astype(np.float64), f[sigma_key].astype(np.float64)
                break
        else:
            raise ValueError(f"FID statistics {uri} hold {', '.join(f.files) or 'no arrays'}; expected mu and sigma "
                             "(or ref_mu and ref_sigma)")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"FID statistics {uri}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    return mu, sigma


def load_coco_captions(uri: str | Path) -> list[tuple[str, str]]:
    """[(image id, caption)] in file order from the published {id: caption} JSON object."""
    uri = str(uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"COCO caption file {uri} does not exist")

    class Pairs(list):
        """A JSON object as its (key, value) pairs: json.loads would keep only the last duplicate key."""

    def pairs(items):
        seen = set()
        for k, _ in items:
            if k in seen:
                raise ValueError(f"COCO caption file {uri} repeats the key {k!r}")
            seen.add(k)
        return Pairs(items)

    try:
        obj = json.loads(storage.read_bytes(uri).decode(), object_pairs_hook=pairs)
    except json.JSONDecodeError as err:
        raise ValueError(f"COCO caption file {uri} is not valid JSON: {err}") from err
    if not isinstance(obj, Pairs) or not obj:
        raise ValueError(f"COCO caption file {uri} must be one non-empty JSON object {{id: caption}}")
    bad = next(((k, v) for k, v in obj if not isinstance(v, str) or not v.strip()), None)
    if bad:
        raise ValueError(f"COCO caption file {uri}: the caption of {bad[0]!r} is not a non-empty string")
    return [(k, v) for k, v in obj]
