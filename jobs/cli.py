"""The `minit2i` command: one console script, one rule for reading every command's arguments.

    minit2i COMMAND [ACTION] [POSITIONAL ...] [--config FILE] [--address ADDR] [key=value ...] [-- ARGS ...]

- Every command has one typed config (a dataclass). `--config FILE` loads it from YAML (some
  commands have a default file), `key=value` overrides set single fields by dotted key
  (`optim.lr=1e-4`, `sources.blip3o.paths=[/data/b]`; values are YAML), later ones win.
- ACTION: commands that do several things take it first (`tune sampling|schedule`,
  `manifest show|verify|diff`, `cluster up|down|status`, `bench NAME`); a new one (e.g.
  `weights import|export|merge`) is one more entry in COMMANDS.
- POSITIONAL arguments are shorthand for the config keys a person expects to give first, in a
  fixed order per command (`minit2i fetch URLS OUT` is `urls=URLS out=OUT`); a new input kind
  is one more key (`minit2i fetch wds=TARS out=OUT`).
- `--address ADDR` joins a Ray cluster (the same as RAY_ADDRESS; without either a Ray job starts
  a local instance, jobs/ray_init.py); for `submit` it is the dashboard to submit to.
- `--` ends minit2i's arguments: what follows goes unchanged to the program the command runs
  (`submit`'s command, a benchmark's own options).
- Bad input (an unknown key, a wrong type, a missing file, a wrong positional) is one line on
  stderr naming the key or path and what was expected, exit code 2 (MINIT2I_DEBUG=1 shows the
  traceback). `minit2i COMMAND --help` lists the command's keys with their defaults.
- A job that failed but kept its committed work (storage still failing when the retry budget ran
  out, shards that failed every attempt) exits 75 (EX_TEMPFAIL) with a line saying that running the
  same command again resumes it. Success is 0.

Modules are imported only when their command runs, so `minit2i --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable

from jobs import repo_path
from pipelines.retry import EXIT_RESUMABLE, RESUME_HINT, STAGE_ENV, Resumable, StorageUnavailable


@dataclass(frozen=True)
class Spec:
    """What one command (or one action of it) reads and runs."""
    run: str                                  # "module:function" taking the config (and `--` args), returning an exit code
    config: str | None = None                 # "module:Class" of its config dataclass; None: no keys (positionals only)
    positionals: tuple[str, ...] = ()         # config keys the positional arguments set, in order
    optional: int = 0                         # how many of the trailing positionals may be left out
    default_config: str | None = None         # YAML read when --config is not given (relative to the repository)
    ray: bool = False                         # runs Ray jobs: --address applies
    passthrough: bool = False                 # takes the arguments after `--`


@dataclass(frozen=True)
class Command:
    help: str
    spec: Spec | None = None
    actions: dict[str, Spec] | None = None    # `minit2i NAME ACTION ...`


COMMANDS: dict[str, Command] = {
    "demo": Command("the embedded default end to end: world -> fetch -> curate -> train -> sample -> eval -> tune",
                    Spec("jobs.demo:run", "jobs.demo:DemoConfig", default_config="jobs/configs/demo.yaml", ray=True)),
    "model-info": Command("parameter count and analytic FLOPs of a model preset",
                          Spec("jobs.model_info:run", "jobs.model_info:ModelInfoConfig", ("preset",))),
    "weights": Command("import MiniT2I's released weights (diffusers folder, minit2i-torch .pt), export ours, merge LoRA",
                       actions={"import": Spec("jobs.weights:import_", "jobs.weights:ImportConfig", ("src", "out")),
                                "export": Spec("jobs.weights:export", "jobs.weights:ExportConfig", ("src", "out")),
                                "merge": Spec("jobs.weights:merge", "jobs.weights:MergeConfig", ("src", "out"))}),
    "sample": Command("sample a PNG grid from a checkpoint (or a fresh debug model)",
                      Spec("jobs.sample:run", "jobs.sample:SampleConfig")),
    "world": Command("write (and serve on 127.0.0.1) a synthetic world of captioned shape scenes",
                     Spec("jobs.world:run", "jobs.world:WorldCommandConfig", ("out",))),
    "fetch": Command("download a URL list (CC12M) into Parquet shards as Ray tasks, resumable",
                     Spec("jobs.fetch:run", "jobs.fetch:FetchCommandConfig", ("urls", "out"), optional=2, ray=True)),
    "recaption": Command("caption fetched shards with a VLM (Ray Data actor pool) or join published captions",
                         Spec("jobs.recaption:run", "pipelines.recaption:RecaptionConfig", ("data", "out"), ray=True)),
    "cluster": Command("start, stop or inspect a local multi-node Ray cluster on loopback, token auth on",
                       actions={a: Spec(f"cluster.local:{a}", "cluster.local:ClusterCommandConfig")
                                for a in ("up", "down", "status")}),
    "submit": Command("run a minit2i command on a Ray cluster through the Job Submission API",
                      Spec("cluster.submit:run", "cluster.submit:SubmitConfig", passthrough=True)),
    "encode-text": Command("cache the frozen T5's caption features beside the images (Ray Data, resumable)",
                           Spec("jobs.encode_text:run", "pipelines.text_features:EncodeTextConfig", ("data", "out"), ray=True)),
    "curate": Command("build the finetune set from BLIP3o-60K, DALL-E 3 and ShareGPT-4o-Image",
                      Spec("jobs.curate:run", "pipelines.curate:CurateConfig",
                           default_config="jobs/configs/curate_finetune.yaml", ray=True)),
    "curate-diff": Command("rows one dataset build added and removed vs another, with reasons",
                           Spec("jobs.curate_diff:run", "jobs.curate_diff:CurateDiffConfig", ("a", "b"))),
    "generate": Command("prompt file x seeds -> images as Parquet/PNG shards (Ray Data, resumable)",
                        Spec("jobs.generate:run", "jobs.generate:GenerateConfig", ray=True)),
    "eval": Command("score a checkpoint: world checks, artifact ratio, CLIP, FID, GenEval, DPG-Bench",
                    Spec("jobs.evaluate:run", "jobs.evaluate:EvalConfig", ray=True)),
    "tune": Command("Ray Tune over sampling knobs (tune sampling) or the training noise schedule (tune schedule)",
                    actions={"sampling": Spec("jobs.tune.sampling:run", "jobs.tune.sampling:SamplingTuneConfig", ray=True),
                             "schedule": Spec("jobs.tune.schedule:run", "jobs.tune.schedule:ScheduleTuneConfig", ray=True)}),
    "manifest": Command("show, verify or diff dataset manifests",
                        actions={"show": Spec("jobs.manifest_cli:show", "jobs.manifest_cli:ShowConfig", ("dataset",)),
                                 "verify": Spec("jobs.manifest_cli:verify", "jobs.manifest_cli:DatasetConfig", ("dataset",)),
                                 "diff": Spec("jobs.manifest_cli:diff", "jobs.manifest_cli:DiffConfig", ("a", "b"))}),
    "train": Command("train MM-JiT on Ray Train + DeepSpeed from a run config (resumes by itself)",
                     Spec("jobs.train.driver:run", "jobs.train.config:TrainConfig", default_config="jobs/configs/debug.yaml",
                          ray=True)),
    "bench": Command("benchmarks (a benchmark's own options go after --)",
                     actions={**{name: Spec(f"jobs.bench:{name}", passthrough=True) for name in ("fetch", "train", "index", "join", "weights", "learn", "feedback")},
                              "all": Spec("jobs.bench:all_", passthrough=True)}),
}

OVERRIDE = re.compile(r"^[A-Za-z_][\w.-]*=")


class UsageError(ValueError):
    """Arguments that do not follow the rule (reported like any bad input: one line, exit 2)."""


def _load(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: minit2i COMMAND [ACTION] [POSITIONAL ...] [--config FILE] [--address ADDR] [key=value ...] [-- ARGS]",
             "       (minit2i COMMAND --help lists its keys)", "", "commands:"]
    for name, cmd in COMMANDS.items():
        actions = f" {'|'.join(cmd.actions)}" if cmd.actions else ""
        lines.append(f"  {name + actions:<{width + 24}}  {cmd.help}")
    return "\n".join(lines)


@dataclass
class Parsed:
    positionals: list[str]
    overrides: list[str]
    config: str | None = None
    address: str | None = None
    rest: list[str] | None = None
    help: bool = False


def split(argv: list[str]) -> Parsed:
    """argv -> positionals, key=value overrides, --config, --address, --help and what follows `--`."""
    out = Parsed([], [])
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            out.rest = argv[i:]
            break
        if arg in ("-h", "--help"):
            out.help = True
        elif arg.split("=", 1)[0] in ("--config", "--address"):
            flag, eq, value = arg.partition("=")
            if not eq:
                if i >= len(argv):
                    raise UsageError(f"{flag} needs a value")
                value, i = argv[i], i + 1
            setattr(out, flag[2:], value)
        elif arg.startswith("-") and len(arg) > 1 and not _is_number(arg):
            raise UsageError(f"unknown option {arg}: settings are key=value (e.g. optim.lr=1e-4); "
                             "the only options are --config FILE, --address ADDR and --help")
        elif OVERRIDE.match(arg):
            out.overrides.append(arg)
        else:
            out.positionals.append(arg)
    return out


def _is_number(arg: str) -> bool:
    try:
        float(arg)
        return True
    except ValueError:
        return False


def resolve(name: str, parsed: Parsed) -> tuple[str | None, Spec]:
    """(action or None, its Spec); consumes the action from the positionals."""
    cmd = COMMANDS[name]
    if cmd.actions is None:
        return None, cmd.spec
    if not parsed.positionals:
        if parsed.help:
            return None, None
        raise UsageError(f"give one of {', '.join(cmd.actions)} (minit2i {name} ACTION ...)")
    action = parsed.positionals.pop(0)
    if action not in cmd.actions:
        raise UsageError(f"unknown action {action!r}: one of {', '.join(cmd.actions)}")
    return action, cmd.actions[action]


def build_config(spec: Spec, parsed: Parsed, where: str):
    """The command's config from --config (or its default), positionals and overrides."""
    from pipelines import config as config_lib

    n, required = len(spec.positionals), len(spec.positionals) - spec.optional
    keys = {o.split("=", 1)[0] for o in parsed.overrides}
    missing = [k for k in spec.positionals[len(parsed.positionals):required] if k not in keys]
    if missing or len(parsed.positionals) > n:
        names = " ".join(k.upper() for k in spec.positionals) or "no positional arguments"
        got = f": {' '.join(parsed.positionals)}" if parsed.positionals else ""
        raise UsageError(f"takes {names} ({len(parsed.positionals)} given{got}); settings are key=value")
    if spec.config is None:
        if parsed.overrides or parsed.config:
            raise UsageError("takes no settings (key=value or --config)")
        return dict(zip(spec.positionals, parsed.positionals))
    cls = _load(spec.config)
    path = parsed.config or (repo_path(spec.default_config) if spec.default_config else None)
    if parsed.config and not os.path.isfile(parsed.config):
        raise FileNotFoundError(f"--config {parsed.config} does not exist")
    # A positional is a string as typed (a path named `2024` stays a string): JSON quotes it for YAML.
    given = [f"{key}={json.dumps(value)}" for key, value in zip(spec.positionals, parsed.positionals)]
    twice = {k for k in spec.positionals[:len(parsed.positionals)] for o in parsed.overrides if o.split("=", 1)[0] == k}
    if twice:
        raise UsageError(f"{', '.join(sorted(twice))} given both as a positional argument and as key=value")
    return config_lib.load(cls, path, given + parsed.overrides)


def describe_keys(cls, prefix: str = "") -> list[str]:
    """`key = default  (type)` lines of a config dataclass, nested sections flattened."""
    from pipelines import config as config_lib

    lines = []
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe_keys(type(value), f"{prefix}{f.name}.")
        else:
            kind = config_lib._describe(hints[f.name])
            lines.append(f"  {prefix}{f.name} = {json.dumps(config_lib.to_dict(value), default=str)}   ({kind})")
    return lines


def command_help(name: str, action: str | None, spec: Spec | None) -> str:
    cmd = COMMANDS[name]
    if spec is None:
        return f"usage: minit2i {name} {'|'.join(cmd.actions)} ...\n{cmd.help}"
    head = f"minit2i {name}{' ' + action if action else ''}"
    pos = " ".join(k.upper() if i < len(spec.positionals) - spec.optional else f"[{k.upper()}]"
                   for i, k in enumerate(spec.positionals))
    opts = (" [--config FILE] [key=value ...]" if spec.config else "") + (" [--address ADDR]" if spec.ray else "") \
        + (" [-- ARGS ...]" if spec.passthrough else "")
    lines = [f"usage: {head} {pos}{opts}".replace("  ", " "), cmd.help]
    if spec.default_config:
        lines.append(f"default --config: {spec.default_config}")
    if spec.config:
        lines += ["", "keys (key = default):", *describe_keys(_load(spec.config))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"minit2i: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    where = f"minit2i {name}"
    try:
        parsed = split(rest)
        action, spec = resolve(name, parsed)
        where = f"minit2i {name}{' ' + action if action else ''}"
        if parsed.help:
            print(command_help(name, action, spec))
            return 0
        if parsed.rest is not None and not spec.passthrough:
            raise UsageError(f"takes no arguments after -- ({' '.join(parsed.rest)})")
        cfg = build_config(spec, parsed, where)
        if parsed.address:
            if spec.config and any(f.name == "address" for f in dataclasses.fields(_load(spec.config))):
                cfg.address = parsed.address                      # submit: the dashboard it talks to
            elif spec.ray:
                os.environ["RAY_ADDRESS"] = parsed.address        # jobs/ray_init.py joins it (and so do child processes)
            else:
                raise UsageError("--address: this command does not run on Ray")
        run: Callable[..., Any] = _load(spec.run)
        outer_stage = os.environ.get(STAGE_ENV)
        os.environ.setdefault(STAGE_ENV, name)                   # names the stage in retry lines, here and in workers
        try:
            return int((run(cfg, parsed.rest or []) if spec.passthrough else run(cfg)) or 0)
        finally:
            if outer_stage is None:                              # a command run in-process leaves no stage behind
                os.environ.pop(STAGE_ENV, None)
    except Exception as err:
        # Committed work is kept (shards, checkpoints, markers): the same command picks up from it. A
        # Ray task or Ray Data stage hands the failure back wrapped, so the cause chain is searched.
        cause = resumable_cause(err)
        if cause is None or os.environ.get("MINIT2I_DEBUG"):
            if cause is None and isinstance(err, (ValueError, OSError)):
                return bad_input(where, err)
            raise
        message = " ".join(str(cause).split("\n")[0].split()) or type(cause).__name__
        print(f"{where}: failed, resumable: {message}\n{where}: {RESUME_HINT} (exit {EXIT_RESUMABLE})", file=sys.stderr)
        return EXIT_RESUMABLE


def resumable_cause(err: BaseException | None) -> BaseException | None:
    """The Resumable failure behind `err`: itself, or one in its cause chain (`raise ... from`, or a
    Ray error's `.cause`); None if there is none. (Not `__context__`: an error raised while another
    was being handled is its own failure.)"""
    first, seen = err, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, Resumable):
            return err
        err = getattr(err, "cause", None) or err.__cause__
    # Ray Data hands a stage's failure back as RayTaskError(UserCodeException) without the original
    # exception object; only its traceback text names it ("pipelines.retry.StorageUnavailable: ...").
    text = str(first) if first is not None and type(first).__module__.startswith("ray.") else ""
    for cls in (StorageUnavailable, Resumable):
        marker = f"{cls.__module__}.{cls.__qualname__}: "
        if marker in text:
            return cls(text.split(marker, 1)[1].splitlines()[0])
    return None


def bad_input(where: str, err: BaseException) -> int:
    """Bad input (a path, a config key, a preset name, a full disk) is reported as one line that says
    what and where; MINIT2I_DEBUG=1 shows the traceback as well."""
    if os.environ.get("MINIT2I_DEBUG"):
        raise err
    message = " ".join(str(err).split("\n")[0].split()) or type(err).__name__
    print(f"{where}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
