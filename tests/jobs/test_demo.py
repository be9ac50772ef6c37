"""The embedded default end to end at a small size: real Ray, real HTTP, real DeepSpeed, as a user runs it."""

import csv
import itertools
import json
from pathlib import Path

from PIL import Image

from model.checkpoint import load_weights
from pipelines import manifest
from tests.conftest import run_cli


def test_demo_runs_end_to_end_at_a_small_size(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli(
        "demo", f"out={out}", "world.n=240", "eval_prompts=16",
        "train={data.batch_size: 16, optim.steps: 24, optim.warmup_steps: 4, checkpoint.every: 12, "
        "logging.every: 6, logging.sample_every: 24, logging.sample_steps: 4, ema.decays: [0.9]}",
        "generate={sampler.steps: 4}",
        "tune={subsets: [4, 8], space: {cfg_scale: {grid: [1.0, 3.0]}, sampler: euler, steps: 3}}",
        timeout=1200,
    )
    summary = json.loads((out / "summary.json").read_text())
    # Every stage ran and left what the summary points at.
    assert set(summary["stage_seconds"]) == {"ray", "world", "fetch", "curate", "train", "generate", "eval", "tune"}
    assert "recaption: skipped" in proc.stdout
    for name in ("fetch_manifest", "curate_manifest"):
        root = str(Path(summary[name]).parent)
        assert manifest.verify(root) == []
    fetched = manifest.read(str(Path(summary["fetch_manifest"]).parent))
    assert fetched.rows == 240
    grid = Image.open(summary["sample_grid"])
    assert grid.size[0] >= 4 * 128
    net, meta = load_weights(summary["checkpoint"])
    assert meta["weights"] == "ema_0.9" and net.config.image_size == 32
    assert 0.0 <= summary["eval"]["world/colours"] <= 1.0 and summary["eval"]["artifact_ratio"] > 0
    tune_dir = Path(summary["tune"]["dir"])
    with open(tune_dir / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tune_dir / "plot.png").stat().st_size > 0
    assert "colour prompt following" in proc.stdout and "chance: 12.5%" in proc.stdout


def test_demo_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    proc = run_cli("demo", f"out={tmp_path}", check=False)
    assert proc.returncode == 2 and "is not empty" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_no_world_caption_is_cut_by_the_demo_prompt_length():
    """Every caption the demo's world can draw fits the trained prompt length: a cut relation caption
    ("a purple triangle to the right of an orange triangle", 53 ByT5 tokens) loses its second object."""
    from jobs import repo_path
    from jobs.demo import DemoConfig
    from jobs.train.config import TrainConfig
    from pipelines import config as config_lib
    from model.text_encoder import count_tokens, load_tokenizer
    from pipelines.world import COUNT_WORDS, PALETTE, RELATIONS, SHAPES, Obj, Scene

    demo = config_lib.load(DemoConfig, repo_path("jobs/configs/demo.yaml"))
    train = config_lib.override(config_lib.load(TrainConfig, repo_path(demo.train_config), []), demo.train, "demo train")
    captions = [Scene("count", (Obj(c, s),) * n).caption for c, s, n in itertools.product(PALETTE, SHAPES, COUNT_WORDS)]
    captions += [Scene("relation", (Obj(c1, s1), Obj(c2, s2)), rel).caption
                 for (c1, c2), s1, s2, rel in itertools.product(itertools.permutations(PALETTE, 2), SHAPES, SHAPES, RELATIONS)]
    assert len(captions) == 8 * 3 * 4 + 8 * 7 * 3 * 3 * 4
    tokens = count_tokens(load_tokenizer(train.text_encoder.name_or_path), captions)
    longest = max(zip(tokens, captions))
    assert longest[0] <= train.text_encoder.prompt_length, longest
