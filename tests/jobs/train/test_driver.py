"""`minit2i train` for real: Ray Train workers, DeepSpeed ZeRO on CPU (gloo), Ray Data, S3 on loopback.

The tiny model (debug preset, depth 1, 16px, tiny T5) keeps each run to seconds of compute; most of
the time is Ray and DeepSpeed starting up, so the tests chain runs rather than starting many.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from ray.train import TrainingFailedError
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file

from pipelines import config as config_lib
from jobs.train import TrainConfig, main, run_id
from jobs.train.data import DataConfig, build_index, epoch_order, steps_per_epoch
from pipelines import storage
from tests.conftest import ROOT, run_cli
from tests.jobs.train.fixtures import make_dataset, wandb_offline_history

G = 8  # global batch in every run


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "squares"
    # 40 rows -> 38 usable (2 failed fetches), one corrupt image, an empty shard: 4 steps per epoch.
    return str(make_dataset(str(root), n=40, size=16, shards=3, failed=(3, 17), corrupt=(5,), empty_shard=True))


def tiny(tmp: Path, data: str, name: str, *overrides: str) -> TrainConfig:
    return config_lib.load(TrainConfig, ROOT / "jobs/configs/debug.yaml", [
        f"name={name}", f"storage_path={tmp / 'runs'}", f"data.datasets=[{data}]", f"data.batch_size={G}",
        "model.overrides={depth: 1, image_size: 16}", "text_encoder.prompt_length=16", "denoiser.caption_dropout=0.1",
        "optim.lr=2e-3", "optim.warmup_steps=4", "ema.decays=[0.0, 0.999]", "checkpoint.every=4", "logging.every=4",
        "logging.sample_every=0", f"logging.trace_dir={tmp / 'trace' / name}", f"logging.dir={tmp / 'logs' / name}",
        "scaling.max_failures=0", *overrides])


def trace(trace_dir: Path) -> dict[int, dict[int, dict]]:
    """step -> rank -> the last logged entry (a step re-done after a restart overwrites)."""
    steps: dict[int, dict[int, dict]] = {}
    for path in sorted(trace_dir.glob("keys-rank*.jsonl")):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            steps.setdefault(e["step"], {})[e["rank"]] = e
    return steps


def step_losses(steps) -> list[float]:
    return [float(np.mean([e["loss"] for e in steps[s].values()])) for s in sorted(steps)]


def expected_keys(data: str, steps: range) -> list[list[str]]:
    """The keys each step must see, recomputed from the manifests, the seed and the order function."""
    cfg = DataConfig(datasets=[data], batch_size=G, partitions=2)     # every run here: 2 streams
    index = build_index(cfg)
    keys = [pq.read_table(storage.resolve(s)[1], columns=["key"]).column("key").to_pylist() for s in index.shards]
    spe = steps_per_epoch(index, G)
    out = []
    for s in steps:
        epoch, within = divmod(s, spe)
        gids = epoch_order(index, cfg, epoch)[within * G:(within + 1) * G]
        out.append([keys[sid][row] for sid, row, _ in index.rows[gids]])
    return out


def assert_no_repeats_no_gaps(data: str, steps: dict, total: int) -> None:
    assert sorted(steps) == list(range(total)), "every step ran exactly once in the final record"
    seen = [sum((steps[s][r]["keys"] for r in sorted(steps[s])), []) for s in range(total)]
    assert seen == expected_keys(data, range(total))


def tensorboard_steps(log_dir: Path, tag: str = "loss") -> list[int]:
    """The steps TensorBoard shows for `tag` (its reader applies the writers' purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def latest(run_dir: Path) -> Path:
    return max((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: json.loads((p / "train_state.json").read_text())["step"])


def test_zero2_zero3_match_one_worker_learn_and_resume_across_world_sizes(ray_session, squares, tmp_path, s3_server, monkeypatch):
    # Reference: 1 worker, checkpoints to S3 (moto on loopback).
    # (partitions=2: the sample order of the 2-worker runs, whose default is one stream per worker.)
    ref = tiny(tmp_path, squares, "ref", "scaling.num_workers=1", "data.partitions=2", "optim.steps=3",
               "storage_path=s3://test-bucket/runs")
    assert main(ref).error is None
    ref_losses = step_losses(trace(tmp_path / "trace" / "ref"))
    s3_ckpts = [p for p in storage.list_files("s3://test-bucket/runs/ref", recursive=True) if p.endswith("train_state.json")]
    assert s3_ckpts and json.loads(storage.read_bytes(s3_ckpts[-1]))["step"] == 3

    # Finetune's start: init_from the reference run's folder on S3 means its newest checkpoint,
    # pinned in the config; at lr 0 the one step keeps the loaded weights exactly.
    ft = tiny(tmp_path, squares, "ft", "scaling.num_workers=1", "optim.steps=1", "optim.lr=0", "optim.warmup_steps=0",
              "checkpoint.init_from=s3://test-bucket/runs/ref", "checkpoint.init_weights=model")
    assert main(ft).error is None
    assert ft.checkpoint.init_from == s3_ckpts[-1].rsplit("/", 1)[0]
    loaded = load_file(latest(tmp_path / "runs" / "ft") / "model.safetensors")
    pretrained = safetensors_load(storage.read_bytes(storage.join(ft.checkpoint.init_from, "model.safetensors")))
    assert loaded.keys() == pretrained.keys() and all(torch.equal(loaded[k], pretrained[k]) for k in loaded)
    # Re-run with more steps: the run continues from its own checkpoint and reads no init_from.
    assert main(tiny(tmp_path, squares, "ft", "scaling.num_workers=1", "optim.steps=2", "optim.lr=0", "optim.warmup_steps=0",
                     "checkpoint.init_from=s3://test-bucket/runs/gone")).error is None
    assert json.loads((latest(tmp_path / "runs" / "ft") / "train_state.json").read_text())["step"] == 2

    # The ZeRO-2 run also logs to W&B (offline files) and MLflow (a local store) through every re-run.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow_uri = (tmp_path / "mlruns").as_uri()
    track = ["logging.wandb_project=minit2i-test", f"logging.mlflow_tracking_uri={mlflow_uri}"]
    for stage in (2, 3):
        name = f"zero{stage}"
        result = main(tiny(tmp_path, squares, name, "scaling.num_workers=2", f"optim.zero_stage={stage}", "optim.steps=16",
                           *(track if stage == 2 else [])))
        assert result.error is None
        steps = trace(tmp_path / "trace" / name)
        losses = step_losses(steps)
        # Same global batch and per-sample noise: the sharded run's first step matches 1 worker to
        # rounding; after Adam's first updates (which divide by sqrt(v) + eps and so magnify rounding
        # differences in tiny gradients) the next steps agree to within 2%.
        np.testing.assert_allclose(losses[0], ref_losses[0], rtol=1e-5)
        np.testing.assert_allclose(losses[1:3], ref_losses[1:3], rtol=2e-2)
        # It learns: against the untrained model's first loss (a window of early steps is already
        # learning and, with run-to-run rounding drift of ~10% by step 15, too close to call).
        assert np.mean(losses[-4:]) < 0.7 * losses[0], losses
        ckpt = latest(tmp_path / "runs" / name)
        state = json.loads((ckpt / "train_state.json").read_text())
        assert state["step"] == 16 and state["samples"] == 16 * G and state["world_size"] == 2 and state["passes"] == 1
        assert state["skipped"] >= 1                                 # the corrupt image: counted, not fatal
        # EMA slices consolidated right: decay 0 is exactly the current weights, for every parameter.
        model, ema0 = load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema_0.0.safetensors")
        assert model.keys() == ema0.keys() and all(torch.allclose(model[k], ema0[k], atol=1e-6) for k in model)
        assert_no_repeats_no_gaps(squares, steps, 16)

    # Stop and re-run the same command with more steps: it resumes at 16; then 1 worker takes over
    # (keeping the checkpoint's 2 streams) in 2 passes a step, at the 2 workers' micro batch; a
    # different explicit order setting is refused.
    assert main(tiny(tmp_path, squares, "zero2", "scaling.num_workers=2", "optim.zero_stage=2", "optim.steps=20", *track)).error is None
    with pytest.raises(TrainingFailedError, match="shuffle_rows 1024 vs 4"):
        main(tiny(tmp_path, squares, "zero2", "scaling.num_workers=1", "data.shuffle_rows=4", "optim.steps=24", *track))
    assert main(tiny(tmp_path, squares, "zero2", "scaling.num_workers=1", "optim.zero_stage=2", "optim.steps=24",
                     f"optim.micro_batch={G // 2}", *track)).error is None
    steps = trace(tmp_path / "trace" / "zero2")
    assert_no_repeats_no_gaps(squares, steps, 24)
    assert {steps[s][0]["world"] for s in range(16, 20)} == {2} and {steps[s][0]["world"] for s in range(20, 24)} == {1}
    final = latest(tmp_path / "runs" / "zero2")
    final_state = json.loads((final / "train_state.json").read_text())
    assert (final_state["step"], final_state["world_size"], final_state["passes"], final_state["micro_batch"]) == (24, 1, 2, G // 2)
    assert np.mean(step_losses(steps)[-4:]) < 0.7 * step_losses(steps)[0]

    # Each tracker holds one run for the three runs of the command, with every logged step once.
    logged = list(range(4, 25, 4))
    rid = run_id(str(tmp_path / "runs"), "zero2")
    assert tensorboard_steps(tmp_path / "logs" / "zero2") == logged
    segments = [wandb_offline_history(str(f)) for f in (tmp_path / "logs" / "zero2" / "wandb").glob("offline-run-*/run-*.wandb")]
    assert len(segments) == 3 and {r for r, _ in segments} == {rid}
    wandb_loss = {row["_step"]: row["loss"] for _, rows in segments for row in rows}
    assert sorted(wandb_loss) == logged
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("minit2i").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.tags["minit2i.run_id"] == rid
    assert runs[0].data.params["optim.zero_stage"] == "2" and runs[0].data.params["data.batch_size"] == str(G)
    history = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert sorted(history) == logged and all(history[s] == pytest.approx(wandb_loss[s]) for s in logged)

    # The run samples without DeepSpeed: its folder means its newest complete checkpoint, and an
    # upload cut short (a newer step without its EMA file) is passed over.
    partial = tmp_path / "runs" / "zero2" / "checkpoint_9999-partial"
    partial.mkdir()
    for name in ("train_state.json", "model.json", "model.safetensors", "optimizer.safetensors"):
        (partial / name).write_bytes((final / name).read_bytes())
    (partial / "train_state.json").write_text(json.dumps({**final_state, "step": 99}))
    proc = run_cli("sample", "--checkpoint", tmp_path / "runs" / "zero2", "--steps", "2", "--sampler", "euler",
                   "--out", tmp_path / "grid.png")
    assert f"using its newest checkpoint {final}" in proc.stdout
    assert "ema_0.999" in proc.stdout and (tmp_path / "grid.png").is_file()


def test_cached_text_features_train_like_the_online_encoder(ray_session, squares, tmp_path):
    from model.text_encoder import TextEncoderConfig
    from pipelines import text_features

    cached = str(tmp_path / "squares-t5")
    text_features.run(text_features.EncodeTextConfig(data=squares, out=cached, text_encoder=TextEncoderConfig("tiny-t5", prompt_length=16)))
    common = ["scaling.num_workers=1", "data.partitions=2", "optim.steps=2"]
    assert main(tiny(tmp_path, squares, "online", *common)).error is None
    # With cached features the workers run no T5; rank 0 loads it only to caption the sample grid.
    assert main(tiny(tmp_path, cached, "cached", *common, "data.text_features=true", "logging.sample_every=2",
                     "logging.sample_steps=2")).error is None
    online, from_cache = trace(tmp_path / "trace" / "online"), trace(tmp_path / "trace" / "cached")
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


@pytest.fixture
def two_node_cluster():
    """A real 2-node Ray cluster on loopback (cluster/local.py: `ray start --head` + `ray start
    --address`, 2 CPUs each, token authentication on); yields the environment that points at it."""
    from cluster.local import LocalCluster

    with LocalCluster(num_workers=1, cpus_per_node=2, object_store_memory=200 << 20) as cluster:
        yield cluster.env()


def test_two_node_cluster_survives_a_killed_worker(tmp_path, squares, two_node_cluster):
    trace_dir = tmp_path / "trace"
    total = 32          # long enough that the kill lands mid-run after the first checkpoint registers
    overrides = ["name=kill", f"storage_path={tmp_path / 'runs'}", f"data.datasets=[{squares}]", f"data.batch_size={G}",
                 "model.overrides={depth: 1, image_size: 16}", "text_encoder.prompt_length=16", f"optim.steps={total}",
                 "checkpoint.every=4", "logging.every=4", "logging.sample_every=0", "scaling.num_workers=2",
                 "scaling.placement_strategy=SPREAD", "scaling.max_failures=2", f"logging.trace_dir={trace_dir}",
                 f"logging.dir={tmp_path / 'logs'}"]
    env = two_node_cluster
    job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "train", "--config", str(ROOT / "jobs/configs/debug.yaml"), *overrides],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Wait until the controller has registered the first checkpoint (step 4; its snapshot file
        # lists it), then kill rank 1's process mid-run.
        snapshot = tmp_path / "runs" / "kill" / "checkpoint_manager_snapshot.json"
        deadline = time.time() + 400
        while time.time() < deadline:
            if snapshot.exists() and (trace_dir / "pid-rank1.txt").exists():
                break
            assert job.poll() is None, job.stdout.read()
            time.sleep(0.2)
        first = {r: json.loads((trace_dir / f"pid-rank{r}.txt").read_text()) for r in (0, 1)}
        assert first[0]["node"] != first[1]["node"], "workers should land on both nodes"
        killed_at = max(trace(trace_dir))
        assert killed_at < total - 1, "the run finished before the kill"
        os.kill(first[1]["pid"], signal.SIGKILL)
        out, _ = job.communicate(timeout=500)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out
    after = json.loads((trace_dir / "pid-rank1.txt").read_text())
    assert after["pid"] != first[1]["pid"], "a new worker group took over"
    # The restarted group went back to the last checkpoint (a multiple of 4) and re-did the steps after it.
    # (Found by the process that logged each step: a kill right after a checkpoint re-does no step.)
    entries = [json.loads(line) for line in (trace_dir / "keys-rank0.jsonl").read_text().splitlines()]
    logged = [e["step"] for e in entries]
    restart = next(i for i in range(1, len(entries)) if entries[i]["pid"] != entries[i - 1]["pid"])
    assert logged[restart] % 4 == 0 and 4 <= logged[restart] <= killed_at + 1
    steps = trace(trace_dir)
    assert_no_repeats_no_gaps(squares, steps, total)
    state = json.loads((latest(tmp_path / "runs" / "kill") / "train_state.json").read_text())
    assert state["step"] == total and state["samples"] == total * G
    # TensorBoard shows each logged step once: the restart purged what the failed attempt wrote after its checkpoint.
    assert tensorboard_steps(tmp_path / "logs") == list(range(4, total + 1, 4))


def test_logger_survives_a_failing_tracker_and_names_a_missing_one(tmp_path, capsys):
    from jobs.train import Logger, flat_params, require_tracker

    cfg = tiny(tmp_path, "unused", "log")
    logger = Logger(cfg, str(tmp_path / "tb"), run_id("runs", "log"), start_step=0)
    calls = []

    def down(metrics, step):                # a tracking server that went away mid-run
        calls.append(step)
        raise ConnectionError("tracking server unreachable")

    logger.sinks.append(down)
    for step in (4, 8):
        logger.log({"loss": 1.0 / step}, step, 8)
    logger.close()
    out = capsys.readouterr().out
    assert calls == [4, 8] and out.count("a metrics sink failed at step 4") == 1 and "step 8/8" in out
    assert tensorboard_steps(tmp_path / "tb") == [4, 8]
    with pytest.raises(ValueError, match="logging.wandb_project is set but no_such_tracker is not installed"):
        require_tracker("no_such_tracker", "wandb_project")
    params = flat_params(config_lib.to_dict(cfg))
    assert params["optim.zero_stage"] == "2" and json.loads(params["ema.decays"]) == [0.0, 0.999]
    assert run_id("s3://b/runs", "x") == run_id("s3://b/runs", "x") != run_id("s3://b/runs", "y")


@pytest.mark.parametrize("name, lr, steps, warmup, decay, micro", [
    ("b16_pretrain", 4e-4, 250_000, 5000, 0.99995, 32), ("l16_pretrain", 2e-4, 250_000, 5000, 0.9999, 16),
    ("b16_finetune", 4e-5, 40_000, 1000, 0.99995, 32), ("l16_finetune", 4e-5, 40_000, 1000, 0.9999, 16)])
def test_recipe_configs_are_minit2i_and_run_on_any_gpu_count(name, lr, steps, warmup, decay, micro):
    # CONTEXT.md's recipe; the global batch of 1024 holds on 8 to 128 GPUs through accumulation.
    cfg = config_lib.load(TrainConfig, ROOT / f"jobs/configs/{name}.yaml")
    assert (cfg.optim.lr, cfg.optim.steps, cfg.optim.warmup_steps, cfg.ema.decays) == (lr, steps, warmup, [decay])
    assert (cfg.data.batch_size, cfg.optim.betas[1], cfg.scaling.use_gpu, cfg.optim.micro_batch) == (1024, 0.95, True, micro)
    assert (cfg.denoiser.t_mu, cfg.denoiser.t_sigma, cfg.denoiser.caption_dropout) == (-0.8, 0.8, 0.1)
    assert cfg.model.build(1024, cfg.text_encoder.prompt_length).image_size == 512
    assert cfg.text_encoder.name_or_path == "google/flan-t5-large"
    assert [cfg.optim.accumulation(1024 // gpus) for gpus in (8, 32, 128)] == [(micro, 128 // micro), (micro, 32 // micro), (8, 1)]
    if "finetune" in name:
        assert cfg.checkpoint.init_from and cfg.data.weights == [0.06, 0.016, 0.04]
