"""Training runs that several test modules check (each is expensive: Ray Train workers, DeepSpeed,
Ray Data), made once per session on the session's Ray."""

from __future__ import annotations

import copy
import json
import signal
import time

import pytest

from tests.jobs.train.fixtures import make_dataset, make_world_dataset, tiny, trace


@pytest.fixture(scope="session")
def squares(tmp_path_factory):
    """40 rows -> 38 usable (2 failed fetches), one corrupt image, an empty shard: 4 steps per epoch."""
    root = tmp_path_factory.mktemp("train") / "squares"
    return str(make_dataset(str(root), n=40, size=16, shards=3, failed=(3, 17), corrupt=(5,), empty_shard=True))


@pytest.fixture(scope="session")
def world_data(tmp_path_factory):
    """48 synthetic-world scenes at 32 px (exact captions the world checker reads): 6 steps of 8."""
    return make_world_dataset(str(tmp_path_factory.mktemp("train") / "world"))


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Where the shared runs keep their checkpoints, logs and traces."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def reference_run(ray_session, squares, runs, s3_server):
    """One worker, 3 steps, checkpoints on S3 (moto on loopback), with the sample order of two
    streams (data.partitions=2) so the 2-worker runs' steps compare with it. It decodes in actors of
    their own (data.decode_actors=1, the GPU presets' layout), the other runs in their readers (the
    debug preset's 0): the comparisons show both serve the same batches."""
    from jobs.train.driver import main

    cfg = tiny(runs, squares, "ref", "scaling.num_workers=1", "data.partitions=2", "optim.steps=3",
               "data.decode_actors=1", "storage_path=s3://test-bucket/runs")
    sigint = signal.getsignal(signal.SIGINT)
    result = main(cfg)
    return {"result": result, "steps": copy.deepcopy(trace(runs / "trace" / "ref")), "cfg": cfg,
            "sigint_kept": signal.getsignal(signal.SIGINT) is sigint, "controllers_left": live_actors("TrainController")}


def live_actors(class_name: str, wait_s: float = 30) -> int:
    """How many actors of `class_name` are alive on the session's Ray once those ending have ended
    (waiting up to `wait_s`)."""
    import ray._private.state

    deadline = time.monotonic() + wait_s
    while True:
        alive = [a for a in ray._private.state.actors().values()
                 if a.get("ActorClassName") == class_name and a.get("State") == "ALIVE"]
        if not alive or time.monotonic() > deadline:
            return len(alive)
        time.sleep(0.5)


@pytest.fixture(scope="session")
def zero_runs(ray_session, squares, runs):
    """16 steps on 2 workers with ZeRO-2 (also logging to W&B offline and a local MLflow store) and
    with ZeRO-3; the trace of each as it stood when the run finished."""
    from jobs.train.driver import main

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        for stage in (2, 3):
            name = f"zero{stage}"
            result = main(tiny(runs, squares, name, "scaling.num_workers=2", f"optim.zero_stage={stage}", "optim.steps=16",
                               *(tracking(runs) if stage == 2 else [])))
            out[name] = {"result": result, "steps": copy.deepcopy(trace(runs / "trace" / name))}
    return out


def tracking(runs) -> list[str]:
    """The zero2 run's trackers: W&B (offline files) and MLflow (a local store)."""
    return ["logging.wandb_project=minit2i-test", f"logging.mlflow_tracking_uri={(runs / 'mlruns').as_uri()}"]


def state_of(checkpoint) -> dict:
    return json.loads((checkpoint / "train_state.json").read_text())
