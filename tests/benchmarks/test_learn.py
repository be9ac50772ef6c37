"""bench learn: the grid as a real Ray Tune experiment at a tiny size, and its config errors."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from benchmarks import learn
from tests.conftest import ROOT

TINY = ["world.n=64", "batch_size=16", "optim.steps=4", "optim.warmup_steps=1", "eval.every=2", "eval.per_kind=1",
        "eval.sampler.steps=2", "eval.t_buckets=[0.5]", "model.overrides.depth=1"]


def test_grid_runs_as_tune_trials_and_reports_every_category_per_step(ray_session, tmp_path):
    """`python -m benchmarks.learn`, joined to the session's Ray: run as __main__, the trials must
    still find the module's names (Ray pickles __main__'s functions by value)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.learn", *TINY, f"sweep.out={tmp_path}",
                           "eval.cfg_scales=[1.0, 3.0]", "grid={model.overrides.patch_size: [4, 8]}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bench learn: prompt following per category" in proc.stdout
    df = pd.read_csv(tmp_path / "learn.csv")
    # a row per (setting, step, CFG, category): 2 settings x 2 evaluations x 2 scales x (7 categories
    # and the counting prompts' two checks)
    names = (*learn.CATEGORIES, *learn.COUNT_CHECKS)
    assert len(df) == 2 * 2 * 2 * len(names)
    assert set(df["setting"]) == {"patch_size=4", "patch_size=8"} and set(df["step"]) == {2, 4}
    assert set(df["category"]) == set(names) and df["score"].between(0, 1).all()
    wide = pd.read_csv(tmp_path / "learn_wide.csv")
    assert len(wide) == 2 * 2 * 2 and {"position", "colour_attribution", "counting_count", "counting_shape"} <= set(wide)
    assert (tmp_path / "learn.png").stat().st_size > 0


def test_score_tells_which_check_fails_the_counting_prompts():
    """A counting prompt fails its count check when a shape is missing and its shape check when a
    shape is drawn as another; the world's own renders pass both."""
    import dataclasses

    import numpy as np

    from pipelines.world import Obj, WorldConfig, make_scene, prompt_kind, render

    scene = next(s for s in (make_scene(i, WorldConfig(seed=7)) for i in range(200))
                 if prompt_kind(s) == "counting" and len(s.objects) >= 3 and s.objects[0].shape != "square")
    short = dataclasses.replace(scene, objects=scene.objects[1:])
    other = dataclasses.replace(scene, objects=(Obj(scene.objects[0].colour, "square", scene.objects[0].bbox), *scene.objects[1:]))
    images = np.stack([np.asarray(render(s).convert("RGB")) for s in (scene, short, other)])
    scores = learn.score(images, [scene.caption] * 3)
    assert scores["counting"] == 1 / 3
    assert scores["counting_count"] == 2 / 3 and scores["counting_shape"] == 2 / 3


def test_a_bad_grid_is_an_error_before_any_trial():
    with pytest.raises(ValueError, match="grid.optim.lrr: unknown key"):
        learn.grid_settings(learn.load_config(None, ["grid={optim.lrr: [1e-3]}"]))
    with pytest.raises(ValueError, match="grid.optim.lr must be a non-empty list"):
        learn.grid_settings(learn.load_config(None, ["grid={optim.lr: 1e-3}"]))


def test_the_full_grid_config_loads_and_names_every_setting():
    from jobs import repo_path

    cfg = learn.load_config(str(repo_path("benchmarks/learn_full.yaml")), [])
    settings = learn.grid_settings(cfg)
    assert settings[0] == {} and all(len(s) == 1 for s in settings[1:])     # the base, then one key changed
    keys = {k for s in settings for k in s}
    for key in ("model.overrides.depth", "model.overrides.width", "model.overrides.patch_size", "optim.lr",
                "optim.warmup_steps", "ema.decays", "batch_size", "text_encoder.prompt_length",
                "denoiser.caption_dropout", "denoiser.noise_scale", "denoiser.t_mu"):
        assert key in keys, key


def test_an_override_keeps_the_rest_of_its_section():
    """`optim.steps=1000` once rebuilt OptimConfig from its class defaults (lr 4e-4, warmup 5000):
    a 1000-step run then never left warmup, which made noise-scale runs look far worse than they were."""
    cfg = learn.load_config(None, ["optim.steps=1000", "denoiser.noise_scale=2.0"])
    assert (cfg.optim.steps, cfg.optim.lr, cfg.optim.warmup_steps) == (1000, 1e-3, 20)
    assert (cfg.denoiser.noise_scale, cfg.denoiser.caption_dropout) == (2.0, 0.1)


def test_score_rescores_saved_weights_at_other_eval_settings(tmp_path):
    """`--score --load WEIGHTS`: a weights folder (here a tiny random model written by the real
    checkpoint code) scored at the sampler settings given, one row per call with every category at
    every CFG scale; weights for another image size are refused before sampling."""
    import json

    import torch

    from model.checkpoint import save_weights
    from model.denoiser import DenoiserConfig
    from model.mmjit import MMJiT
    from model.text_encoder import TextEncoderConfig
    from pipelines.world import resolve_text_encoder

    cfg = learn.load_config(None, ["model.overrides.depth=1"])
    encoder = TextEncoderConfig(name_or_path=resolve_text_encoder("world"), prompt_length=16)
    model_cfg = cfg.model.build(64, encoder.prompt_length)
    torch.manual_seed(0)
    save_weights(tmp_path / "w", MMJiT(model_cfg).state_dict(), model_cfg, encoder, DenoiserConfig(),
                 name="ema_0.995", extra={"step": 7})
    out = tmp_path / "rows.jsonl"
    assert learn.main(["--score", "--load", str(tmp_path / "w"), "--jsonl", str(out), "eval.per_kind=2",
                       "eval.sampler.sampler=euler", "eval.sampler.steps=2", "eval.cfg_scales=[1.0, 2.5]",
                       "eval.seeds=[0, 1]"]) == 0
    row = json.loads(out.read_text())
    assert row["step"] == 7 and row["sampler"].startswith("euler 2 steps")
    for name in (*learn.CATEGORIES, *learn.COUNT_CHECKS):
        for scale in ("1", "2.5"):
            assert 0 <= row[f"{name}@cfg{scale}"] <= 1, (name, scale, row)
    with pytest.raises(ValueError, match="draw 32px images.*world.size=64"):
        learn.main(["--score", "--load", str(tmp_path / "w"), "world.size=64"])
    with pytest.raises(ValueError, match="--score needs --load"):
        learn.main(["--score"])
