"""GenEval's detector: mmdetection's test pipeline and instance post-processing around transformers' Mask2Former."""

import numpy as np
import pytest
import torch

from jobs.metrics import mask2former
from jobs.metrics.mask2former import Mask2FormerDetector, instance_postprocess, preprocess, rescale_size
from tests.jobs.metrics.benchmark_fixtures import blank_images, build_tiny_mask2former


def test_resize_follows_the_test_pipeline():
    assert rescale_size(512, 512) == (800, 800)                      # GenEval's 512 px images
    assert rescale_size(480, 640) == (800, 1067)                     # short side to 800
    assert rescale_size(100, 1000) == (133, 1333)                    # long side capped at 1333
    image = np.full((480, 640, 3), (124, 116, 104), np.uint8)
    pixels, (h, w) = preprocess(image)
    assert (h, w) == (800, 1067) and pixels.shape == (3, 800, 1088)   # padded to a multiple of 32
    expect = (np.array([124, 116, 104]) - mask2former.MEAN) / mask2former.STD
    assert np.allclose(pixels[:, 400, 500], expect, atol=1e-5)
    assert (pixels[:, :, 1067:] == 0).all()                          # padding after Normalize is 0


def test_instance_postprocess_scores_boxes_and_masks():
    # 2 queries, 3 classes + "no object"; query 0 is confidently class 1 with a 4 x 6 mask
    class_logits = torch.tensor([[0.0, 9.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    mask_logits = torch.full((2, 10, 12), -3.0)
    mask_logits[0, 2:6, 3:9] = 2.0
    inst = instance_postprocess(class_logits, mask_logits, max_per_image=4)
    assert inst.labels[0] == 1 and inst.boxes[0].tolist() == [3, 2, 9, 6]     # x1, y1 exclusive (mask2bbox)
    prob = torch.softmax(class_logits[0], -1)[1]
    assert inst.scores[0] == pytest.approx(float(prob * torch.sigmoid(torch.tensor(2.0))), rel=1e-5)
    assert inst.masks[0].sum() == 24 and len(inst.labels) == 4
    empty = [k for k in range(4) if not inst.masks[k].any()]
    assert empty and all(inst.scores[k] == 0 and not inst.boxes[k].any() for k in empty)


def test_detector_runs_a_transformers_folder_at_the_official_scale(tmp_path):
    detector = Mask2FormerDetector(build_tiny_mask2former(tmp_path / "m2f"))
    (inst,) = detector(blank_images(1, 48))
    assert inst.masks.shape[1:] == (48, 48) and len(inst.labels) == 100           # top 100 (query, class) pairs
    assert inst.labels.max() < 80 and (inst.boxes[:, 2:] <= 48).all() and (inst.scores >= 0).all()


def test_detector_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        Mask2FormerDetector(tmp_path)
    (tmp_path / "x.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable mmdetection checkpoint"):
        Mask2FormerDetector(tmp_path / "x.pth")
