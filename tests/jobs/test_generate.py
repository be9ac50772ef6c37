import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from jobs.generate import GenerateConfig, generate_images, load_generated, read_prompts
from jobs.inference import SamplerSection, load_model, sample_images
from model.denoiser import SamplerConfig
from pipelines import manifest
from tests.conftest import OUTAGE, ROOT, stderr_with
from tests.jobs.metrics.helpers import make_checkpoint, write_prompts

CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "three purple circles", "a white square"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gen"))


def _cfg(tmp_path, ckpt, **kw):
    return GenerateConfig(prompts=str(write_prompts(tmp_path / "p.txt", CAPTIONS)), out=str(tmp_path / "out"),
                          checkpoint=str(ckpt), seeds=[0, 1], shard_size=4, batch_size=3,
                          sampler=SamplerSection(sampler="euler", steps=2, cfg_scale=2.0), **kw)


@pytest.fixture(scope="module")
def local_run(ray_session, tmp_path_factory, ckpt):
    """One local run of the module's settings: (its folder, what it returned). The resume test works
    on a copy; the S3 test compares its shards with these."""
    cfg = _cfg(tmp_path_factory.mktemp("local"), ckpt)
    return cfg, generate_images(cfg)


def test_generate_writes_shards_and_resumes(local_run, tmp_path, ckpt):
    first, stats = local_run
    assert stats["images"] == 10 and stats["generated"] == 10 and stats["images_per_s"] > 0
    out = tmp_path / "out"
    shutil.copytree(first.out, out)
    cfg = replace(first, out=str(out))
    assert sorted(p.name for p in out.glob("shard-*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert manifest.verify(str(out)) == []
    rows = load_generated(str(out))
    assert [(r["index"], r["seed"]) for r in rows] == [(i, s) for i in range(5) for s in (0, 1)]
    assert rows[0]["image"].shape == (32, 32, 3)
    settings = json.loads(rows[0]["settings"])
    assert settings["weights"] == "ema_0.999" and settings["sampler"]["noise_scale"] == 1.0   # from the checkpoint
    # Image (i, s) is exactly what `minit2i sample seed=s` draws for prompt i.
    net, enc, _ = load_model(str(ckpt), None, "debug", None, "cpu")
    ref = sample_images(net, enc, SamplerConfig(sampler="euler", steps=2, cfg_scale=2.0, noise_scale=1.0), CAPTIONS, seeds=1)
    assert np.array_equal(rows[3]["image"], ref[1]) and rows[3]["prompt"] == CAPTIONS[1]

    # Resume: a finished run does nothing; a lost shard is redone identically, the others are kept.
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.parquet")}
    assert generate_images(cfg)["generated"] == 0
    (out / "shard-00001.parquet").unlink()
    (out / "_done" / "00001.json").unlink()
    stats = generate_images(cfg)
    assert stats["generated"] == 4 and stats["skipped_shards"] == 2
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.parquet")} == before

    # Other settings into the same folder are refused, not mixed.
    other = replace(cfg, sampler=replace(cfg.sampler, cfg_scale=5.0))
    with pytest.raises(ValueError, match="other settings"):
        generate_images(other)


def test_generate_png_folder_and_jsonl_metadata(ray_session, tmp_path, ckpt):
    meta = tmp_path / "m.jsonl"
    meta.write_text("".join(json.dumps({"prompt": c, "tag": "t", "include": [{"class": "x"}]}) + "\n" for c in CAPTIONS[:3]))
    cfg = _cfg(tmp_path, ckpt, format="png", weights="model")
    cfg.prompts, cfg.seeds = str(meta), [7]
    assert generate_images(cfg)["generated"] == 3
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 3
    rows = load_generated(str(tmp_path / "out"))
    assert rows[2]["metadata"] == {"tag": "t", "include": [{"class": "x"}]} and rows[2]["image"].shape == (32, 32, 3)
    assert json.loads(rows[0]["settings"])["weights"] == "model"


def test_read_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(str(tmp_path / "none.txt"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: no prompt"):
        read_prompts(str(tmp_path / "bad.jsonl"))


def test_generate_to_s3_rides_out_an_outage(ray_session, s3_server, s3_faults, tmp_path, ckpt, local_run, capfd):
    """Shards written by the sampling actors ride out the tests' outage of SlowDown (OUTAGE, within the retry budget) and
    hold the same images as a local run; no multipart upload or stray object is left."""
    from pipelines import storage

    out = "s3://test-bucket/faults/generate"
    cfg = _cfg(tmp_path, ckpt)
    cfg.out = out
    s3_faults.outage_on("faults/generate/shard-00001.parquet", OUTAGE)
    try:
        assert generate_images(cfg)["generated"] == 10
        recovered = s3_faults.recovery("generate")
    finally:
        s3_faults.clear()
    line = f"generate: PUT {out}/shard-00001.parquet"
    assert line in stderr_with(capfd, line)
    print(recovered)
    assert manifest.verify(out) == [] and manifest.strays(out) == [] and storage.open_uploads(out) == []
    local, _ = local_run
    assert [(s.path, s.sha256) for s in manifest.read(out).shards] == [(s.path, s.sha256) for s in manifest.read(local.out).shards]


def test_a_lost_node_is_replaced_before_ray_has_noticed_the_loss(two_nodes):
    """`LocalCluster.add_worker()` right after a node is killed, as the schedule sweep replaces its lost
    node. Ray lists the dead node as alive until it notices the loss (seconds on a loaded machine), so
    add_worker waits for a node id it has not seen: counting alive nodes waited out its whole start
    timeout when the loss was noticed between the count and the new node's start (a loaded suite run)."""
    from cluster.local import alive_node_ids
    from tests.conftest import kill_worker_node

    before = alive_node_ids(two_nodes.dashboard_url, two_nodes.token)
    kill_worker_node(two_nodes)
    two_nodes.add_worker()
    assert alive_node_ids(two_nodes.dashboard_url, two_nodes.token) - before, "the replacement node is not alive"


def test_generate_survives_losing_a_node_mid_run(two_nodes, tmp_path, ckpt):
    """`minit2i generate` on a 2-node cluster, one sampler actor a node; the worker node's raylet is
    killed once a shard is done. Ray Data restarts the lost actor and reruns its shard: every image
    lands, and the shards done before the loss are not written again."""
    from tests.conftest import kill_node_mid_run

    prompts = write_prompts(tmp_path / "p.txt", CAPTIONS)
    out, done_dir = tmp_path / "out", tmp_path / "out" / "_done"
    done, seen = kill_node_mid_run(two_nodes, [
        "generate", f"prompts={prompts}", f"out={out}", f"checkpoint={ckpt}", "seeds=[0, 1]", "shard_size=1", "batch_size=1",
        "concurrency=2", "sampler.sampler=euler", "sampler.steps=2", "sampler.cfg_scale=2.0"], done_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(seen) < 10, "every shard was done before the kill; the test proved nothing"
    assert "generate: 10 images" in done.stdout
    assert manifest.verify(str(out)) == []
    rows = load_generated(str(out))
    assert [(r["index"], r["seed"]) for r in rows] == [(i, s) for i in range(5) for s in (0, 1)]   # nothing lost
    assert {name: (done_dir / name).stat().st_mtime_ns for name in seen} == seen                   # nothing redone
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


COORDINATOR_PROBE = """
import time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from jobs.ray_init import init_ray, keep_data_coordinator_on_driver_node

def coordinator_node():
    actor = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60)

def remove_coordinator():
    ray.kill(ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator"), no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        except ValueError:
            return
        time.sleep(0.2)
    raise AssertionError("the coordinator outlived ray.kill")

init_ray()
nodes = [n for n in ray.nodes() if n["Alive"]]
head = next(n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"])
worker = next(n["NodeID"] for n in nodes if n["NodeID"] != head)
print("joined", coordinator_node() == head)
# What Ray Data does when no driver made it first: the first Dataset, run by an actor or task on a
# worker node (as Train's ingest split runs), pins the coordinator to that node.
remove_coordinator()
@ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(worker, soft=False))
def first_dataset():
    return len(ray.data.range(4).map(lambda row: row).take_all())
assert ray.get(first_dataset.remote(), timeout=120) == 4
print("ray-data-alone", coordinator_node() == worker)
remove_coordinator()
keep_data_coordinator_on_driver_node()
print("kept", coordinator_node() == head)
"""


def test_a_job_keeps_ray_datas_coordinator_on_its_drivers_node(two_nodes):
    """Ray Data's autoscaling coordinator (one detached actor per cluster, hard-pinned to the node it
    starts on, restarted for ever) is made by a job's driver as it joins the cluster, so it lives on
    the head (jobs/ray_init.py), where Ray Data alone puts it on the node of the first Dataset's
    process: a worker node whose loss would leave it unable to restart."""
    done = subprocess.run([sys.executable, "-c", COORDINATOR_PROBE], cwd=ROOT, env=two_nodes.env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert [line for line in done.stdout.splitlines() if line.split()[0] in ("joined", "ray-data-alone", "kept")] == [
        "joined True", "ray-data-alone True", "kept True"], done.stdout
