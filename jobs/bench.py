"""`minit2i bench NAME|all [-- OPTIONS]`: benchmarks (speed is measured here, never asserted in tests).

Each benchmark is a module under benchmarks/ with `main(argv) -> int` and its own options, which
follow `--` (`minit2i bench train -- --help`); register it in BENCHMARKS and in jobs/cli.py.
"""

from __future__ import annotations

import importlib

# name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "fetch": ("benchmarks.bench_fetch", "our fetch vs plain img2dataset on a loopback server: images/s and ratio"),
    "train": ("benchmarks.bench_train", "Ray Train + DeepSpeed step vs plain process; Ray Data ingest vs DataLoader; fused vs looped AdamW"),
    "index": ("benchmarks.bench_index", "the training data Index at CC12M scale: pickled size, order and plan time"),
    "join": ("benchmarks.bench_caption_join", "the streamed LLaVA caption join: peak memory vs caption file size"),
    "weights": ("benchmarks.bench_weights", "import, load and export of a B/16-sized released folder (random weights)"),
    "learn": ("benchmarks.learn", "prompt following per category against training steps over a grid of settings (Ray Tune)"),
    "feedback": ("benchmarks.feedback", "the demo trained plain, with statistics and with statistics + critic sampling"),
}


def _run(name: str, argv: list[str]) -> int:
    return int(importlib.import_module(BENCHMARKS[name][0]).main(argv) or 0)


def fetch(_cfg, argv: list[str]) -> int:
    return _run("fetch", argv)


def train(_cfg, argv: list[str]) -> int:
    return _run("train", argv)


def index(_cfg, argv: list[str]) -> int:
    return _run("index", argv)


def join(_cfg, argv: list[str]) -> int:
    return _run("join", argv)


def weights(_cfg, argv: list[str]) -> int:
    return _run("weights", argv)


def learn(_cfg, argv: list[str]) -> int:
    return _run("learn", argv)


def feedback(_cfg, argv: list[str]) -> int:
    return _run("feedback", argv)


def all_(_cfg, argv: list[str]) -> int:
    if argv:
        raise ValueError("bench all runs every benchmark with its defaults; give options to one benchmark (bench NAME -- ...)")
    status = 0
    for name in BENCHMARKS:
        status |= _run(name, [])
    return status
