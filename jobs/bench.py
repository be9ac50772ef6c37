"""`minit2i bench NAME|all`: benchmarks (speed is measured here, never asserted in tests).

Each benchmark is a module under benchmarks/ with `main(argv) -> int`; register it in BENCHMARKS.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "fetch": ("benchmarks.bench_fetch", "our fetch vs plain img2dataset on a loopback server: images/s and ratio"),
    "train": ("benchmarks.bench_train", "Ray Train + DeepSpeed step vs plain process; Ray Data ingest vs DataLoader"),
    "index": ("benchmarks.bench_index", "the training data Index at CC12M scale: pickled size, order and plan time"),
    "join": ("benchmarks.bench_caption_join", "the streamed LLaVA caption join: peak memory vs caption file size"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=[*BENCHMARKS, "all"], help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (NAME --help for its options)")


def run(args: argparse.Namespace) -> int:
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    status = 0
    for name in names:
        module = importlib.import_module(BENCHMARKS[name][0])
        status |= int(module.main(args.args if args.name != "all" else []) or 0)
    return status
