import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.evaluate import EvalConfig, MetricsConfig, evaluate, write_benchmark_prompts
from jobs.generate import read_prompts
from jobs.metrics import geneval
from jobs.metrics.fid import INCEPTION_FILE
from tests.conftest import run_cli
from tests.jobs.metrics.benchmark_fixtures import (GENEVAL_LINES, build_tiny_inception, build_tiny_mask2former,
                                                   write_coco_captions, write_dpg_csv, write_geneval_metadata)
from tests.jobs.metrics.helpers import build_tiny_clip, build_tiny_vqa, render_caption, write_generated

CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "a red circle and a white square"]
# a GenEval metadata line as `generate` stores it (the prompt is the image's own)
GENEVAL = {"tag": "single_object", "include": [{"class": "sports ball", "count": 1}]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """8 images: each caption once rendered right and once rendered as the next caption (wrong)."""
    root = tmp_path_factory.mktemp("eval")
    prompts = CAPTIONS + CAPTIONS
    images = [render_caption(c, 64) for c in CAPTIONS] + [render_caption(CAPTIONS[(i + 1) % 4], 64) for i in range(4)]
    meta = [GENEVAL, {"item_id": "p1"}, {}, {}] * 2
    return write_generated(root / "gen", prompts, images, meta)


def test_eval_scores_known_images_with_every_metric(tmp_path, folder):
    models = tmp_path / "models"
    ball = geneval.CLASSES.index("sports ball")
    cfg = EvalConfig(images=str(folder), out=str(tmp_path / "ev"), metrics=MetricsConfig(
        clip_model=str(build_tiny_clip(models / "clip")), fid_model=str(build_tiny_inception(models / INCEPTION_FILE)),
        fid_reference=str(folder), geneval_detector=str(build_tiny_mask2former(models / "m2f", favour=ball)),
        dpg_bench=str(write_dpg_csv(tmp_path / "dpg_bench.csv")), vqa_model=str(build_tiny_vqa(models / "vqa"))))
    s = evaluate(cfg)
    assert s["world/overall"] == pytest.approx(0.5) and s["world/correct"] == 0.5
    for cat in ("single_object", "two_objects", "counting", "position"):
        assert s[f"world/{cat}"] == 0.5
    assert s["artifact_patch"] == 16 and np.isfinite(s["artifact_ratio"])   # flat shapes: edges rarely on the grid
    assert s["fid"] == pytest.approx(0.0, abs=1e-3)                       # the set against itself
    assert 0 <= s["clip_score"] <= 100 and 0 <= s["dpg/score"] <= 1 and s["dpg/prompts"] == 1
    assert s["geneval/single_object"] == 1.0 and s["geneval/overall"] == 1.0      # every query of the detector is a ball
    records = pq.read_table(tmp_path / "ev" / "records.parquet").to_pylist()
    assert [r["world_correct"] for r in records] == [True] * 4 + [False] * 4
    assert records[0]["geneval_tag"] == "single_object" and records[0]["geneval_correct"]
    assert "sports ball" in json.loads(records[0]["geneval_details"]) and records[1]["dpg_score"] is not None
    assert all(r["artifact_ratio"] >= 0 for r in records)
    saved = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert saved["summary"]["world/overall"] == s["world/overall"]


def test_eval_cli(tmp_path, folder, cli):
    proc = run_cli("eval", f"images={folder}", f"out={tmp_path / 'ev'}", "metrics.patch_size=8")
    assert "world/overall" in proc.stdout and "artifact_ratio" in proc.stdout
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["summary"]["artifact_patch"] == 8
    # The bad inputs end before any work starts: in this process.
    code, _, error = cli("eval", f"images={folder}", f"out={tmp_path / 'ev2'}", f"metrics.fid_model={tmp_path}")
    assert code == 2 and "FID needs both" in error
    code, _, error = cli("eval", f"images={tmp_path / 'nothing'}")
    assert code == 2 and "no manifest.json" in error


def test_benchmark_files_become_generate_prompts(tmp_path):
    meta = write_geneval_metadata(tmp_path / "evaluation_metadata.jsonl")
    rows = read_prompts(write_benchmark_prompts(MetricsConfig(geneval_metadata=str(meta)), str(tmp_path / "g")))
    assert [r["prompt"] for r in rows] == [line["prompt"] for line in GENEVAL_LINES]
    assert rows[2]["metadata"] == {"tag": "counting", "include": [{"class": "clock", "count": 2}],
                                   "exclude": [{"class": "clock", "count": 3}]}
    rows = read_prompts(write_benchmark_prompts(MetricsConfig(dpg_bench=str(write_dpg_csv(tmp_path / "d.csv"))), str(tmp_path / "d")))
    assert [r["metadata"]["item_id"] for r in rows] == ["first", "p1", "p2"]
    coco = write_coco_captions(tmp_path / "coco-30-val-2014-captions.json")
    rows = read_prompts(write_benchmark_prompts(MetricsConfig(coco_captions=str(coco)), str(tmp_path / "c")))
    assert len(rows) == 4 and rows[0]["metadata"] == {"coco_id": "391895"}
    assert write_benchmark_prompts(MetricsConfig(), str(tmp_path / "n")) is None
    with pytest.raises(ValueError, match="one benchmark file at a time"):
        write_benchmark_prompts(MetricsConfig(geneval_metadata=str(meta), coco_captions=str(coco)), str(tmp_path / "x"))
