import numpy as np
import pytest
from scipy import ndimage

from jobs.metrics.artifacts import artifact_ratio, per_image_ratio


def smooth_images(n=4, size=64, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(n, size, size, 3))
    smooth = ndimage.gaussian_filter(noise, sigma=(0, 4, 4, 0))
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255).astype(np.float32)


def test_smooth_images_score_about_one():
    imgs = smooth_images()
    assert artifact_ratio(imgs, 16) == pytest.approx(1.0, abs=0.1)
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.float32)[None, :, None], (64, 1, 3))
    assert per_image_ratio(ramp, 16)[0] == pytest.approx(1.0, abs=1e-4)


def test_planted_16px_seams_score_clearly_above_one():
    imgs = smooth_images()
    rng = np.random.default_rng(1)
    offsets = rng.uniform(-12, 12, size=(4, 4, 4, 1))                  # one brightness offset per 16x16 patch
    seamed = imgs + np.kron(offsets, np.ones((1, 16, 16, 3)))[..., :3]
    base = artifact_ratio(imgs, 16)
    ratio = artifact_ratio(np.clip(seamed, 0, 255), 16)
    assert ratio > 1.5 * base and ratio > 1.5
    assert (per_image_ratio(seamed, 16) > 1.3).all()
    # the same seams are not boundaries of an 8-px offset grid... but every 16-px boundary is an 8-px one,
    # so measuring at 8 px dilutes the excess rather than hiding it.
    assert 1.0 < artifact_ratio(seamed, 8) < ratio


def test_flat_and_too_small_images():
    assert np.isnan(per_image_ratio(np.full((1, 32, 32, 3), 128.0), 16)[0])
    with pytest.raises(ValueError, match="no 16-px patch boundaries"):
        artifact_ratio(np.zeros((1, 16, 16, 3)), 16)
