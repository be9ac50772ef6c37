import json

import numpy as np
import pytest

from jobs.metrics import dpg, geneval
from jobs.metrics.geneval import Detection
from tests.jobs.metrics.helpers import build_tiny_detector, build_tiny_vqa, render_caption, write_dpg_csv

D = Detection


def test_geneval_judge_on_known_detections():
    two = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert geneval.judge(two, [D("cat", .9, (0, 0, 10, 10)), D("dog", .8, (20, 0, 30, 10))])[0]
    ok, why = geneval.judge(two, [D("cat", .9, (0, 0, 10, 10)), D("dog", .2, (20, 0, 30, 10))])
    assert not ok and "dog" in why                                         # below the 0.3 threshold
    count = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    cats = [D("cat", .95, (i * 10, 0, i * 10 + 8, 8)) for i in range(3)]
    assert geneval.judge(count, cats[:2])[0]
    assert not geneval.judge(count, cats)[0]                               # three is too many
    assert not geneval.judge(count, [cats[0], D("cat", .5, (50, 0, 58, 8))])[0]  # 0.5 < counting threshold
    pos = {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    assert geneval.judge(pos, [D("cat", .9, (0, 0, 10, 10)), D("dog", .9, (30, 0, 40, 10))])[0]
    assert not geneval.judge(pos, [D("cat", .9, (30, 0, 40, 10)), D("dog", .9, (0, 0, 10, 10))])[0]
    col = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]}
    img = render_caption("a red circle", 32)
    det = [D("circle", .9, (11, 11, 21, 21))]
    assert geneval.judge(col, det, lambda d: geneval.median_colour(img, d.box))[0]
    blue = render_caption("a blue circle", 32)
    assert not geneval.judge(col, det, lambda d: geneval.median_colour(blue, d.box))[0]
    s = geneval.summarize(["colors", "colors", "position"], [True, False, True])
    assert s == {"colors": 0.5, "position": 1.0, "overall": 0.75}


def test_geneval_detector_runs_from_a_user_path(tmp_path):
    det = geneval.Detector(build_tiny_detector(tmp_path / "det"), threshold=0.0)
    out = det(np.stack([render_caption("a red circle", 32), render_caption("two blue squares", 32)]))
    assert len(out) == 2 and all(d.label in ("circle", "square", "triangle") for d in out[0])
    assert all(0 <= v <= 32 + 1e-3 for d in out[0] for v in d.box)
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"prompt": "a photo of a circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}]}) + "\n")
    assert geneval.load_metadata(meta)[0]["tag"] == "single_object"
    meta.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="lacks tag, include"):
        geneval.load_metadata(meta)


def test_dpg_scoring_applies_the_dependency_rule(tmp_path):
    prompts, questions = dpg.load_benchmark(write_dpg_csv(tmp_path / "dpg.csv"))
    assert prompts == {"p1": "a red circle to the left of a blue square", "p2": "two yellow triangles"}
    q1 = questions["p1"]
    assert q1[2].parents == ["1", "2"]
    assert dpg.score_answers(q1, ["yes", "yes", "yes"])["score"] == 1.0
    s = dpg.score_answers(q1, ["yes", "no", "yes"])                       # parent 2 failed -> 3 scores 0
    assert s["score"] == pytest.approx(1 / 3) and s["cat_relation"] == 0.0 and s["cat_entity"] == 0.5
    assert dpg.summarize([{"score": 1.0}, {"score": 0.0, "cat_x": 1.0}]) == {"cat_x": 1.0, "score": 0.5}
    (tmp_path / "bad.csv").write_text("item_id,text\n1,a\n")
    with pytest.raises(ValueError, match="lacks DPG-Bench column"):
        dpg.load_benchmark(tmp_path / "bad.csv")


def test_dpg_vqa_runs_from_a_user_path(tmp_path):
    vqa = dpg.VQA(build_tiny_vqa(tmp_path / "vqa"))
    answers = vqa(render_caption("a red circle", 32), ["is there a red circle?", "is there a blue square?"])
    assert len(answers) == 2 and set(answers) <= {"yes", "no"}
