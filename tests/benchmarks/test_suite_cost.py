"""benchmarks/suite_cost.py: process kinds from real command lines, and CPU booked to the process that spent it."""

import json
import sys

from benchmarks.suite_cost import kind, main

VENV = "/work/x/.venv/bin/python"


def test_kinds_of_the_processes_a_suite_starts():
    cases = {
        "ray::RayTrainWorker.execute": ("Ray Train", "Train worker"),
        "ray::TrainController.run": ("Ray Train", "TrainController"),
        "ray::PlacementGroupCleaner": ("Ray Train", "PlacementGroupCleaner"),
        "ray::MapWorker(MapBatches(ReadDecode))": ("Ray Data", "actor ReadDecode"),
        "ray::MapWorker(MapBatches(ReadRows)->MapBatches(DecodeCrop))": ("Ray Data", "actor ReadRows->DecodeCrop"),
        "ray::_StatsActor.update_metrics": ("Ray Data", "_StatsActor"),
        "ray::ImplicitFunc.train": ("Ray Tune", "trial actor"),
        "ray::IDLE": ("Ray", "worker start-up and idle"),
        "ray::DashboardAgent": ("Ray", "dashboard agent"),
        "ray::fetch_shard": ("Ray tasks", "fetch_shard"),
        f"{VENV}\0-u\0/x/site-packages/ray/_private/log_monitor.py\0--session-dir=/tmp/ray": ("Ray", "log monitor"),
        "/x/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray/session": ("Ray", "GCS"),
        "/x/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/x": ("Ray", "raylet"),
        f"{VENV} /work/x/.venv/bin/ray start --head --node-ip-address 127.0.0.4": ("Ray", "`ray start`"),
        f"{VENV} /x/site-packages/ray/_private/workers/default_worker.py --node-ip-address=127.0.0.3": ("Ray", "worker start-up and idle"),
        f"{VENV} -m jobs.cli tune schedule --config /tmp/pytest-of-root/s.yaml": ("minit2i", "tune schedule"),
        f"{VENV} -m jobs.cli sample checkpoint=/tmp/pytest-of-root/ck prompts=[a]": ("minit2i", "sample"),
        f"{VENV} /work/x/.venv/bin/minit2i world w n=4": ("minit2i", "world"),
        f"{VENV} -m pytest -q -n 2": ("pytest", "pytest"),
        f"{VENV} -u -c import sys;exec(eval(sys.stdin.readline()))": ("pytest", "pytest"),
        f"{VENV} -m benchmarks.learn world.n=64": ("other", "python -m benchmarks.learn"),
        "/usr/bin/g++ -O3 x.cpp": ("other", "g++"),
        "[kworker/0:1]": ("other", "kernel threads and exiting processes"),
    }
    for cmd, want in cases.items():
        assert kind(cmd) == want, (cmd, kind(cmd), want)


def test_cpu_is_booked_to_the_process_that_spent_it(tmp_path, capsys):
    """A child that burns 1 CPU-s (counted by its own clock) shows up with about that much."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\n"
    out = tmp_path / "cost.json"
    assert main(["--interval", "0.1", "--json", str(out), "--", sys.executable, "-c", burn]) == 0
    table = capsys.readouterr().out
    assert "CPU by family" in table and "python -c" in table
    result = json.loads(out.read_text())
    child = [r for r in result["kinds"] if r["kind"] == "python -c"]
    assert child and child[0]["processes"] == 1 and 0.9 <= child[0]["cpu_s"] <= 1.5, result["kinds"]
    assert result["exit"] == 0 and result["sampled_cpu_s"] <= result["busy_cpu_s"] + 0.5
    # A failing command's status comes back as the benchmark's.
    assert main(["--interval", "0.1", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
