import io
import os
import signal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from ray import tune

from pipelines import config as config_lib
from jobs.generate import GenerateConfig, encode_png
from jobs.tune import ObjectiveConfig, RunConfig, SamplingTuneConfig, ScheduleTuneConfig, objective_of, run_tune, search_space
from model.denoiser import SamplerConfig
from model.text_encoder import build_tiny_t5
from tests.jobs.metrics.helpers import make_checkpoint, render_caption

SPACE = {
    "cfg_scale": {"uniform": [1.0, 4.0]},
    "cfg_interval": {"choice": [None, [0.1, 1.0]]},
    "steps": {"choice": [2, 3]},
    "time_shift": {"uniform": [1.0, 3.0]},
    "noise_scale": {"choice": [0.8, 1.0]},
    "weights": {"choice": ["ema_0.999", "model"]},
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tune"))


def test_objective_and_space():
    s = {"world/overall": 0.5, "artifact_ratio": 1.5, "fid": 10.0}
    assert objective_of(s, ObjectiveConfig()) == (0.5, True)
    assert objective_of(s, ObjectiveConfig(metric="fid", mode="min")) == (-10.0, True)
    assert objective_of(s, ObjectiveConfig(artifact_max=1.2, artifact_weight=2.0)) == (pytest.approx(0.5 - 0.6), False)
    assert objective_of(s, ObjectiveConfig(artifact_max=1.2, artifact_mode="infeasible"))[0] < -1e5
    with pytest.raises(ValueError, match="is not computed"):
        objective_of(s, ObjectiveConfig(metric="clip_score"))
    with pytest.raises(ValueError, match="search space steps"):
        search_space({"steps": {"between": [1, 2]}})


def _sampling_cfg(tmp_path, ckpt, **space):
    return SamplingTuneConfig(
        checkpoint=str(ckpt), subsets=[2, 4], batch_size=4, space={**SPACE, **space},
        objective=ObjectiveConfig(artifact_max=3.0),
        run=RunConfig(out=str(tmp_path / "tune"), name="s", num_samples=2, max_failures=1, grid_images=4),
    )


def test_tune_sampling_reports_and_survives_an_erroring_trial(ray_session, tmp_path, ckpt):
    cfg = _sampling_cfg(tmp_path, ckpt, sampler={"grid": ["euler", "bogus"]})
    out = run_tune("sampling", cfg)
    table = pd.read_csv(tmp_path / "tune" / "results.csv")
    assert len(table) == 4 and not out["interrupted"]
    errored = table[table.status == "ERROR"]
    assert len(errored) == 2 and errored.error.str.contains("sampler must be 'euler' or 'heun'").all()
    assert (errored.failures >= 2).all()                                    # retried once, then recorded
    ok = table[table.status == "TERMINATED"]
    assert len(ok) == 2 and ok.objective.notna().all() and (ok["world/overall"].between(0, 1)).all()
    assert ok.artifact_ratio.notna().all() and set(ok.sampler) == {"euler"}
    for name in ("plot.png", "best_grid.png", "worst_grid.png"):
        assert Image.open(tmp_path / "tune" / name).size[0] > 100
    best = config_lib.load(GenerateConfig, tmp_path / "tune" / "best_config.yaml")   # ready for `minit2i generate`
    assert best.checkpoint == str(ckpt) and best.sampler.sampler == "euler" and best.weights in ("ema_0.999", "model")
    top = ok.sort_values("objective", ascending=False).iloc[0]
    assert best.sampler.cfg_scale == pytest.approx(top.cfg_scale) and best.sampler.steps == top.steps
    assert "minit2i sample --checkpoint" in (tmp_path / "tune" / "best_config.yaml").read_text()


class InterruptOnce(tune.Callback):
    """Ctrl+C after the first reported result, once (the flag file is gone when the run is restored)."""

    def __init__(self, flag):
        self.flag = str(flag)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if os.path.exists(self.flag):
            os.remove(self.flag)
            os.kill(os.getpid(), signal.SIGINT)


def test_tune_sampling_restores_an_interrupted_run(ray_session, tmp_path, ckpt):
    cfg = _sampling_cfg(tmp_path, ckpt, sampler={"choice": ["euler", "heun"]})
    flag = tmp_path / "interrupt"
    flag.touch()
    first = run_tune("sampling", cfg, callbacks=[InterruptOnce(flag)])
    assert not flag.exists() and first["interrupted"]
    assert any(r["status"] != "TERMINATED" for r in first["table"])
    second = run_tune("sampling", cfg)
    assert second["resumed"] and not second["interrupted"]
    assert {r["trial_id"] for r in second["table"]} == {r["trial_id"] for r in first["table"]}
    assert all(r["status"] == "TERMINATED" for r in second["table"])
    assert len(pd.read_csv(tmp_path / "tune" / "results.csv")) == 2
    assert (tmp_path / "tune" / "best_config.yaml").is_file()


def test_tune_schedule_short_training_trials(ray_session, tmp_path):
    captions = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "three purple circles"] * 4
    table = pa.table({"image": [encode_png(render_caption(c, 32)) for c in captions], "caption": captions})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "shard-00000.parquet")
    t5 = build_tiny_t5(tmp_path / "t5", d_model=32, num_layers=1, num_heads=2)
    cfg = ScheduleTuneConfig(
        data=str(tmp_path / "data"), model={"depth": 1, "width": 64, "num_heads": 2, "head_dim": 32, "bottleneck": 16},
        text_encoder=str(t5), prompt_length=16, steps=4, report_every=2, batch_size=4, eval_count=4,
        sampler=SamplerConfig(sampler="euler", steps=2, cfg_scale=2.0),
        space={"t_mu": {"uniform": [-1.0, 0.0]}, "t_sigma": {"grid": [0.6, 1.2, -1.0]}, "noise_scale": 1.0},
        run=RunConfig(out=str(tmp_path / "sched"), name="sched", num_samples=1, max_failures=1, grid_images=4),
    )
    out = run_tune("schedule", cfg)
    table = pd.read_csv(tmp_path / "sched" / "results.csv")
    assert len(table) == 3
    bad = table[table.t_sigma < 0]
    assert (bad.status == "ERROR").all() and bad.error.str.contains("t_sigma and noise_scale must be > 0").all()
    ok = table[table.status == "TERMINATED"]
    assert len(ok) == 2 and ok.objective.notna().all() and (ok.step > 0).all() and ok.loss.notna().all()
    best = yaml.safe_load((tmp_path / "sched" / "best_config.yaml").read_text())
    assert set(best["denoiser"]) == {"t_mu", "t_sigma", "noise_scale"} and best["denoiser"]["t_sigma"] > 0
    assert out["best"] == best
    for name in ("plot.png", "best_grid.png", "worst_grid.png"):
        assert (tmp_path / "sched" / name).stat().st_size > 0


def test_tune_cli_reports_bad_input(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("tune", "sampling", f"run.out={tmp_path}", check=False)
    assert proc.returncode == 2 and "needs checkpoint" in proc.stderr
    proc = run_cli("tune", "sampling", f"checkpoint={tmp_path}", check=False)
    assert proc.returncode == 2 and "has no model.json" in proc.stderr
    proc = run_cli("tune", "schedule", f"data={tmp_path / 'none'}", check=False)
    assert proc.returncode == 2 and "holds no Parquet shards" in proc.stderr
    proc = run_cli("tune", "sampling", "objective.mode=maybe", check=False)
    assert proc.returncode == 2 and "objective.mode must be max or min" in proc.stderr


def test_schedule_trials_train_with_the_train_jobs_step_and_resume(tmp_path):
    # A trial trains with jobs/train_step (DeepSpeed in one process) and continues from its own save.
    import torch

    from jobs.tune import TrialData, train_trial

    captions = ["a red circle", "two blue squares"] * 4
    images = np.stack([render_caption(c, 32) for c in captions])
    t5 = build_tiny_t5(tmp_path / "t5", d_model=32, num_layers=1, num_heads=2)
    cfg = ScheduleTuneConfig(
        model={"depth": 1, "width": 64, "num_heads": 2, "head_dim": 32, "bottleneck": 16}, text_encoder=str(t5),
        prompt_length=16, steps=2, report_every=2, batch_size=4, sampler=SamplerConfig(sampler="euler", steps=2),
        run=RunConfig(grid_images=2),
    )
    data = TrialData(images=images, captions=captions, eval_prompts=captions[:2])
    seen = []
    out = train_trial({"t_mu": -0.5, "t_sigma": 1.0, "noise_scale": 1.0}, data, cfg, tmp_path / "trial",
                      on_eval=lambda step, d, summary: seen.append((step, summary["loss"])))
    state = torch.load(out / "train_state.pt")
    assert state["step"] == 2 and any(k.startswith("exp_avg/") for k in state["moments"])   # Adam state from DeepSpeed
    cfg.steps = 4
    train_trial({"t_mu": -0.5, "t_sigma": 1.0, "noise_scale": 1.0}, data, cfg, out, resume=out,
                on_eval=lambda step, d, summary: seen.append((step, summary["loss"])))
    assert [s for s, _ in seen] == [2, 4] and torch.load(out / "train_state.pt")["step"] == 4
    assert all(np.isfinite(loss) for _, loss in seen)
