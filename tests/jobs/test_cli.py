"""The one command-line rule, and bad input on every command: one line naming the key or path and
what was expected, exit code 2, before any Ray or training starts.

The commands run in this process through `jobs.cli.main` (the console script's own entry point):
every case fails before a cluster would be joined, so no subprocess start is paid per case.
test_every_command_has_bad_input_cases checks that each command has its cases here.
"""

from __future__ import annotations

import os

import pytest

from jobs.cli import COMMANDS, main, split
from tests.conftest import run_cli


def bad_input_cases(tmp):
    """command -> [(args, the error line must contain)]: an unknown key, a wrong type, a missing file."""
    missing = tmp / "missing"
    return {
        "demo": [(["world.nn=5"], "unknown key 'nn' in world; did you mean 'n'?"),
                 (["world=5"], "world must be a section with keys n, size, seed, relation_fraction, got 5"),
                 (["--config", missing / "demo.yaml"], f"--config {missing}/demo.yaml does not exist")],
        "model-info": [(["B/16", "text_dimm=8"], "unknown key 'text_dimm'"), (["B/16", "text_dim=wide"], "text_dim must be an integer or null, got 'wide'"),
                       (["B/16", "--config", missing / "m.yaml"], "does not exist"), ([], "takes PRESET (0 given)")],
        "sample": [(["sampler.cfg=3"], "unknown key 'cfg' in sampler; valid keys: a_min, cfg_interval, cfg_scale"),
                   (["sampler.steps=many"], "sampler.steps must be an integer or null, got 'many'"),
                   ([f"checkpoint={missing}"], f"{missing} does not exist: give a weights folder"),
                   ([f"prompts_file={missing / 'p.txt'}"], f"prompts_file {missing}/p.txt does not exist")],
        "world": [([tmp / "w", "nn=3"], "unknown key 'nn'; did you mean 'n'?"), ([tmp / "w", "n=abc"], "n must be an integer, got 'abc'"),
                  ([tmp / "w", "--config", missing / "w.yaml"], "does not exist")],
        "fetch": [([missing / "u.tsv", tmp / "o", "threds=2"], "unknown key 'threds'; did you mean 'threads'?"),
                  ([missing / "u.tsv", tmp / "o", "threads=many"], "threads must be an integer, got 'many'"),
                  ([missing / "u.tsv", tmp / "o"], f"URL list {missing}/u.tsv does not exist"),
                  ([missing / "u.tsv", tmp / "o", "extra"], "takes URLS OUT (3 given"),
                  ([f"wds={missing}/t-{{0..1}}.tar", f"out={tmp / 'o'}"], "wds: 2 of the 2 tars"),
                  ([f"out={tmp / 'o'}"], "fetch needs an output folder and one input")],
        "recaption": [([missing, tmp / "o", "modle=x"], "unknown key 'modle'; did you mean 'model'?"),
                      ([missing, tmp / "o", "batch_size=[1]"], "batch_size must be an integer, got [1]"),
                      ([missing, tmp / "o", "cache=paged"], "recaption cache must be dynamic or static, got 'paged'"),
                      ([missing, tmp / "o"], f"no manifest.json in {missing}")],
        "cluster": [(["up", "workerz=2"], "unknown key 'workerz'; did you mean 'workers'?"),
                    (["up", "workers=two"], "workers must be an integer, got 'two'"),
                    (["status", f"state={missing / 'c.json'}"], f"no local cluster state at {missing}/c.json"),
                    (["sideways"], "unknown action 'sideways': one of up, down, status")],
        "submit": [(["tokn=x", "--", "demo"], "unknown key 'tokn'; did you mean 'token'?"),
                   (["wait=maybe", "--", "demo"], "wait must be true/false, got 'maybe'"),
                   ([f"token_file={missing}", "--", "demo"], f"token_file {missing} does not exist")],
        "encode-text": [([missing, tmp / "o", "text_encoder.prompt_lenght=16"], "unknown key 'prompt_lenght' in text_encoder"),
                        ([missing, tmp / "o", "text_encoder=tiny-t5"], "text_encoder must be a section with keys name_or_path"),
                        ([missing, tmp / "o"], f"no manifest.json in {missing}")],
        "curate": [(["sources.blip3o=/x"], "sources.blip3o must be a section with keys paths, weight, got '/x'"),
                   (["dedup.near_treshold=2"], "unknown key 'near_treshold' in dedup; did you mean 'near_threshold'?"),
                   ([f"output={tmp / 'ft'}", f"sources.blip3o.paths=[{missing}]"], f"sources.blip3o.paths: {missing} does not exist")],
        "curate-diff": [([missing, tmp, "limt=3"], "unknown key 'limt'; did you mean 'limit'?"),
                        ([missing, tmp, "limit=all"], "limit must be an integer, got 'all'"),
                        ([missing, tmp], f"no manifest.json in {missing}")],
        "generate": [(["promts=p.txt"], "unknown key 'promts'; did you mean 'prompts'?"),
                     (["seeds=[a]"], "seeds[0] must be an integer, got 'a'"),
                     ([f"prompts={missing / 'p.txt'}"], f"prompt file {missing}/p.txt does not exist")],
        "eval": [(["metrics.clip=x"], "unknown key 'clip' in metrics; valid keys: clip_model, coco_captions"),
                 (["metrics=3"], "metrics must be a section with keys world, patch_size"),
                 ([f"images={missing}"], f"no manifest.json in {missing}")],
        "tune": [(["sampling", "objectiv.metric=fid"], "unknown key 'objectiv'; did you mean 'objective'?"),
                 (["sampling", "subsets=abc"], "subsets[0] must be an integer, got 'abc'"),
                 (["sampling", f"checkpoint={missing}"], f"{missing} does not exist: give a weights folder"),
                 (["schedule", "reprot_every=4"], "unknown key 'reprot_every'; did you mean 'report_every'?"),
                 (["schedule", "report_every=often"], "report_every must be an integer, got 'often'"),
                 (["schedule", f"train_config={missing / 'run.yaml'}"], f"train_config {missing}/run.yaml does not exist"),
                 (["schedule", "train={optim.lrr: 1}"], "unknown key 'lrr' in train.optim; did you mean 'lr'?"),
                 (["schedule", "space={denoiser: {tmu: {uniform: [0, 1]}}}", f"train={{data.datasets: [{missing}]}}"],
                  "unknown key 'tmu' in space.denoiser; did you mean 't_mu'?"),
                 (["schedule", f"train={{data.datasets: [{missing}]}}"], f"training dataset {missing} does not exist")],
        "manifest": [(["show", tmp, "jsn=true"], "unknown key 'jsn'; did you mean 'json'?"),
                     (["show", tmp, "json=maybe"], "json must be true/false, got 'maybe'"),
                     (["verify", missing], f"no manifest.json in {missing}"), (["diff", missing], "takes A B (1 given")],
        "train": [(["optim.lrr=1"], "unknown key 'lrr' in optim; did you mean 'lr'?"),
                  (["optim.steps=abc"], "optim.steps must be an integer, got 'abc'"),
                  ([f"data.datasets=[{missing}]"], f"training dataset {missing} does not exist"),
                  (["--config", missing / "run.yaml"], f"--config {missing}/run.yaml does not exist"),
                  (["--frob"], "unknown option --frob: settings are key=value")],
        "weights": [(["import", missing, tmp / "w", "modle=b16"], "unknown key 'modle'; did you mean 'model'?"),
                    (["import", missing, tmp / "w", "model=[1]"], "model must be a string or null, got [1]"),
                    (["import", missing, tmp / "w"], f"{missing} does not exist"),
                    (["export", missing, tmp / "e", "format=comfy"], "the only export format is diffusers"),
                    (["export", missing, tmp / "e"], "has no model.json"),
                    (["merge"], "takes SRC OUT (0 given)"),
                    (["merge", missing, tmp / "m"], f"{missing} does not exist: give a weights folder"),
                    (["unmerge"], "unknown action 'unmerge': one of import, export, merge")],
        "bench": [(["nosuch"], "unknown action 'nosuch': one of fetch, train, index, join, weights, learn, feedback, all"),
                  (["fetch", "rounds=2"], "takes no settings (key=value or --config)"),
                  (["all", "--", "--rounds", "2"], "bench all runs every benchmark with its defaults")],
    }


def test_every_command_has_bad_input_cases(tmp_path):
    assert set(bad_input_cases(tmp_path)) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)                                   # nothing a failing command writes lands in the repo
    for args, expected in bad_input_cases(tmp_path)[command]:
        code, _, error = cli(command, *args)
        assert code == 2 and error.startswith(f"minit2i {command}") and ": error: " in error, (args, error)
        assert expected in error, (args, error)
    assert not (tmp_path / "outputs").exists()


def test_unknown_command_and_help(cli, capsys):
    assert main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "tune sampling|schedule" in capsys.readouterr().out
    code, out, _ = cli("train", "--help")
    assert code == 0 and "default --config: jobs/configs/debug.yaml" in out and "  optim.lr = 0.0004   (a number)" in out
    code, out, _ = cli("fetch", "--help")
    assert code == 0 and "usage: minit2i fetch [URLS] [OUT] [--config FILE] [key=value ...] [--address ADDR]" in out


def test_the_rule_positionals_options_and_passthrough():
    parsed = split(["a.tsv", "s3://b/out", "threads=4", "--config", "f.yaml", "--address=ray://h:10001", "--", "x", "-y"])
    assert (parsed.positionals, parsed.overrides, parsed.config, parsed.address, parsed.rest) == (
        ["a.tsv", "s3://b/out"], ["threads=4"], "f.yaml", "ray://h:10001", ["x", "-y"])
    # A value holding '=' or spaces stays one override; a bare negative number is a positional.
    assert split(["prompt=a = b", "-3"]).overrides == ["prompt=a = b"] and split(["-3"]).positionals == ["-3"]


def test_positionals_and_keys_set_the_same_config(tmp_path):
    from jobs.cli import build_config, resolve

    def config(*argv):
        parsed = split(list(argv))
        _, spec = resolve("fetch", parsed)
        return build_config(spec, parsed, "minit2i fetch")

    by_position = config("urls.tsv", "2024", "threads=4")
    assert by_position == config("urls=urls.tsv", "out='2024'", "threads=4")
    assert by_position.out == "2024" and isinstance(by_position.out, str)      # a positional is the string typed
    with pytest.raises(ValueError, match="out given both as a positional argument and as key=value"):
        config("urls.tsv", "o", "out=p")


def test_address_joins_that_cluster_for_ray_commands(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_ADDRESS", "")                         # restored after the test, whatever main sets
    code, _, error = cli("generate", f"prompts={tmp_path / 'none.txt'}", "--address", "127.0.0.1:1")
    assert code == 2 and "prompt file" in error and os.environ["RAY_ADDRESS"] == "127.0.0.1:1"
    code, _, error = cli("model-info", "debug", "--address", "127.0.0.1:1")
    assert code == 2 and "--address: this command does not run on Ray" in error


def test_a_local_instance_fits_what_the_job_reserves():
    """`minit2i train` on a 2-core laptop: its 2 workers and their data actors reserve 2.5 CPUs, so
    the Ray it starts has 3 (with Ray's own count of 2 the data actors waited for ever); a given
    count or a machine with room is left as it is."""
    from jobs import repo_path
    from jobs.ray_init import local_cpus
    from jobs.train.config import TrainConfig, run_cpus
    from jobs.tune.schedule import trial_resources
    from pipelines import config as config_lib

    debug = config_lib.load(TrainConfig, repo_path("jobs/configs/debug.yaml"), [])
    assert run_cpus(debug) == 2.5
    assert local_cpus(None, run_cpus(debug), machine=2) == 3
    assert local_cpus(None, run_cpus(debug), machine=8) is None and local_cpus(4, 9.0, machine=2) == 4
    assert trial_resources(debug, 0.25)["CPU"] == 2.75


def test_a_local_instance_quiets_the_placement_group_cleaner_it_cannot_serve():
    """A local instance has no dashboard, so Ray Train's PlacementGroupCleaner cannot ask whether the
    controller lives and would log that once a second; the workers' setup hook raises the logger the
    cleaner really uses (a renamed module in a newer Ray would make the hook a silent no-op) to
    errors. The small demo's test checks the run's output holds none of those lines."""
    import logging

    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    from jobs.ray_init import PLACEMENT_GROUP_CLEANER_LOGGER, quiet_placement_group_cleaner

    assert placement_group_cleaner.logger.name == PLACEMENT_GROUP_CLEANER_LOGGER
    level = placement_group_cleaner.logger.level
    try:
        quiet_placement_group_cleaner()
        assert not placement_group_cleaner.logger.isEnabledFor(logging.WARNING)
        assert placement_group_cleaner.logger.isEnabledFor(logging.ERROR)
    finally:
        placement_group_cleaner.logger.setLevel(level)


def test_a_subprocess_run_reports_the_same_one_line(tmp_path):
    proc = run_cli("curate", "sources.blip3o=/x", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("minit2i curate: error: sources.blip3o must be a section")
    assert "Traceback" not in proc.stderr


def _fail_with_storage(batch):
    from pipelines.retry import StorageUnavailable

    raise StorageUnavailable("PUT s3://test-bucket/x/shard-00000.parquet still failing after the 20s budget")


def test_storage_failing_inside_a_ray_data_stage_is_found_as_resumable(ray_session):
    """A Ray Data stage hands a worker's StorageUnavailable back wrapped (UserCodeException, RayTaskError);
    the CLI finds it in the cause chain, so the stage exits 75, not 2 or a traceback."""
    from jobs.cli import resumable_cause
    from pipelines.retry import StorageUnavailable

    with pytest.raises(Exception) as info:
        ray_session.data.range(4).map_batches(_fail_with_storage).materialize()
    cause = resumable_cause(info.value)
    assert isinstance(cause, StorageUnavailable) and "shard-00000.parquet" in str(cause), repr(info.value)
    assert resumable_cause(ValueError("bad key")) is None
