"""FID on pytorch-fid's Inception (random weights in its file layout), both preprocessings, the published files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.metrics import fid
from tests.jobs.metrics.benchmark_fixtures import blank_images, build_tiny_inception, write_coco_captions
from tests.jobs.metrics.helpers import build_tiny_vit


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return build_tiny_inception(tmp_path_factory.mktemp("fid") / fid.INCEPTION_FILE)


def tf1_reference(x: np.ndarray, size: int) -> np.ndarray:
    """TF1 resize_bilinear(align_corners=False) written out: source = target * in / out, clamped."""
    h, w = x.shape
    ys, xs = np.arange(size) * h / size, np.arange(size) * w / size
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = x[y0][:, x0] * (1 - wx) + x[y0][:, x1] * wx
    bottom = x[y1][:, x0] * (1 - wx) + x[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def test_reference_resize_is_tf1_bilinear():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert fid.tf1_resize(x, 2)[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]   # picks pixels 0 and 2, no averaging
    up = fid.tf1_resize(torch.tensor([[[[0.0, 10.0]]]]), 4)[0, 0, 0]
    assert up.tolist() == [0.0, 5.0, 10.0, 10.0]                               # clamped at the right edge
    img = np.random.default_rng(0).uniform(0, 255, (37, 53))
    ours = fid.tf1_resize(torch.from_numpy(img)[None, None].float(), 299)[0, 0].double().numpy()
    assert np.allclose(ours, tf1_reference(img, 299), atol=1e-3)


def test_inception_from_a_local_file_in_both_preprocessings(inception, tmp_path):
    images = blank_images(2, 40)
    ref = fid.InceptionFeatures(inception)
    feats = ref(images)
    assert feats.shape == (2, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    assert not ref.official                                   # random weights: not the published file
    # "pytorch-fid" is exactly pytorch-fid's own path over PNG files
    from pytorch_fid.fid_score import get_activations

    files = []
    for i, im in enumerate(images):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im).save(files[-1])
    pfid = fid.InceptionFeatures(inception, preprocess="pytorch-fid")
    theirs = get_activations(files, pfid.net, batch_size=2, dims=2048, device="cpu", num_workers=0)
    assert np.allclose(pfid(images), theirs, rtol=1e-4, atol=1e-5)
    assert not np.allclose(feats, theirs, rtol=1e-3)          # the two resizes differ
    with pytest.raises(ValueError, match="preprocess must be one of"):
        fid.InceptionFeatures(inception, preprocess="tf")


def test_weights_file_errors(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no Mixed_7c weights"):
        fid.InceptionFeatures(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is not pytorch-fid's"):
        fid.InceptionFeatures(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fid.feature_extractor(tmp_path / "nope")


def test_frechet_distance_agrees_with_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 6)), rng.normal(loc=0.5, scale=1.3, size=(300, 6))
    mine = fid.frechet_distance(*fid.feature_stats(a), *fid.feature_stats(b))
    assert mine == pytest.approx(calculate_frechet_distance(*fid.feature_stats(a), *fid.feature_stats(b)), rel=1e-9)
    assert fid.frechet_distance(np.zeros(4), np.eye(4), np.ones(4), np.eye(4)) == pytest.approx(4.0)
    assert fid.fid(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.feature_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="differ in size"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_reference_statistics_of_both_key_styles(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    np.savez(tmp_path / "mscoco_fid_stats_512.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "jax.npz", ref_mu=mu.astype(np.float32), ref_sigma=sigma.astype(np.float32))
    for name in ("mscoco_fid_stats_512.npz", "jax.npz"):
        m, s = fid.load_stats(tmp_path / name)
        assert np.array_equal(m, mu) and np.array_equal(s, sigma) and m.dtype == np.float64
    np.savez(tmp_path / "none.npz", mean=mu, cov=sigma)
    with pytest.raises(ValueError, match="hold mean, cov; expected mu and sigma"):
        fid.load_stats(tmp_path / "none.npz")
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=np.eye(2))
    with pytest.raises(ValueError, match="not \\[D\\] and \\[D, D\\]"):
        fid.load_stats(tmp_path / "shape.npz")
    fid.save_stats(tmp_path / "out.npz", mu, sigma)
    assert np.array_equal(fid.load_stats(tmp_path / "out.npz")[1], sigma)


def test_coco_caption_file(tmp_path):
    pairs = fid.load_coco_captions(write_coco_captions(tmp_path / "coco-30-val-2014-captions.json"))
    assert [k for k, _ in pairs] == ["391895", "391902", "391909", "391916"] and pairs[0][1].startswith("A man")
    (tmp_path / "dup.json").write_text('{"1": "a cat", "2": "a dog", "1": "a bird"}')
    with pytest.raises(ValueError, match="repeats the key '1'"):
        fid.load_coco_captions(tmp_path / "dup.json")
    (tmp_path / "list.json").write_text(json.dumps([{"image_id": 1, "caption": "a cat"}]))
    with pytest.raises(ValueError, match="one non-empty JSON object"):
        fid.load_coco_captions(tmp_path / "list.json")
    (tmp_path / "nested.json").write_text('{"1": {"caption": "a cat"}}')
    with pytest.raises(ValueError, match="caption of '1' is not a non-empty string"):
        fid.load_coco_captions(tmp_path / "nested.json")


def test_reference_images_are_resized_and_centre_cropped_like_the_reference():
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, 20:60] = 255                                       # the centre 40 x 40 is white
    out = fid.reference_resize(wide, 20)
    assert out.shape == (20, 20, 3) and out.mean() > 250             # bicubic rings a little at the crop edges
    same = blank_images(1, 20)[0]
    assert fid.reference_resize(same, 20) is same


def test_fd_on_a_transformers_backbone(tmp_path):
    extractor = fid.feature_extractor(build_tiny_vit(tmp_path / "vit"))
    real = extractor(blank_images(40, 32, seed=0))
    assert real.shape == (40, 16)
    assert fid.fid(real, real) == pytest.approx(0.0, abs=1e-4)
    shifted = extractor(np.clip(blank_images(40, 32, seed=1).astype(int) + 90, 0, 255).astype(np.uint8))
    assert fid.fid(real, shifted) > 1e-3
