"""The `minit2i` command: one console script, one module per subcommand.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported
only when their command runs, so `minit2i --help` stays fast and a laptop without Ray's heavy
extras can still print model info.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Kept in the order a user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jobs.demo", "the embedded default end to end: world -> fetch -> curate -> train -> sample -> eval -> tune"),
    "model-info": ("jobs.model_info", "parameter count and analytic FLOPs of a model preset"),
    "weights": ("jobs.weights", "import MiniT2I's released weights (diffusers folder, minit2i-torch .pt) or export ours"),
    "sample": ("jobs.sample", "sample a PNG grid from a checkpoint (or a fresh debug model)"),
    "world": ("pipelines.world", "write (and serve on 127.0.0.1) a synthetic world of captioned shape scenes"),
    "fetch": ("jobs.fetch", "download a URL list (CC12M) into Parquet shards as Ray tasks, resumable"),
    "recaption": ("jobs.recaption", "caption fetched shards with a VLM (Ray Data actor pool) or join published captions"),
    "cluster": ("cluster.local", "start, stop or inspect a local multi-node Ray cluster on loopback, token auth on"),
    "submit": ("cluster.submit", "run a minit2i command on a Ray cluster through the Job Submission API"),
    "encode-text": ("jobs.encode_text", "cache the frozen T5's caption features beside the images (Ray Data, resumable)"),
    "curate": ("jobs.curate", "build the finetune set from BLIP3o-60K, DALL-E 3 and ShareGPT-4o-Image"),
    "curate-diff": ("jobs.curate_diff", "rows one dataset build added and removed vs another, with reasons"),
    "generate": ("jobs.generate", "prompt file x seeds -> images as Parquet/PNG shards (Ray Data, resumable)"),
    "eval": ("jobs.evaluate", "score a checkpoint: world checks, artifact ratio, CLIP, FID, GenEval, DPG-Bench"),
    "tune": ("jobs.tune", "Ray Tune over sampling knobs (tune sampling) or the noise schedule (tune schedule)"),
    "manifest": ("jobs.manifest_cli", "show, verify or diff dataset manifests"),
    "train": ("jobs.train", "train MM-JiT on Ray Train + DeepSpeed from a run config (resumes by itself)"),
    "bench": ("jobs.bench", "benchmarks: minit2i bench fetch|train|all"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: minit2i COMMAND [options]   (minit2i COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
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
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"minit2i {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError) as err:
        # Bad input (a path, a config key, a preset name, a full disk) is reported as one line that
        # says what and where; MINIT2I_DEBUG=1 shows the traceback as well.
        if os.environ.get("MINIT2I_DEBUG"):
            raise
        print(f"minit2i {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
