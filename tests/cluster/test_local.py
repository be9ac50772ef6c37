"""`minit2i cluster up|status|down`: a real head + worker node on loopback with token auth on.

One cluster for the module, driven only through the CLI and HTTP, never ray.init in this process
(the session's `ray_session` may be running beside it, on other ports and another temp dir).
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import urllib.error
import urllib.request

import psutil
import pytest

from cluster.local import LOOPBACK, LocalCluster, alive_nodes, cluster_processes
from tests.conftest import run_cli


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
