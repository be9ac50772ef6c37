"""DPG-Bench from both published layouts, scored by ELLA's compute_dpg_bench.py rules."""

import pytest

from jobs.metrics import dpg
from tests.jobs.metrics.benchmark_fixtures import DPG_ROWS, build_tiny_blip_vqa, write_dpg_csv, write_dpg_parquet
from tests.jobs.metrics.helpers import build_tiny_vqa, render_caption


def test_both_layouts_read_the_same_questions(tmp_path):
    csv_items = dpg.load_benchmark(write_dpg_csv(tmp_path / "dpg_bench.csv"))
    pq_items = dpg.load_benchmark(write_dpg_parquet(tmp_path / "dpg_bench.parquet"))
    assert list(pq_items) == ["first", "p1", "p2"] and list(csv_items) == ["first", "p1", "p2"]
    # the official script skips the CSV's first data row; the Parquet is read whole
    assert [q.id for q in csv_items["first"].questions] == [2] and [q.id for q in pq_items["first"].questions] == [1, 2]
    assert csv_items["p1"] == pq_items["p1"] and csv_items["p2"] == pq_items["p2"]
    p1 = csv_items["p1"]
    assert p1.prompt == "a red circle left of a blue square"
    assert [q.parents for q in p1.questions] == [[], [], [1], [1, 2], [3]]
    assert p1.questions[3].category == "relation - spatial" and p1.questions[3].text == "Is the circle left of the square?"


def test_dependency_rule_cascades_in_question_order(tmp_path):
    items = dpg.load_benchmark(write_dpg_csv(tmp_path / "dpg_bench.csv"))
    qs = items["p1"].questions
    assert dpg.score_image(qs, ["yes"] * 5)["score"] == 1.0
    # "no" to 1 zeroes 3 (parent 1), 4 (parents 1, 2) and then 5, whose parent 3 was zeroed before it
    res = dpg.score_image(qs, ["No", "Yes.", " yes ", "yes", "yes"])
    assert res["score"] == pytest.approx(1 / 5) and res["raw"] == {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}
    assert dpg.score_image(qs, ["yes", "no", "yes", "yes", "yes"])["score"] == pytest.approx(3 / 5)
    assert dpg.score_image(qs, ["yes, there is", "yes", "yes", "yes", "yes"])["score"] == pytest.approx(1 / 5)  # not exactly "yes"
    # the skipped first row leaves "first" with a question whose parent is gone: the image is left out
    assert dpg.score_image(items["first"].questions, ["yes"]) is None


def test_summary_averages_images_per_prompt_then_prompts(tmp_path):
    items = dpg.load_benchmark(write_dpg_parquet(tmp_path / "dpg_bench.parquet"))
    results = [("p1", dpg.score_image(items["p1"].questions, ["yes"] * 5)),
               ("p1", dpg.score_image(items["p1"].questions, ["no"] + ["yes"] * 4)),
               ("p2", dpg.score_image(items["p2"].questions, ["yes", "no"])),
               ("first", None)]
    s = dpg.summarize(items, results)
    assert s["score"] == pytest.approx(((1 + 1 / 5) / 2 + 1 / 2) / 2)
    assert s["prompts"] == 2 and s["excluded_images"] == 1
    # categories pool the answers before the dependency rule
    assert s["l2/attribute - color"] == 1.0 and s["l2/entity - whole"] == pytest.approx(4 / 5)
    assert s["l1/entity"] == pytest.approx(4 / 5) and s["l1/other"] == 0.0 and s["l1/relation"] == 1.0


def test_bad_files_are_named(tmp_path):
    (tmp_path / "bad.csv").write_text("item_id,text\n1,a\n")
    with pytest.raises(ValueError, match="lacks DPG-Bench column"):
        dpg.load_benchmark(tmp_path / "bad.csv")
    rows = DPG_ROWS + [("p2", "two yellow triangles", 3, "1;2", "other", "count", "other - count (x)", "Why?")]
    with pytest.raises(ValueError, match="data row 10: dependency '1;2'"):
        dpg.load_benchmark(write_dpg_csv(tmp_path / "dep.csv", rows))
    rows = DPG_ROWS + [DPG_ROWS[-1]]
    with pytest.raises(ValueError, match="item p2 repeats proposition 2"):
        dpg.load_benchmark(write_dpg_parquet(tmp_path / "dup.parquet", rows))
    with pytest.raises(FileNotFoundError):
        dpg.load_benchmark(tmp_path / "none.csv")


def test_vqa_judges_run_from_a_user_path(tmp_path):
    image, questions = render_caption("a red circle", 32), ["is there a red circle?", "is there a blue square?", "is it red?"]
    vqa = dpg.VQA(build_tiny_vqa(tmp_path / "vilt"), batch_size=2)              # classifier head: top label
    assert not vqa.model.can_generate()
    answers = vqa(image, questions)
    assert len(answers) == 3 and set(answers) <= {"yes", "no"}
    blip = dpg.VQA(build_tiny_blip_vqa(tmp_path / "blip"), batch_size=2)        # generative: decoded text
    assert blip.model.can_generate()
    answers = blip(image, questions)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers) and answers == blip(image, questions)
