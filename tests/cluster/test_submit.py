"""`minit2i submit` and plain `ray job submit` against a real local cluster with token auth.

One LocalCluster (head + 1 worker, 1 CPU each) for the module; the jobs run `minit2i world`, a
quick real command. Everything talks to the cluster through subprocesses and the Job Submission
API, never ray.init in this process.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import LocalCluster
from cluster.submit import entrypoint
from pipelines import world
from tests.conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(num_workers=1, cpus_per_node=1, object_store_memory=100 * 2**20) as c:
        yield c


def submit(cluster: LocalCluster, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("submit", "--address", cluster.dashboard_url, f"token_file={cluster.token_path}", *args,
                   check=False, timeout=180, env=env)


def test_submit_runs_a_command_in_the_uploaded_working_dir_and_returns_0(cluster):
    # A relative output folder lands in the job's working dir: the checkout as uploaded to the cluster.
    done = submit(cluster, f"working_dir={ROOT}", "--", "world", "w", "n=4", "size=32")
    assert done.returncode == 0, done.stderr
    assert "world: 4 scenes" in done.stdout          # the job's log, streamed
    assert "SUCCEEDED" in done.stderr
    # (each node's session_latest link leads to the same files: count them once)
    [tsv] = {os.path.realpath(p) for p in glob.glob(f"{cluster.state.root}/**/working_dir_files/*/w/world.tsv",
                                                     recursive=True)}
    assert [line.split("\t")[1] for line in Path(tsv).read_text().splitlines()] == [
        world.make_scene(i, world.WorldConfig(size=32)).caption for i in range(4)
    ]


def test_submit_returns_the_failed_commands_exit_status(cluster, tmp_path):
    done = submit(cluster, "--", "minit2i", "world", str(tmp_path), "n=0")
    assert done.returncode == 2                      # minit2i's exit status for bad input
    assert "need at least one scene" in done.stdout and "FAILED" in done.stderr
    # The runtime env reaches the driver: MINIT2I_DEBUG=1 turns the clean error into a traceback.
    done = submit(cluster, "runtime_env={env_vars: {MINIT2I_DEBUG: '1'}}", "--", "world", str(tmp_path), "n=0")
    assert done.returncode == 1 and "Traceback" in done.stdout


def test_plain_ray_job_submit_works_with_the_token_env(cluster, tmp_path):
    ray_cli = str(Path(sys.executable).with_name("ray"))
    out = tmp_path / "plain"
    done = subprocess.run([ray_cli, "job", "submit", "--address", cluster.dashboard_url, "--",
                           "minit2i", "world", str(out), "n=3", "size=32"],
                          env=cluster.env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len((out / "world.tsv").read_text().splitlines()) == 3
    # The same command without the token is refused before anything runs.
    no_token = {**cluster.env(), "RAY_AUTH_MODE": "disabled"}
    del no_token["RAY_AUTH_TOKEN_PATH"]
    refused = subprocess.run([ray_cli, "job", "submit", "--address", cluster.dashboard_url, "--", "echo", "hi"],
                             env=no_token, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr


def test_submit_without_the_right_token_is_refused(cluster, tmp_path):
    wrong = run_cli("submit", "--address", cluster.dashboard_url, "token=not-the-token", "--",
                    "world", str(tmp_path), "n=1", check=False, timeout=60)
    assert wrong.returncode == 2 and "refused the request" in wrong.stderr and "Forbidden" in wrong.stderr
    # No token from anywhere: no flag, no RAY_AUTH_TOKEN(_PATH), no ~/.ray/auth_token in this HOME.
    none = run_cli("submit", "--address", cluster.dashboard_url, "--", "world", str(tmp_path), "n=1",
                   check=False, timeout=60,
                   env={"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": "", "RAY_AUTH_MODE": "disabled"})
    assert none.returncode == 2 and "Authentication required" in none.stderr
    assert not (tmp_path / "world.tsv").exists()


def test_entrypoint_checks_the_command():
    assert entrypoint(["minit2i", "world", "a b"]) == "minit2i world 'a b'"
    assert entrypoint(["world", "out", "n=4"]) == "minit2i world out n=4"
    with pytest.raises(ValueError, match="unknown minit2i command 'wrold'"):
        entrypoint(["wrold"])
    with pytest.raises(ValueError, match="nothing to submit"):
        entrypoint(["minit2i"])
