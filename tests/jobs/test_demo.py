"""The embedded default end to end at a small size: real Ray, real HTTP, real DeepSpeed, as a user runs it."""

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.demo import DEMO_CATEGORIES
from model.checkpoint import load_weights
from pipelines import manifest
from tests.conftest import run_cli


# The small run's settings: the demo's depth-6, patch-8 debug model and word-level world encoder,
# trained long enough to follow colours and to answer count words (at 160 steps the depth-2 model it
# had before did not yet: "a" 3.69 blobs, "four" 3.56), on a small world.
SMALL_STEPS = 320
# Mean blobs for "four" minus mean blobs for "a", same noises: measured 0.81 on this run (2026-12-02:
# a 2.87, two 3.43, three 3.75, four 3.68; the small model over-draws, but fewer for "a"; 0.81 with
# depth 2 the same day); a model that ignores the word gives 0 up to noise. Floor: about a third of
# the measured gap.
COUNT_GAP = 0.25
# Per-category floors of the small run: measured on this run's settings (2026-12-02: colours 0.90,
# shapes 0.50, counting 0.06, overall 0.24 at depth 6; colours 0.73 and 0.81, shapes 0.31 and 0.46,
# overall 0.19 and 0.23 in two runs at depth 2); single object, position and colour attribution near 0
# this early, so they have no floor here (the full demo's numbers are in the README), minus a margin
# of about three binomial standard deviations over 48 prompts plus run-to-run noise (Ray Data's row
# order and thread timing make runs differ).
FLOORS = {"world/colours": 0.5, "world/shapes": 0.15, "world/overall": 0.1}
# The small run goes in the first test's time: ~2 min in one process, 4-6 min beside another xdist
# worker on the 2-core box (327 s from a fresh clone, 2026-12-03); as long as its command may take.
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """One small demo run (real Ray, HTTP, fetch, curate, Ray Train + DeepSpeed, generate, eval, tune)
    that the tests below share: (output folder, the process, its summary)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = run_cli(
        "demo", f"out={out}", "world.n=240", "eval_prompts=48",
        f"train={{data.batch_size: 16, optim.steps: {SMALL_STEPS}, optim.warmup_steps: 10, checkpoint.every: {SMALL_STEPS}, "
        f"logging.every: 20, logging.sample_every: {SMALL_STEPS}, logging.sample_steps: 4, ema.decays: [0.95], "
        "text_encoder.prompt_length: 16, model.overrides: {depth: 6, patch_size: 8}}",
        "generate={sampler.steps: 10, sampler.cfg_scale: 3.0}",
        "tune={subsets: [4, 8], space: {cfg_scale: {grid: [1.0, 3.0]}, sampler: euler, steps: 3}}",
        timeout=1200,
    )
    return out, proc, json.loads((out / "summary.json").read_text())


def test_demo_runs_end_to_end_at_a_small_size(small_demo):
    out, proc, summary = small_demo
    # Every stage ran and left what the summary points at.
    assert set(summary["stage_seconds"]) == {"ray", "world", "fetch", "curate", "train", "generate", "eval", "tune"}
    assert "recaption: skipped" in proc.stdout
    # Ray Train's placement-group cleaner cannot reach the state API of a local instance (no
    # dashboard); its once-a-second warning is kept out of the console (jobs/ray_init.py).
    assert "Failed to query Ray Train Controller actor state" not in proc.stdout + proc.stderr
    for name in ("fetch_manifest", "curate_manifest"):
        root = str(Path(summary[name]).parent)
        assert manifest.verify(root) == []
    fetched = manifest.read(str(Path(summary["fetch_manifest"]).parent))
    assert fetched.rows == 240
    grid = Image.open(summary["sample_grid"])
    assert grid.size[0] >= 4 * 128
    net, meta = load_weights(summary["checkpoint"])
    assert meta["weights"] == "ema_0.95" and net.config.image_size == 32 and net.config.patch_size == 8
    assert summary["eval"]["artifact_ratio"] > 0
    tune_dir = Path(summary["tune"]["dir"])
    with open(tune_dir / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tune_dir / "plot.png").stat().st_size > 0


def test_demo_scores_every_category_above_its_measured_floor(small_demo):
    _, proc, summary = small_demo
    ev = summary["eval"]
    print("small demo scores", json.dumps(ev))
    # The eval prompts hold single objects, counts and relations, so every category is scored and printed.
    for cat in DEMO_CATEGORIES:
        assert f"world/{cat}" in ev, cat
        assert f"prompt following: {cat.replace('_', ' ')}" in proc.stdout
    for key, floor in FLOORS.items():
        assert ev[key] >= floor, (key, ev[key], floor, ev)


def test_swapping_the_count_word_changes_the_generated_counts(small_demo):
    """Same noises, same colour and shape, only the count word differs: the trained model's blob
    counts must follow it (a model that ignores the word draws the same distribution for each)."""
    from benchmarks.learn import count_response
    from jobs.inference import load_model, resolve_sampler
    from model.denoiser import SamplerConfig
    from pipelines.world import PALETTE, SHAPES

    _, _, summary = small_demo
    net, encoder, meta = load_model(summary["checkpoint"])
    pairs = [(c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(PALETTE)]
    sampler = resolve_sampler(SamplerConfig(sampler="heun", steps=10, cfg_scale=3.0), meta)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # small batches: one thread, and no spinning threads on a shared box
    try:
        hist = count_response(net, encoder, sampler, pairs, seeds=2)
    finally:
        torch.set_num_threads(threads)
    mean = {n: float(np.dot(h, range(5))) for n, h in hist.items()}
    print("count response", hist, mean)
    assert mean[4] - mean[1] >= COUNT_GAP, (mean, hist)


def test_train_batches_hold_their_dataset_rows(small_demo, ray_session):
    """What reaches the step is the curated row: each image passes the world checks against its own
    caption, and no caption is cut or mis-masked at the trained prompt length."""
    from benchmarks.learn import audit_batches

    _, _, summary = small_demo
    audit = audit_batches([str(Path(summary["curate_manifest"]).parent)], batch_size=16, steps=4, prompt_length=16,
                          encoder=summary["text_encoder"])
    assert audit["rows"] == 2 * 4 * 8 and audit["ok"] == audit["rows"], audit


def test_demo_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    proc = run_cli("demo", f"out={tmp_path}", check=False)
    assert proc.returncode == 2 and "is not empty" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_no_world_caption_is_cut_by_the_demo_prompt_length():
    """Every caption the demo's world can draw fits the trained prompt length with the demo's text
    encoder: a cut relation caption ("a purple triangle to the right of an orange triangle", 11 world
    tokens, 53 ByT5 ones) loses its second object."""
    from jobs import repo_path
    from jobs.demo import DemoConfig
    from jobs.train.config import TrainConfig
    from pipelines import config as config_lib
    from model.text_encoder import count_tokens, load_tokenizer
    from pipelines.world import COUNT_WORDS, PALETTE, RELATIONS, SHAPES, Obj, Scene, resolve_text_encoder

    demo = config_lib.load(DemoConfig, repo_path("jobs/configs/demo.yaml"))
    train = config_lib.override(config_lib.load(TrainConfig, repo_path(demo.train_config), []),
                                {"text_encoder.name_or_path": resolve_text_encoder(demo.text_encoder), **demo.train}, "demo train")
    captions = [Scene("count", (Obj(c, s),) * n).caption for c, s, n in itertools.product(PALETTE, SHAPES, COUNT_WORDS)]
    captions += [Scene("relation", (Obj(c1, s1), Obj(c2, s2)), rel).caption
                 for (c1, c2), s1, s2, rel in itertools.product(itertools.permutations(PALETTE, 2), SHAPES, SHAPES, RELATIONS)]
    assert len(captions) == 8 * 3 * 4 + 8 * 7 * 3 * 3 * 4
    tokens = count_tokens(load_tokenizer(train.text_encoder.name_or_path), captions)
    longest = max(zip(tokens, captions))
    assert longest[0] <= train.text_encoder.prompt_length, longest
