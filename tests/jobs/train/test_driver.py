"""`minit2i train` for real: Ray Train workers, DeepSpeed ZeRO on CPU (gloo), Ray Data, S3 on loopback.

The tiny model (debug preset, depth 1, 16px, tiny T5) keeps each run to seconds of compute; most of
the time is Ray and DeepSpeed starting up, so the runs are session fixtures (tests/jobs/conftest.py)
that these tests check step by step, and that `tune schedule`'s test compares its trials with.
A worker killed mid-run on a two-node cluster is tested through a schedule trial
(tests/jobs/tune/test_schedule.py): a trial is this job.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file

from jobs.train.driver import main
from jobs.train.tracking import run_id
from pipelines import storage
from tests.conftest import ROOT, run_cli
from tests.jobs.conftest import state_of, tracking
from tests.jobs.train.fixtures import (G, assert_no_repeats_no_gaps, latest, step_losses, tensorboard_steps, tiny, trace,
                                       wandb_offline_history)


def test_reference_run_checkpoints_to_s3(reference_run):
    assert reference_run["result"].error is None
    # The run ended whole: Ctrl+C is the caller's again, and no Train controller outlives its run.
    assert reference_run["sigint_kept"] and reference_run["controllers_left"] == 0
    s3_ckpts = [p for p in storage.list_files("s3://test-bucket/runs/ref", recursive=True) if p.endswith("train_state.json")]
    assert s3_ckpts and json.loads(storage.read_bytes(s3_ckpts[-1]))["step"] == 3
    assert sorted(reference_run["steps"]) == [0, 1, 2]


def test_finetune_starts_from_a_run_folder_on_s3_and_then_from_its_own_checkpoints(reference_run, squares, runs):
    # Finetune's start: init_from the reference run's folder on S3 means its newest checkpoint,
    # pinned in the config; at lr 0 the one step keeps the loaded weights exactly.
    s3_ckpts = [p for p in storage.list_files("s3://test-bucket/runs/ref", recursive=True) if p.endswith("train_state.json")]
    ft = tiny(runs, squares, "ft", "scaling.num_workers=1", "optim.steps=1", "optim.lr=0", "optim.warmup_steps=0",
              "checkpoint.init_from=s3://test-bucket/runs/ref", "checkpoint.init_weights=model")
    assert main(ft).error is None
    assert ft.checkpoint.init_from == s3_ckpts[-1].rsplit("/", 1)[0]
    loaded = load_file(latest(runs / "runs" / "ft") / "model.safetensors")
    pretrained = safetensors_load(storage.read_bytes(storage.join(ft.checkpoint.init_from, "model.safetensors")))
    assert loaded.keys() == pretrained.keys() and all(torch.equal(loaded[k], pretrained[k]) for k in loaded)
    # Re-run with more steps: the run continues from its own checkpoint and reads no init_from.
    assert main(tiny(runs, squares, "ft", "scaling.num_workers=1", "optim.steps=2", "optim.lr=0", "optim.warmup_steps=0",
                     "checkpoint.init_from=s3://test-bucket/runs/gone")).error is None
    assert state_of(latest(runs / "runs" / "ft"))["step"] == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_matches_one_worker_and_learns(zero_runs, reference_run, squares, runs, stage):
    name = f"zero{stage}"
    assert zero_runs[name]["result"].error is None
    steps = zero_runs[name]["steps"]
    losses, ref_losses = step_losses(steps), step_losses(reference_run["steps"])
    # Same global batch, per-sample noise and (seeded) initial weights: the sharded run's first
    # step matches 1 worker to rounding; after Adam's first updates (which divide by sqrt(v) + eps
    # and so magnify rounding differences in tiny gradients) the next steps agree to within 2%.
    np.testing.assert_allclose(losses[0], ref_losses[0], rtol=1e-5)
    np.testing.assert_allclose(losses[1:3], ref_losses[1:3], rtol=2e-2)
    # It learns: against the untrained model's first loss (a window of early steps is already
    # learning and, with run-to-run rounding drift of ~10% by step 15, too close to call).
    assert np.mean(losses[-4:]) < 0.7 * losses[0], losses
    ckpt = next(p for p in (runs / "runs" / name).glob("checkpoint_*") if p.is_dir() and state_of(p)["step"] == 16)   # (later re-runs add more)
    state = state_of(ckpt)
    assert state["step"] == 16 and state["samples"] == 16 * G and state["world_size"] == 2 and state["passes"] == 1
    assert state["skipped"] >= 1                                 # the corrupt image: counted, not fatal
    # EMA slices consolidated right: decay 0 is exactly the current weights, for every parameter.
    model, ema0 = load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema_0.0.safetensors")
    assert model.keys() == ema0.keys() and all(torch.allclose(model[k], ema0[k], atol=1e-6) for k in model)
    assert_no_repeats_no_gaps(squares, steps, 16)


@pytest.fixture(scope="module")
def resumed_zero2(zero_runs, squares, runs):
    """The zero2 run re-run with more steps (it resumes at 16), then taken over by 1 worker (keeping
    the checkpoint's 2 streams) in 2 passes a step at the 2 workers' micro batch."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        first = main(tiny(runs, squares, "zero2", "scaling.num_workers=2", "optim.zero_stage=2", "optim.steps=20", *tracking(runs)))
        # A different explicit order setting is refused by the driver, before any worker starts.
        with pytest.raises(ValueError, match="shuffle_rows 1024 vs 4"):
            main(tiny(runs, squares, "zero2", "scaling.num_workers=1", "data.shuffle_rows=4", "optim.steps=24", *tracking(runs)))
        second = main(tiny(runs, squares, "zero2", "scaling.num_workers=1", "optim.zero_stage=2", "optim.steps=24",
                           f"optim.micro_batch={G // 2}", *tracking(runs)))
    return first, second


def test_rerun_resumes_on_any_number_of_workers(resumed_zero2, squares, runs):
    assert all(r.error is None for r in resumed_zero2)
    steps = trace(runs / "trace" / "zero2")
    assert_no_repeats_no_gaps(squares, steps, 24)
    assert {steps[s][0]["world"] for s in range(16, 20)} == {2} and {steps[s][0]["world"] for s in range(20, 24)} == {1}
    final_state = state_of(latest(runs / "runs" / "zero2"))
    assert (final_state["step"], final_state["world_size"], final_state["passes"], final_state["micro_batch"]) == (24, 1, 2, G // 2)
    assert np.mean(step_losses(steps)[-4:]) < 0.7 * step_losses(steps)[0]


def test_trackers_hold_one_run_across_reruns(resumed_zero2, runs, monkeypatch):
    # Each tracker holds one run for the three runs of the command, with every logged step once.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logged = list(range(4, 25, 4))
    rid = run_id(str(runs / "runs"), "zero2")
    assert tensorboard_steps(runs / "logs" / "zero2") == logged
    segments = [wandb_offline_history(str(f)) for f in (runs / "logs" / "zero2" / "wandb").glob("offline-run-*/run-*.wandb")]
    assert len(segments) == 3 and {r for r, _ in segments} == {rid}
    wandb_loss = {row["_step"]: row["loss"] for _, rows in segments for row in rows}
    assert sorted(wandb_loss) == logged
    import mlflow

    mlflow_uri = (runs / "mlruns").as_uri()
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    found = client.search_runs([client.get_experiment_by_name("minit2i").experiment_id])
    assert len(found) == 1 and found[0].info.status == "FINISHED" and found[0].data.tags["minit2i.run_id"] == rid
    assert found[0].data.params["optim.zero_stage"] == "2" and found[0].data.params["data.batch_size"] == str(G)
    history = {m.step: m.value for m in client.get_metric_history(found[0].info.run_id, "loss")}
    assert sorted(history) == logged and all(history[s] == pytest.approx(wandb_loss[s]) for s in logged)


def test_run_folder_samples_its_newest_complete_checkpoint(resumed_zero2, runs, tmp_path):
    # The run samples without DeepSpeed: its folder means its newest complete checkpoint, and an
    # upload cut short (a newer step without its EMA file) is passed over.
    final = latest(runs / "runs" / "zero2")
    final_state = state_of(final)
    partial = runs / "runs" / "zero2" / "checkpoint_9999-partial"
    partial.mkdir()
    try:
        for name in ("train_state.json", "model.json", "model.safetensors", "optimizer.safetensors"):
            (partial / name).write_bytes((final / name).read_bytes())
        (partial / "train_state.json").write_text(json.dumps({**final_state, "step": 99}))
        proc = run_cli("sample", f"checkpoint={runs / 'runs' / 'zero2'}", "sampler.steps=2", "sampler.sampler=euler",
                       f"out={tmp_path / 'grid.png'}")
    finally:
        for f in partial.iterdir():
            f.unlink()
        partial.rmdir()
    assert f"using its newest checkpoint {final}" in proc.stdout
    assert "ema_0.999" in proc.stdout and (tmp_path / "grid.png").is_file()


def test_cached_text_features_train_like_the_online_encoder(ray_session, reference_run, squares, tmp_path):
    from model.text_encoder import TextEncoderConfig
    from pipelines import text_features

    cached = str(tmp_path / "squares-t5")
    text_features.run(text_features.EncodeTextConfig(data=squares, out=cached, text_encoder=TextEncoderConfig("tiny-t5", prompt_length=16)))
    # With cached features the workers run no T5; rank 0 loads it only to caption the sample grid.
    # The online reference is the session's 1-worker run: the same settings, one step longer.
    assert main(tiny(tmp_path, cached, "cached", "scaling.num_workers=1", "data.partitions=2", "optim.steps=2",
                     "data.text_features=true", "logging.sample_every=2", "logging.sample_steps=2")).error is None
    online, from_cache = reference_run["steps"], trace(tmp_path / "trace" / "cached")
    assert [from_cache[s][0]["keys"] for s in (0, 1)] == [online[s][0]["keys"] for s in (0, 1)]   # same order
    losses, reference = step_losses(from_cache), step_losses(online)
    np.testing.assert_allclose(losses[0], reference[0], rtol=1e-3)            # float16 storage of the features
    np.testing.assert_allclose(losses[1], reference[1], rtol=2e-2)            # (Adam magnifies rounding, see above)
    assert (tmp_path / "logs" / "cached" / "samples-0000002.png").is_file()
    with pytest.raises(ValueError, match="made by tiny-t5 at prompt length 16, but text_encoder says tiny-t5 at 20"):
        main(tiny(tmp_path, cached, "x", "data.text_features=true", "text_encoder.prompt_length=20"))


def test_bad_config_key_missing_dataset_and_bad_resume_are_loud(tmp_path, squares):
    proc = run_cli("train", "--config", ROOT / "jobs/configs/debug.yaml", "optim.lrr=1", check=False)
    assert proc.returncode == 2 and "unknown key 'lrr'" in proc.stderr and "did you mean 'lr'" in proc.stderr
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(tiny(tmp_path, str(tmp_path / "nope"), "x"))
    (tmp_path / "not-a-ckpt").mkdir()
    (tmp_path / "not-a-ckpt" / "train_state.json").write_text("{")
    with pytest.raises(FileNotFoundError, match="resume_from .* does not exist"):
        main(tiny(tmp_path, squares, "x", f"checkpoint.resume_from={tmp_path / 'missing'}"))
    with pytest.raises(ValueError, match="not a training checkpoint .it has no optimizer.safetensors. nor a run folder"):
        main(tiny(tmp_path, squares, "x", f"checkpoint.resume_from={tmp_path / 'not-a-ckpt'}"))
    with pytest.raises(FileNotFoundError, match="checkpoint.init_from: .*not-a-ckpt has no model.json and no complete checkpoint"):
        main(tiny(tmp_path, squares, "x", f"checkpoint.init_from={tmp_path / 'not-a-ckpt'}"))
    with pytest.raises(ValueError, match="multiple of scaling.num_workers"):
        main(tiny(tmp_path, squares, "x", "scaling.num_workers=3"))
    with pytest.raises(ValueError, match=f"optim.micro_batch 3 must divide the per-worker batch {G // 2}"):
        main(tiny(tmp_path, squares, "x", "scaling.num_workers=2", "optim.micro_batch=3"))
    with pytest.raises(FileNotFoundError, match="eval.prompts .*none.txt does not exist"):
        main(tiny(tmp_path, squares, "x", "eval.every=4", f"eval.prompts={tmp_path / 'none.txt'}"))


def test_a_run_failed_past_max_failures_is_resumable_only_with_a_checkpoint(reference_run, tmp_path, monkeypatch, capsys):
    """Workers failing past scaling.max_failures end `fit()` with TrainingFailedError. A run folder
    holding a complete checkpoint resumes when the same command runs again: exit 75 and the sentence
    that says so; a run with no checkpoint yet is a plain failure (1)."""
    from ray.train import TrainingFailedError

    from jobs import cli
    from jobs.train import driver

    def fail(cfg):
        raise TrainingFailedError("Training failed: worker rank 1 died (SIGKILL)\nmore detail")

    monkeypatch.setattr(driver, "main", fail)
    ref = reference_run["cfg"]
    code = cli.main(["train", f"name={ref.name}", f"storage_path={ref.storage_path}"])
    err = capsys.readouterr().err
    assert code == 75, err
    assert "failed, resumable: training failed after its checkpoint at step 3" in err and "worker rank 1 died" in err
    assert "run the same command again to resume (exit 75)" in err
    assert cli.main(["train", "name=never-checkpointed", f"storage_path={tmp_path}"]) == 1
    assert "minit2i train: failed: Training failed: worker rank 1 died" in capsys.readouterr().out
