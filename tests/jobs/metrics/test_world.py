import numpy as np
import pytest

from jobs.metrics.world import Prompt, check_image, find_objects, parse_caption, random_prompts, summarize
from tests.jobs.metrics.helpers import draw, render_caption


def test_parse_caption_grammar():
    p = parse_caption("A blue square to the left of a yellow triangle.")
    assert p.relation == "left of" and p.category == "position"
    assert [(o.colour, o.shape, o.count) for o in p.objects] == [("blue", "square", 1), ("yellow", "triangle", 1)]
    assert parse_caption("three purple circles").objects[0].count == 3
    assert parse_caption("three purple circles").category == "counting"
    assert parse_caption("a red circle and a white square").category == "two_objects"
    assert parse_caption("a photo of a red circle").category == "single_object"
    for caption in random_prompts(16, seed=3):
        assert parse_caption(caption).caption() == caption            # the grammar round-trips
    assert Prompt.from_spec({"objects": [{"color": "red", "shape": "circle", "count": 2}]}).caption() == "two red circles"
    for bad, msg in [("a pink circle", "unknown colour"), ("two red circle", "does not agree"),
                     ("a red circle near a blue square", "expected a relation"), ("five red circles", "not a count"),
                     ("a red", "expected")]:
        with pytest.raises(ValueError, match=msg):
            parse_caption(bad)


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_are_classified(size):
    r = size / 8
    img = draw([("red", "circle", size * 0.2, size * 0.3, r), ("green", "square", size * 0.5, size * 0.7, r),
                ("blue", "triangle", size * 0.8, size * 0.3, r)], size)
    found = {(b.colour, b.shape) for b in find_objects(img)}
    assert found == {("red", "circle"), ("green", "square"), ("blue", "triangle")}


@pytest.mark.parametrize("caption", [
    "a red circle", "two blue squares", "four orange triangles", "a green triangle above a yellow circle",
    "a blue square to the left of a yellow triangle", "a white circle below a black square",
    "two purple circles to the right of a red square", "a red circle and a red square",
])
def test_correct_renderings_pass(caption):
    v = check_image(render_caption(caption, 64), caption)
    assert v.correct, (caption, v)


S = 64


@pytest.mark.parametrize("caption, shapes, failing", [
    # wrong colour
    ("a red circle", [("blue", "circle", 32, 32, 8)], "colour"),
    # wrong count (two instead of three)
    ("three purple circles", [("purple", "circle", 16, 32, 6), ("purple", "circle", 48, 32, 6)], "count"),
    # wrong shape
    ("two blue squares", [("blue", "circle", 16, 32, 7), ("blue", "circle", 48, 32, 7)], "shape"),
    # wrong position: the green triangle is below the yellow circle
    ("a green triangle above a yellow circle", [("green", "triangle", 32, 48, 7), ("yellow", "circle", 32, 16, 7)], "position"),
    ("a blue square to the left of a yellow triangle", [("blue", "square", 48, 32, 7), ("yellow", "triangle", 16, 32, 7)], "position"),
    # a missing second object
    ("a red circle and a white square", [("red", "circle", 20, 32, 7)], "colour"),
])
def test_wrong_renderings_fail_the_right_check(caption, shapes, failing):
    v = check_image(draw(shapes, S), caption)
    assert not v.correct
    assert getattr(v, failing) is False
    others = {"colour", "count", "shape", "position"} - {failing}
    if failing != "colour":                     # a missing object also breaks count/position
        assert all(getattr(v, c) in (True, None) for c in others), v


def test_noise_image_fails_and_summary_scores_per_category():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    captions = ["a red circle", "two blue squares", "a red circle and a white square", "a green triangle above a yellow circle"]
    good = [check_image(render_caption(c), c) for c in captions]
    bad = [check_image(noise, c) for c in captions]
    assert not any(v.correct for v in bad)
    s = summarize(good + bad)
    for cat in ("single_object", "two_objects", "counting", "position"):
        assert s[cat] == 0.5
    assert s["colour_attribution"] == 0.5          # the two two-object prompts, right once each
    assert s["colours"] <= 0.75 and s["shapes"] <= 0.75
    assert s["overall"] == pytest.approx(np.mean([s[c] for c in ("single_object", "two_objects", "counting", "colours",
                                                                    "shapes", "position", "colour_attribution")]))
    assert summarize(good)["overall"] == 1.0


def test_every_world_render_passes_its_own_caption():
    # The renderer and the checks share one palette: clean renders of real world scenes must pass.
    from pipelines.world import WorldConfig, make_scene, render

    for size in (32, 64):
        config = WorldConfig(size=size, seed=3)
        for i in range(60):
            scene = make_scene(i, config)
            verdict = check_image(np.asarray(render(scene)), scene.caption)
            assert verdict.correct, (size, i, scene.caption, verdict)


def test_colour_attribution_needs_each_colour_on_its_own_shape():
    # Swapped attributes: both colours and both shapes are there, but on the wrong objects.
    caption = "a red circle above a blue square"
    right = check_image(draw([("red", "circle", 32, 16, 7), ("blue", "square", 32, 48, 7)], S), caption)
    swapped = check_image(draw([("red", "square", 32, 16, 7), ("blue", "circle", 32, 48, 7)], S), caption)
    misplaced = check_image(draw([("red", "circle", 32, 48, 7), ("blue", "square", 32, 16, 7)], S), caption)
    s = summarize([right, swapped, misplaced])
    assert s["colour_attribution"] == pytest.approx(2 / 3)        # position aside: only the swap fails
    assert s["position"] == pytest.approx(1 / 3) and s["colours"] == 1.0
    assert "colour_attribution" not in summarize([check_image(render_caption("a red circle"), "a red circle")])
