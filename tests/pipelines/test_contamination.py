"""n-gram contamination check against evaluation prompt files (GenEval JSONL, plain text)."""

from __future__ import annotations

import pytest

from pipelines.contamination import ContaminationConfig, PromptIndex, load_prompts
from tests.pipelines.sources.layouts import write_geneval_prompts


def test_loads_geneval_jsonl_and_text_lists(tmp_path):
    jsonl = write_geneval_prompts(tmp_path / "evaluation_metadata.jsonl", ["a photo of a bench", "a photo of two cats"])
    txt = tmp_path / "dpg.txt"
    txt.write_text("a red cube left of a blue ball\n\n  a watercolor fox  \n")
    assert load_prompts([str(jsonl), str(txt)]) == [
        "a photo of a bench", "a photo of two cats", "a red cube left of a blue ball", "a watercolor fox"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no string \"prompt\" field"):
        load_prompts([str(bad)])


def test_overlap_is_the_share_of_a_prompts_ngrams_in_the_caption():
    index = PromptIndex(["a photo of a red bench", "a photo of a red bench", "a fox", "two cats"], n=3)
    assert index.prompts == ["a photo of a red bench", "a fox", "two cats"]  # repeats counted once
    assert index.best("A photo of a red bench, on grass.") == (1.0, 0)
    assert index.best("a photo of a red car") == (0.75, 0)         # 3 of its 4 trigrams: not a match at 1.0
    assert index.best("the two cats sleep") == (1.0, 2)            # a prompt shorter than n is one gram
    assert index.best("nothing in common") == (0.0, -1)


def test_config_is_checked():
    with pytest.raises(ValueError, match="min_overlap"):
        ContaminationConfig(min_overlap=0)
    assert ContaminationConfig(prompts="p.jsonl").prompts == ["p.jsonl"]
