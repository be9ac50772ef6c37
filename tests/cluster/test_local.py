"""A local cluster as a user drives it: `minit2i cluster up`, `status`, jobs sent with `minit2i
submit` and plain `ray job submit`, then `minit2i cluster down`. A real head + worker node on
loopback (1 CPU each) with token auth on.

One cluster for the module (a cluster's start is ~35 CPU-s on the 2-core box), driven only through
the CLI, HTTP and the Job Submission API, never ray.init in this process (the session's
`ray_session` may be running beside it, on other ports and another temp dir). The jobs run
`minit2i world`, a quick real command. The tests run in file order: `down` is the last.
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from cluster.local import LOOPBACK, LocalCluster, alive_nodes, cluster_processes
from cluster.submit import entrypoint
from pipelines import world
from tests.conftest import ROOT, run_cli


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(text)
    return getattr(addr, "ipv4_mapped", None) or addr  # ::ffff:127.0.0.1 is 127.0.0.1


def http_status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster") / "cluster.json"
    run_cli("cluster", "up", f"state={state}", "workers=1", "cpus_per_node=1", "object_store_mb=100", timeout=300)
    cluster = LocalCluster.load(state)
    yield state, cluster
    if state.exists():  # the down test failed part way: still leave nothing running
        cluster.stop()


def test_up_starts_a_head_and_a_worker_node_on_loopback(cli_cluster):
    state, cluster = cli_cluster
    nodes = alive_nodes(cluster.dashboard_url, cluster.token)
    assert len(nodes) == 2
    assert sorted(n["is_head_node"] for n in nodes) == [False, True]
    assert {n["node_ip"] for n in nodes} == {LOOPBACK}
    assert all(n["resources_total"]["CPU"] == 1 for n in nodes)
    status = run_cli("cluster", "status", f"state={state}")
    assert "2 node(s) alive" in status.stdout
    assert f"export RAY_AUTH_TOKEN_PATH={cluster.token_path}" in status.stdout
    # The cluster's connections are all on loopback (listening sockets may be on a wildcard).
    for proc in cluster_processes(cluster.state):
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN:
                assert ip(conn.laddr.ip).is_loopback or ip(conn.laddr.ip).is_unspecified, conn
            if conn.raddr:
                assert ip(conn.raddr.ip).is_loopback, conn


def test_token_auth_is_on(cli_cluster):
    _, cluster = cli_cluster
    assert stat.S_IMODE(os.stat(cluster.token_path).st_mode) == 0o600
    url = f"{cluster.dashboard_url}/api/version"
    assert http_status(url, None) == 401             # no token: refused
    assert http_status(url, "not-the-token") == 403  # wrong token: refused
    assert http_status(url, cluster.token) == 200
    assert http_status(f"{cluster.dashboard_url}/api/jobs/", None) == 401


def test_up_refuses_a_second_cluster_on_the_same_state(cli_cluster):
    state, _ = cli_cluster
    again = run_cli("cluster", "up", f"state={state}", check=False, timeout=60)
    assert again.returncode == 2 and "already running" in again.stderr


@pytest.fixture
def cluster(cli_cluster) -> LocalCluster:
    return cli_cluster[1]


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


def test_down_leaves_no_process_and_no_files(cli_cluster):
    state, cluster = cli_cluster
    saved = json.loads(state.read_text())
    assert cluster_processes(cluster.state)
    run_cli("cluster", "down", f"state={state}", timeout=120)
    assert not state.exists() and not os.path.exists(saved["root"])
    assert cluster_processes(cluster.state) == []
    # Nothing anywhere still names the cluster's temp dir (raylets, workers, agents, drivers).
    leftovers = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(saved["root"] in arg for arg in proc.info["cmdline"] or ()):
            leftovers.append(proc)
    assert leftovers == []
    gone = run_cli("cluster", "status", f"state={state}", check=False)
    assert gone.returncode == 2 and "no local cluster state" in gone.stderr
