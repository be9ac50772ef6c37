"""Shared test fixtures: one real local Ray instance per session, a real S3 server on loopback.

Everything here runs for real on 127.0.0.1; nothing talks to any other address.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Ray workers, subprocesses and DeepSpeed must import this checkout, and must stay on the CPU.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# albumentations (under img2dataset, which the fixtures also use to write tars) asks PyPI for updates on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Experiment trackers stay local: W&B offline, no usage telemetry from MLflow or anything honouring DO_NOT_TRACK.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# `make test TEST_WORKERS=N` runs the suite on N pytest-xdist workers (gw0, gw1, ...): each is a
# session of its own, with its own Ray instance, S3 server and clusters, on loopback addresses of its own.
XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def loopback(base: str) -> str:
    """This worker's copy of loopback address `base` (worker k adds 100k to the last number)."""
    head, last = base.rsplit(".", 1)
    return f"{head}.{int(last) + 100 * XDIST_WORKER}"


# Every Ray socket of the tests stays on loopback: Ray replaces 127.0.0.1 with the machine's outward
# address, so the session instance (and every job a test starts) is pinned to 127.0.0.3 (worker 0).
os.environ["MINIT2I_RAY_NODE_IP"] = loopback(os.environ.get("MINIT2I_RAY_NODE_IP", "127.0.0.3"))
# The retry policy of the tests (pipelines/retry.py): a 12 s budget with waits capped at 1 s, so an
# outage of 6 s is survived after several capped waits, and one longer than 12 s is not, without
# minutes of waiting. Set before Ray starts: its workers inherit it.
os.environ.setdefault("MINIT2I_RETRY", "budget=12,first_delay=0.2,max_delay=1")
# The outage the stage tests ride out (seconds). `MINIT2I_TEST_OUTAGE=300` with the default policy
# (`MINIT2I_RETRY=budget=600`) measures the 5-minute case; each such test prints its recovery time.
OUTAGE = float(os.environ.get("MINIT2I_TEST_OUTAGE", "6"))
# Every Ray instance of the tests (the session's, each command's own, the loopback clusters) starts
# without prestarting idle workers for its first driver: on 2 cores their start-up (about a
# CPU-second each) delays the processes the test waits on, and most of them are never used.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
# Ray Train starts a preemption watcher (an actor watching for node drain notices) with every worker
# group; no test cluster sends such notices (a lost node here is a killed raylet, which Train sees
# without it), and each watcher costs a process start, so the tests run without.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train's controller polls its workers every 2 s, so a run ends (and a lost worker is noticed)
# up to a poll or two after its last step: 5.0 s between the workers' last step and the driver's
# result on a tiny 12-step run, 0.5 s with polls 0.25 s apart (43.8 s against 39.4 s in all). The
# suite starts a few dozen Train runs, so the tests poll more often.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# The stage tests read the retry lines that Ray forwards from its workers. Ray's log deduplication
# holds back a line that matches, numbers aside, one another process printed within 5 s (two
# shards' retry lines during one outage), so the line a test waits for could come after it looked.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray's log monitor globs the session's log folder every 0.1 s while it holds under 1,000 files, and a
# test session leaves hundreds of worker logs behind: past the threshold it globs every 0.5 s (new
# workers' lines then reach the driver up to 0.5 s later). Measured on an idle instance holding 207
# log files: 1.7 CPU-s per 30 s against 1.1.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# A node-loss test kills a worker node's raylet; Ray's GCS declares the node dead after 5 failed
# health checks, 3 s apart by default, and until then the actors and tasks that were on it are not
# failed over. Checks 1 s apart find a killed raylet in ~5 s instead of ~15 s; a raylet that stops
# answering under load still needs 5 timed-out checks of 10 s (~55 s instead of ~65 s). Measured on
# the curate node-loss test: 68 s against 51 s.
os.environ.setdefault("RAY_health_check_period_ms", "1000")
# torch in the pytest process and the commands it starts computes on one thread (Ray already gives
# each 1-CPU worker one). With two threads on the 2-core box every op waits at OpenMP's barrier for
# the thread whose core a Ray process holds: tests/model took 110 s with two threads and 52 s with
# one while another process used the other core. On an idle box two threads are faster, by less
# (tests/model plus the sample, weights and inference tests: 76 s against 88 s); the suite's Ray
# processes keep the second core busy much of the time, and one thread bounds the worst case.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The test machine has 2 cores; Ray is told it has 4 logical CPUs so Data tasks fit beside Train workers.
RAY_NUM_CPUS = 4


# Tests that share an expensive session fixture run on one xdist worker, or each worker would build
# it: the training runs of tests/jobs/conftest.py, the node-loss cluster. Every other module is a group
# of its own (its module fixtures are built once).
GROUPS = {
    "tests/jobs/tune/test_schedule.py": "train-runs", "tests/jobs/train/test_driver.py": "train-runs",
    "tests/jobs/test_generate.py": "node-loss", "tests/pipelines/test_curate.py": "node-loss",
    "tests/pipelines/test_fetch.py": "node-loss",
}


# The slowest groups, slowest first (seconds in one process on the 2-core box, 2026-12-03): a worker
# that is free takes the slowest group left, so the long ones start at once and the short ones fill
# in at the end (xdist's own order, most tests first, started the sweep and the demo half-way through
# and left one worker running them alone at the end). Groups not listed follow in xdist's order.
SLOWEST_FIRST = [
    "train-runs",                                   # 406: the schedule sweep and the driver's runs
    "node-loss",                                    # 226
    "tests/jobs/test_demo.py",                      # 149
    "tests/pipelines/test_recaption.py",            # 104
    "tests/jobs/test_start_from_released.py",       # 85
    "tests/jobs/train/test_feedback.py",            # 59
    "tests/cluster/test_local.py",                  # 58
    "tests/pipelines/test_text_features.py",        # 49
    "tests/jobs/tune/test_sampling.py",             # 46
]


def _group(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return GROUPS.get(path, path)


def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling with GROUPS for scopes: each group (a module, or the modules sharing
    a fixture) runs whole on one worker, the slowest first (SLOWEST_FIRST). (xdist's own `loadgroup`
    marks do not reach its scheduler under pytest 9.2, whose node ids xdist 3.8 can no longer rename.)"""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

        def _assign_work_unit(self, node) -> None:
            slowest = next((g for g in SLOWEST_FIRST if g in self.workqueue), None)
            if slowest is not None:
                self.workqueue.move_to_end(slowest, last=False)
            super()._assign_work_unit(node)

    return GroupScheduling(config, log)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """The one local Ray instance the test session shares (started on first use).

    It starts after the loopback S3 server so every Ray worker inherits its AWS_* endpoint."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=RAY_NUM_CPUS,
            include_dashboard=False,
            object_store_memory=1 << 30,
            log_to_driver=True,
            configure_logging=False,
            _node_ip_address=os.environ["MINIT2I_RAY_NODE_IP"],
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_moto():
    """A real S3-speaking server (moto's server mode) on 127.0.0.1; yields its own endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_faults(s3_moto):
    """The fault-injecting proxy (tests/fault_proxy.py) every S3 client of the session talks through;
    it passes requests straight on until a test switches a fault on (and `clear`s it after)."""
    from tests.fault_proxy import FaultProxy

    with FaultProxy(s3_moto) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def s3_server(s3_faults):
    """A real S3 endpoint on 127.0.0.1 (moto behind the fault proxy), with a bucket `test-bucket`.

    Yields the endpoint URL; AWS_* variables point boto3 and pyarrow at it for the session, and so
    Ray workers too (the Ray session starts after this). `s3_moto` is the server without the proxy.
    """
    endpoint = s3_faults.url
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="test-bucket")
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def node_loss_cluster():
    """A Ray cluster on loopback (cluster/local.py: head + one worker node, 1 CPU each, token auth
    on) shared by the node-loss tests. Started once: cluster start-ups are the slow part."""
    from cluster.local import LocalCluster

    # On the session's own loopback address: other Ray instances on the host keep to theirs.
    with LocalCluster(num_workers=1, cpus_per_node=1, object_store_memory=150 << 20,
                      host=os.environ["MINIT2I_RAY_NODE_IP"]) as cluster:
        yield cluster


@pytest.fixture()
def two_nodes(node_loss_cluster):
    """The shared cluster with two live nodes: a worker node lost by an earlier test is replaced.
    `kill_worker_node()` SIGKILLs the worker node's raylet, as a preempted spot instance vanishes.
    Whether the newest worker node lives is read from its raylet process: Ray can still list a
    killed node as alive for a while."""
    if worker_raylet(node_loss_cluster) is None:
        node_loss_cluster.add_worker()
    return node_loss_cluster


def worker_raylet(cluster):
    """The psutil.Process of the raylet of `cluster`'s newest worker node, or None when it is gone."""
    import psutil

    marker = cluster.state.root.rstrip("/") + f"/worker{cluster.state.num_workers}/"
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            if ("raylet" in (proc.info["name"] or "") and proc.info["status"] != psutil.STATUS_ZOMBIE
                    and any(marker in a for a in proc.info["cmdline"] or ())):
                return proc
        except psutil.Error:
            continue
    return None


def kill_worker_node(cluster) -> int:
    """SIGKILL the raylet of `cluster`'s newest worker node; returns its pid."""
    import signal

    proc = worker_raylet(cluster)
    if proc is None:
        raise AssertionError(f"no raylet of the worker node worker{cluster.state.num_workers} of {cluster.state.root}")
    os.kill(proc.pid, signal.SIGKILL)
    return proc.pid


def kill_node_mid_run(cluster, args: list[str], folder: Path, timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict[str, int]]:
    """Run `minit2i ARGS... --address CLUSTER`; once a file appears in `folder` (a commit marker),
    kill the worker node and let the command finish. Returns its outcome and the files seen then
    (name -> mtime in ns, to tell later whether one was written again)."""
    import time

    from pipelines.storage import TEMP_MARK

    def committed() -> dict[str, int]:
        """The files in `folder` (not a temporary one caught before its rename)."""
        found = {}
        for p in folder.iterdir() if folder.exists() else ():
            try:
                if TEMP_MARK not in p.name:
                    found[p.name] = p.stat().st_mtime_ns
            except FileNotFoundError:
                continue
        return found

    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args, "--address", cluster.address], cwd=ROOT,
                            env={**cluster.env(), "RAY_ADDRESS": ""}, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not committed():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"nothing in {folder} within {timeout:.0f}s"
            time.sleep(0.1)
        seen = committed()
        kill_worker_node(cluster)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), seen


def stderr_with(capfd, text: str, timeout: float = 20) -> str:
    """The test's captured stderr once it holds `text` (lines from Ray workers reach the driver
    asynchronously), or all of it after `timeout` seconds, for the assertion to show."""
    err = ""
    deadline = time.monotonic() + timeout
    while True:
        err += capfd.readouterr().err
        if text in err or time.monotonic() > deadline:
            return err
        time.sleep(0.2)


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `minit2i ARGS...` as a real subprocess of this checkout and capture its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"minit2i {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `minit2i ARGS` in this process (the console script's own `main`): for cases that end
    before any cluster is joined, without a subprocess start each. Returns (exit code, stdout, the
    error line)."""
    from jobs.cli import main

    monkeypatch.delenv("MINIT2I_DEBUG", raising=False)

    def call(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        errors = [line for line in err.splitlines() if line.startswith("minit2i ")]
        assert len(errors) <= 1, err
        return code, out, errors[0] if errors else ""

    return call
