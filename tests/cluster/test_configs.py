"""The KubeRay manifests and the AWS launcher config: they parse, agree with each other and with
this checkout (entry points and the files they name exist), and pass Ray's own validation.
Nothing here contacts Kubernetes or AWS."""

from __future__ import annotations

import copy
import re
import shlex

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from jobs.cli import COMMANDS
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"


def load(path: str) -> dict:
    return yaml.safe_load((CLUSTER / path).read_text())


def dockerfile() -> dict[str, str]:
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    return {line.split()[0]: line.split(None, 1)[1] for line in lines if line and not line.startswith("#")}


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def referenced_files(argv: list[str]) -> list[str]:
    """Arguments of a minit2i command line that name files in the checkout (configs)."""
    return [a for a in argv if re.search(r"\.(ya?ml|json|tsv)$", a) and "://" not in a]


def test_raycluster_has_head_gpu_and_cpu_groups_with_token_auth():
    rc = load("kuberay/raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    spec = rc["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert int(containers(groups["gpu"])[0]["resources"]["limits"]["nvidia.com/gpu"]) == 8
    assert "nvidia.com/gpu" not in containers(groups["cpu"])[0]["resources"]["limits"]
    all_containers = containers(spec["headGroupSpec"]) + [c for g in groups.values() for c in containers(g)]
    # One image everywhere, the one cluster/Dockerfile builds on the cluster's Ray version.
    assert len({c["image"] for c in all_containers}) == 1
    assert dockerfile()["FROM"].startswith(f"rayproject/ray:{ray.__version__}-")
    for c in all_containers:
        assert c["resources"]["requests"] == c["resources"]["limits"]  # guaranteed QoS: no eviction mid-run
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_rayjob_runs_an_existing_entrypoint_on_the_same_cluster_spec():
    rj = load("kuberay/rayjob.yaml")
    assert (rj["apiVersion"], rj["kind"]) == ("ray.io/v1", "RayJob")
    assert rj["spec"]["rayClusterSpec"] == load("kuberay/raycluster.yaml")["spec"]
    runtime_env = yaml.safe_load(rj["spec"]["runtimeEnvYAML"])
    # The job runs in the image's checkout, so paths relative to the repository root resolve there.
    assert runtime_env["working_dir"] == dockerfile()["WORKDIR"]
    argv = shlex.split(rj["spec"]["entrypoint"])
    assert argv[0] == "minit2i" and argv[1] in COMMANDS, f"entrypoint {argv[:2]} is not a minit2i command"
    files = referenced_files(argv)
    assert files == ["jobs/configs/b16_pretrain.yaml"]
    missing = [f for f in files if not (ROOT / f).is_file()]
    assert not missing, f"the RayJob entrypoint names files missing from the checkout: {missing}"


def test_aws_cluster_yaml_passes_ray_validation():
    raw = load("aws/cluster.yaml")
    config = prepare_config(copy.deepcopy(raw))  # merges Ray's AWS defaults; no AWS call
    validate_config(config)                      # Ray's JSON schema and node-type checks
    types = config["available_node_types"]
    assert set(types) == {"head", "cpu", "gpu"} and config["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu"]["resources"]["GPU"] == 8 and "GPU" not in types["cpu"]["resources"]
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    for cmd in (config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token ray start" in cmd
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_ray_validation_rejects_a_broken_aws_config():
    raw = load("aws/cluster.yaml")
    raw["available_node_types"]["gpu"]["min_worker"] = 1  # a typo of min_workers
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(raw))
    raw = load("aws/cluster.yaml")
    raw["head_node_type"] = "gpu-head"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(raw))


@pytest.mark.parametrize("preset", ["b16_pretrain", "b16_finetune", "l16_pretrain", "l16_finetune"])
def test_gpu_presets_fit_one_gpu_node(preset):
    # A GPU node runs 8 Train workers, each with its reader and decode actors: the CPUs the preset asks
    # for must fit the GPU node types here, or workers wait for CPUs that never come.
    from jobs.train.config import TrainConfig, run_cpus
    from pipelines import config as config_lib

    cfg = config_lib.load(TrainConfig, ROOT / "jobs" / "configs" / f"{preset}.yaml", ["scaling.num_workers=8"])
    node_cpus = {"aws": load("aws/cluster.yaml")["available_node_types"]["gpu"]["resources"]["CPU"],
                 "kuberay": int(containers(next(g for g in load("kuberay/raycluster.yaml")["spec"]["workerGroupSpecs"]
                                                if g["groupName"] == "gpu"))[0]["resources"]["limits"]["cpu"])}
    for where, cpus in node_cpus.items():
        assert run_cpus(cfg) <= cpus, f"{preset}: 8 workers need {run_cpus(cfg)} CPUs, a {where} GPU node has {cpus}"
