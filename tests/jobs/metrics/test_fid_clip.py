import numpy as np
import pytest
import torch

from jobs.metrics.clip_score import ClipScorer
from jobs.metrics.fid import FeatureExtractor, fid, frechet_distance, feature_stats
from tests.jobs.metrics.helpers import build_tiny_clip, build_tiny_vit, render_caption


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_frechet_distance_math():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    b = rng.normal(loc=1.0, size=(500, 4))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    # two Gaussians with equal covariance: FD is the squared mean distance (here ~4)
    assert frechet_distance(np.zeros(4), np.eye(4), np.ones(4), np.eye(4)) == pytest.approx(4.0)
    assert fid(a, b) == pytest.approx(4.0, rel=0.15)


def test_fid_with_a_transformers_backbone(tmp_path):
    extractor = FeatureExtractor(build_tiny_vit(tmp_path / "vit"))
    real = extractor(_images(40, 0))
    assert real.shape == (40, 16)
    assert fid(real, real) == pytest.approx(0.0, abs=1e-4)
    shifted = extractor(np.clip(_images(40, 1).astype(int) + 90, 0, 255).astype(np.uint8))
    assert fid(real, shifted) > 1e-3


def test_fid_with_a_torchscript_file(tmp_path):
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32 * 3, 6)))

    class Wrap(torch.nn.Module):          # takes uint8 NCHW, like an exported Inception
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.float() / 255)

    torch.manual_seed(0)
    torch.jit.script(Wrap()).save(str(tmp_path / "feat.pt"))
    feats = FeatureExtractor(tmp_path / "feat.pt")(_images(20, 0))
    assert feats.shape == (20, 6) and fid(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_feature_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureExtractor(tmp_path / "nope")
    with pytest.raises(ValueError, match="at least 2 images"):
        feature_stats(np.zeros((1, 3)))


def test_clip_score_with_a_tiny_random_clip(tmp_path):
    scorer = ClipScorer(build_tiny_clip(tmp_path / "clip"))
    captions = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]
    images = np.stack([render_caption(c, 32) for c in captions])
    scores = scorer(images, captions)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 100))
    assert np.allclose(scores, scorer(images, captions))                      # deterministic
    assert not np.allclose(scores, scorer(images, captions[::-1]))            # depends on the text
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer(images, captions[:2])
