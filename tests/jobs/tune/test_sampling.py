"""`minit2i tune sampling`: Ray Tune over the sampling knobs of a fixed checkpoint, on the session's Ray."""

import os
import signal

import pandas as pd
import pytest
from PIL import Image
from ray import tune

from jobs.generate import GenerateConfig
from jobs.tune.sampling import SamplingTuneConfig, default_sampling_space, expand_weights, run_sampling, weight_files
from jobs.tune.search import ObjectiveConfig, SweepConfig
from pipelines import config as config_lib
from tests.jobs.metrics.helpers import make_checkpoint

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


def _sampling_cfg(tmp_path, ckpt, **space):
    return SamplingTuneConfig(
        checkpoint=str(ckpt), subsets=[2, 4], batch_size=4, space={**SPACE, **space},
        objective=ObjectiveConfig(artifact_max=3.0),
        run=SweepConfig(out=str(tmp_path / "tune"), name="s", num_samples=2, max_failures=1, grid_images=4),
    )


def test_tune_sampling_reports_and_survives_an_erroring_trial(ray_session, tmp_path, ckpt):
    cfg = _sampling_cfg(tmp_path, ckpt, sampler={"grid": ["euler", "bogus"]})
    out = run_sampling(cfg)
    table = pd.read_csv(tmp_path / "tune" / "results.csv")
    assert len(table) == 4 and not out["interrupted"]
    errored = table[table.status == "ERROR"]
    assert len(errored) == 2 and errored.error.str.contains("sampler must be one of euler, heun").all()
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
    assert f"minit2i sample checkpoint={ckpt}" in (tmp_path / "tune" / "best_config.yaml").read_text()


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
    first = run_sampling(cfg, callbacks=[InterruptOnce(flag)])
    assert not flag.exists() and first["interrupted"]
    assert any(r["status"] != "TERMINATED" for r in first["table"])
    second = run_sampling(cfg)
    assert second["resumed"] and not second["interrupted"]
    assert {r["trial_id"] for r in second["table"]} == {r["trial_id"] for r in first["table"]}
    assert all(r["status"] == "TERMINATED" for r in second["table"])
    assert len(pd.read_csv(tmp_path / "tune" / "results.csv")) == 2
    assert (tmp_path / "tune" / "best_config.yaml").is_file()


def test_the_weights_file_is_searched_by_default(ckpt):
    # JiT-style models reproduce only after sweeping EMA and CFG together: every weights file of
    # the checkpoint is a choice unless the space says otherwise.
    names = weight_files(str(ckpt))
    assert names == ["ema_0.999", "model"]
    assert expand_weights(default_sampling_space(), names)["weights"] == {"choice": names}
    assert expand_weights({"weights": {"grid": "all"}}, names)["weights"] == {"grid": names}
    assert expand_weights({"weights": None}, names)["weights"] is None


def test_tune_cli_reports_bad_input(tmp_path, cli):
    code, _, error = cli("tune", "sampling", f"run.out={tmp_path}")
    assert code == 2 and "needs checkpoint" in error
    code, _, error = cli("tune", "sampling", f"checkpoint={tmp_path}")
    assert code == 2 and "has no model.json" in error
    code, _, error = cli("tune", "sampling", "objective.mode=maybe")
    assert code == 2 and "objective.mode must be max or min" in error
    code, _, error = cli("tune", "sampling", f"checkpoint={tmp_path}", "space={cfg_scal: 2}")
    assert code == 2 and "unknown key 'cfg_scal' in space: the sampling sweep searches cfg_scale" in error
