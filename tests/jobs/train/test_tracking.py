"""Console, TensorBoard, W&B and MLflow logging of a run (rank 0): a failing tracker never stops training."""

import json

import pytest

from jobs.train.tracking import Logger, flat_params, require_tracker, run_id
from pipelines import config as config_lib
from tests.jobs.train.fixtures import tensorboard_steps, tiny


def test_logger_survives_a_failing_tracker_and_names_a_missing_one(tmp_path, capsys):
    cfg = tiny(tmp_path, "unused", "log")
    logger = Logger(cfg, str(tmp_path / "tb"), run_id("runs", "log"), start_step=0)
    calls = []

    def down(metrics, step):                # a tracking server that went away mid-run
        calls.append(step)
        raise ConnectionError("tracking server unreachable")

    logger.sinks.append(down)
    for step in (4, 8):
        logger.log({"loss": 1.0 / step, "step": step}, step, 8)
    logger.close()
    out = capsys.readouterr().out
    assert calls == [4, 8] and out.count("a metrics sink failed at step 4") == 1 and "step 8/8" in out
    assert "step 8/8  loss" in out                               # the step is the x axis, not a logged metric
    assert tensorboard_steps(tmp_path / "tb") == [4, 8]
    with pytest.raises(ValueError, match="logging.wandb_project is set but no_such_tracker is not installed"):
        require_tracker("no_such_tracker", "wandb_project")
    params = flat_params(config_lib.to_dict(cfg))
    assert params["optim.zero_stage"] == "2" and json.loads(params["ema.decays"]) == [0.0, 0.999]
    assert run_id("s3://b/runs", "x") == run_id("s3://b/runs", "x") != run_id("s3://b/runs", "y")
