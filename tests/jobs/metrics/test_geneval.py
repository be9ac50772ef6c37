"""GenEval's metadata and decision rules on hand-made detections whose official verdicts follow from
djghosh13/geneval evaluation/evaluate_images.py (reasons quoted in its wording)."""

import json

import numpy as np
import pytest

from jobs.metrics import geneval
from jobs.metrics.clip_score import ClipScorer
from jobs.metrics.geneval import Detection, GenEvalRules, group_detections, judge, relative_position
from jobs.metrics.mask2former import Mask2FormerDetector
from tests.jobs.metrics.benchmark_fixtures import (GENEVAL_LINES, blank_images, build_tiny_mask2former,
                                                   write_geneval_metadata)
from tests.jobs.metrics.helpers import build_tiny_clip

CLOCK = geneval.CLASSES.index("clock")


def det(x0, y0, x1, y1, score=0.95, mask=None):
    return Detection(np.array([x0, y0, x1, y1], float), score, mask)


def grouped(tag, rows, masks=None, rules=GenEvalRules()):
    """rows of (class name, score, box) as a detector would return them -> kept objects per class."""
    labels = np.array([geneval.CLASSES.index(r[0]) for r in rows])
    scores = np.array([r[1] for r in rows], float)
    boxes = np.array([r[2] for r in rows], float).reshape(-1, 4)
    return group_detections(labels, boxes, scores, masks, tag, rules)


def test_metadata_of_every_tag_reads_and_bad_lines_are_named(tmp_path):
    rows = geneval.load_metadata(write_geneval_metadata(tmp_path / "evaluation_metadata.jsonl"))
    assert [r["tag"] for r in rows] == list(geneval.TAGS) and rows == GENEVAL_LINES
    assert len(geneval.CLASSES) == 80 and {"computer mouse", "tv remote", "computer keyboard"} <= set(geneval.CLASSES)
    bad = [
        ('{"tag": "single_object", "prompt": "a photo of a cat"}', "lacks include"),
        ('{"tag": "single_object", "include": [{"class": "kitten", "count": 1}], "prompt": "p"}', "kitten"),
        ('{"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "teal"}], "prompt": "p"}', "teal"),
        ('{"tag": "position", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}], "prompt": "p"}',
         "earlier clause"),
        ('{"tag": "counting", "include": [{"class": "cat", "count": 0}], "prompt": "p"}', "positive integer"),
        ('{"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat"}], "prompt": "p"}',
         "class and count"),
        ('{"tag": "single_object", "include": [', "not valid JSON"),
    ]
    for line, words in bad:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(GENEVAL_LINES[0]) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{words}"):
            geneval.load_metadata(path)


def test_threshold_rule():
    two = GENEVAL_LINES[1]                                         # bench and sports ball
    seen = grouped("two_object", [("bench", 0.9, (0, 0, 10, 10)), ("sports ball", 0.3, (20, 0, 30, 10))])
    assert judge(two, seen) == (False, "expected sports ball>=1, found 0")   # kept only when score > 0.3
    seen = grouped("two_object", [("bench", 0.9, (0, 0, 10, 10)), ("sports ball", 0.31, (20, 0, 30, 10))])
    assert judge(two, seen) == (True, "")


def test_counting_and_exclusion_rules():
    clocks = GENEVAL_LINES[2]                                      # two clocks, fewer than three
    boxes = [(i * 20, 0, i * 20 + 10, 10) for i in range(4)]
    two = [("clock", s, b) for s, b in zip((0.97, 0.95), boxes)]
    assert judge(clocks, grouped("counting", two)) == (True, "")
    three = two + [("clock", 0.93, boxes[2])]
    assert judge(clocks, grouped("counting", three)) == (False, "expected clock<3, found 3")
    # counting prompts keep detections above 0.9 only: a 0.85 clock does not count there, elsewhere it does
    weak = [two[0], ("clock", 0.85, boxes[1])]
    assert judge(clocks, grouped("counting", weak)) == (False, "expected clock>=2, found 1")
    assert len(grouped("two_object", weak)["clock"]) == 2


def test_max_objects_and_overlap_rules():
    many = [("clock", 0.99 - i / 100, (i, 0, i + 5, 5)) for i in range(20)]
    kept = grouped("two_object", many)["clock"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.99)          # most confident first, 16 at most
    same_place = [("clock", 0.97, (0, 0, 10, 10)), ("clock", 0.95, (1, 0, 11, 10))]
    assert len(grouped("counting", same_place)["clock"]) == 2                 # max_overlap 1.0: no suppression
    assert len(grouped("counting", same_place, rules=GenEvalRules(max_overlap=0.5))["clock"]) == 1
    assert geneval.compute_iou(np.array([0, 0, 9, 9]), np.array([0, 0, 9, 9])) == 1.0
    assert geneval.compute_iou(np.array([0, 0, 9, 9]), np.array([5, 0, 14, 9])) == pytest.approx(50 / 150)


def test_colour_rule_checks_the_most_confident_objects_only():
    red_car = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
    blue, red = det(0, 0, 10, 10, 0.9), det(20, 0, 30, 10, 0.8)
    colours = {0.9: "blue", 0.8: "red"}
    colour_of = lambda objs, name: [colours[o.score] for o in objs]          # stands in for CLIP ViT-L/14
    ok, why = judge(red_car, {"car": [blue, red]}, colour_of)
    assert not ok and why == "expected red car>=1, found 0 red; and 1 blue"   # the red car is second
    assert judge(red_car, {"car": [red, blue]}, colour_of) == (True, "")
    with pytest.raises(ValueError, match="colour classifier"):
        judge(red_car, {"car": [red]})


def test_position_rule_with_its_margin():
    right_of = GENEVAL_LINES[4]                                    # dog right of teddy bear
    teddy = det(0, 0, 10, 10)
    assert judge(right_of, {"teddy bear": [teddy], "dog": [det(30, 0, 40, 10)]}) == (True, "")
    ok, why = judge(right_of, {"teddy bear": [teddy], "dog": [det(10, 50, 20, 60)]})
    assert not ok and why == "expected dog right of target, found below target"
    # centres 2 px apart, margin 0.1 x (10 + 10) = 2 px: no relation at all
    assert relative_position(det(2, 0, 12, 10), teddy) == set()
    assert judge(right_of, {"teddy bear": [teddy], "dog": [det(2, 0, 12, 10)]}) == (False, "expected dog right of target, found  target")
    # diagonal: both axes beyond 0.5 of the (shrunk) offset direction
    assert relative_position(det(20, 20, 30, 30), teddy) == {"right of", "below"}
    assert judge(right_of, {"dog": [det(30, 0, 40, 10)]}) == (
        False, "expected teddy bear>=1, found 0\nno target for dog to be right of")


def test_summary_is_the_mean_over_tags():
    records = [{"tag": "colors", "prompt": "a", "correct": True}, {"tag": "colors", "prompt": "a", "correct": False},
               {"tag": "colors", "prompt": "b", "correct": False}, {"tag": "position", "prompt": "c", "correct": True}]
    s = geneval.summarize(records)
    assert s["colors"] == pytest.approx(1 / 3) and s["position"] == 1.0
    assert s["overall"] == pytest.approx((1 / 3 + 1) / 2)            # tags weigh the same, not images
    assert s["correct_images"] == 0.5 and s["correct_prompts"] == pytest.approx(2 / 3)


def test_masked_crop_greys_out_the_background_and_cuts_the_box():
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, :, 0] = 200
    mask = np.zeros((20, 30), bool)
    mask[5:10, 4:12] = True
    crop = np.asarray(geneval.masked_crop(image, det(4, 5, 12, 10, mask=mask)))
    assert crop.shape == (5, 8, 3) and (crop == (200, 0, 0)).all()
    crop = np.asarray(geneval.masked_crop(image, det(2, 5, 12, 10, mask=mask)))
    assert (crop[:, :2] == geneval.MASK_BACKGROUND).all() and (crop[:, 2:] == (200, 0, 0)).all()


def test_clip_colour_classifier_sees_only_the_masked_object(tmp_path):
    colours = geneval.ColourClassifier(ClipScorer(build_tiny_clip(tmp_path / "clip")))
    w = colours.weights("car")
    assert w.shape[0] == len(geneval.COLORS) and np.allclose(w.norm(dim=-1).numpy(), 1, atol=1e-5)
    a, b = blank_images(2, 32)
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    b[mask] = a[mask]                                                   # same object, different surroundings
    obj = det(6, 6, 22, 22, mask=mask)
    assert colours(a, [obj], "car") == colours(b, [obj], "car")
    assert colours(a, [obj, det(0, 0, 32, 32)], "car")[0] in geneval.COLORS
    crops = [geneval.masked_crop(im, obj) for im in (a, b)]
    assert np.array_equal(np.asarray(crops[0]), np.asarray(crops[1]))


def test_judge_runs_the_detector_and_the_rules(tmp_path):
    """A tiny Mask2Former whose every query says "clock": single-object "clock" holds, "bench" fails."""
    detector = Mask2FormerDetector(build_tiny_mask2former(tmp_path / "m2f", favour=CLOCK), image_scale=(213, 128))
    judge_ = geneval.GenEvalJudge(detector)
    clock = {"tag": "single_object", "include": [{"class": "clock", "count": 1}], "prompt": "a photo of a clock"}
    res = judge_(blank_images(2), [clock, GENEVAL_LINES[0]])
    assert res[0]["correct"] and res[0]["tag"] == "single_object"
    assert not res[1]["correct"] and res[1]["reason"] == "expected bench>=1, found 0"
    details = json.loads(res[0]["details"])
    assert list(details) == ["clock"] and all(len(b) == 5 and b[4] > 0.3 for b in details["clock"])
    with pytest.raises(ValueError, match="metrics.clip_model"):
        judge_(blank_images(1), [GENEVAL_LINES[3]])


def test_captions_read_as_geneval_clauses():
    """Every official prompt form reads back to its metadata line (create_prompts.py's templates);
    a free caption gives a clause per COCO class it names, or None when it names none."""
    for line in GENEVAL_LINES:
        assert geneval.caption_metadata(line["prompt"]) == line, line["prompt"]
    meta = geneval.caption_metadata("Two dogs sit on a red bench.")
    assert meta["tag"] == "counting" and meta["exclude"] == [{"class": "dog", "count": 3}]
    assert meta["include"] == [{"class": "dog", "count": 2}, {"class": "bench", "count": 1, "color": "red"}]
    assert geneval.caption_metadata("an orange car")["include"] == [{"class": "car", "count": 1, "color": "orange"}]
    assert geneval.caption_metadata("an orange")["include"] == [{"class": "orange", "count": 1}]
    assert geneval.caption_metadata("a hot dog")["include"] == [{"class": "hot dog", "count": 1}]
    assert geneval.caption_metadata("people waiting for a bus")["include"] == [{"class": "person", "count": 1},
                                                                              {"class": "bus", "count": 1}]
    assert geneval.caption_metadata("a cat to the left of a dog")["include"] == [
        {"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]
    assert geneval.caption_metadata("a sunset over the sea") is None
    for line in GENEVAL_LINES:
        geneval.parse_metadata(geneval.caption_metadata(line["prompt"]), "parsed")
