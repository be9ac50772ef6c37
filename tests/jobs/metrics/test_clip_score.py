import numpy as np
import pytest

from jobs.metrics.clip_score import ClipScorer
from tests.jobs.metrics.helpers import build_tiny_clip, render_caption


def test_clip_score_with_a_tiny_random_clip(tmp_path):
    scorer = ClipScorer(build_tiny_clip(tmp_path / "clip"), batch_size=2)
    captions = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]
    images = np.stack([render_caption(c, 32) for c in captions])
    scores = scorer(images, captions)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 100))
    assert np.allclose(scores, scorer(images, captions))                      # deterministic
    assert not np.allclose(scores, scorer(images, captions[::-1]))            # depends on the text
    emb = scorer.image_embeds([images[0], images[1][:20, :10]])               # any sizes, unit rows
    assert emb.shape[0] == 2 and np.allclose(emb.norm(dim=-1).numpy(), 1, atol=1e-5)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer(images, captions[:2])
