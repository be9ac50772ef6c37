"""`minit2i demo`: the whole platform end to end on a laptop, offline, in minutes.

local Ray -> synthetic world served on 127.0.0.1 -> fetch (the real downloader) -> curate ->
(recaption, when a captioner is configured) -> train the `debug` MM-JiT with Ray Train + DeepSpeed
on CPU workers -> batch sampling (Ray Data) -> evaluation (exact world checks) -> a small
`tune sampling` sweep -> a summary with every path and the prompt-following score.

Each stage is the same code the real commands run; the demo only wires them with small configs
(`jobs/configs/demo.yaml`). With RAY_ADDRESS set, the same stages run on that cluster.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import repo_path
from pipelines import config as config_lib

# The world categories the demo's prompts cover (jobs/metrics/world.py), in the summary's order.
DEMO_CATEGORIES = ("single_object", "counting", "colours", "shapes", "position", "colour_attribution")

@dataclass
class WorldSection:
    n: int = 4000                  # scenes served and fetched
    size: int = 32                 # image side in pixels (the debug model's resolution)
    seed: int = 0
    relation_fraction: float = 0.4  # share of two-object "left of / above" scenes


@dataclass
class DemoConfig:
    out: str = "outputs/demo"                                  # everything the demo writes
    num_cpus: int = 4                                          # logical CPUs of the local Ray instance
    world: WorldSection = field(default_factory=WorldSection)
    fetch: dict[str, Any] = field(default_factory=dict)        # FetchConfig overrides
    curate: dict[str, Any] = field(default_factory=dict)       # CurateConfig overrides
    recaption: dict[str, Any] = field(default_factory=dict)    # RecaptionConfig overrides; needs `model`
    # The text encoder the demo trains with: "world" is the embedded tiny T5 with the world's own
    # word-level vocabulary (pipelines/world.py: a caption is at most 11 tokens, so steps are cheap);
    # or a local T5 folder, a hub id, or "tiny-t5" (byte-level ByT5 tokens).
    text_encoder: str = "world"
    train_config: str = "jobs/configs/debug.yaml"              # the training run, relative to the repo
    train: dict[str, Any] = field(default_factory=dict)        # TrainConfig overrides
    eval_prompts: int = 96                                     # world prompts sampled and checked (single, counting, relation in turn)
    generate: dict[str, Any] = field(default_factory=dict)     # GenerateConfig overrides
    tune: dict[str, Any] = field(default_factory=dict)         # SamplingTuneConfig overrides


class Stages:
    """Times each stage and prints a banner, so a newcomer sees where the minutes go."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        stages = self

        class _Stage:
            def __enter__(self):
                print(f"\n=== {name} ===", flush=True)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                stages.times[name] = time.perf_counter() - self.start
                if exc[0] is None:
                    print(f"--- {name}: {stages.times[name]:.1f}s", flush=True)

        return _Stage()


def write_eval_prompts(path: Path, n: int, size: int, seed: int) -> Path:
    """Held-out world captions (another world seed) for sampling and checking, one per line:
    single objects, counts and relations in turn, so every category is scored (and every prefix,
    which the tune sweep's subsets use, is balanced)."""
    from pipelines.world import WorldConfig, held_out_captions

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(c + "\n" for c in held_out_captions(n, WorldConfig(size=size, seed=seed + 1_000))))
    return path


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from jobs.ray_init import init_ray
    from pipelines.world import resolve_text_encoder

    out = Path(cfg.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"demo output {out} is not empty: remove it or pass out=<another folder>")
    out.mkdir(parents=True, exist_ok=True)
    stage = Stages()
    summary: dict[str, Any] = {"out": str(out)}

    with stage("ray"):
        ray = init_ray(num_cpus=cfg.num_cpus)
        print(f"Ray {ray.__version__}: {ray.cluster_resources().get('CPU', 0):.0f} CPUs")

    data_dir = world_data(cfg, out, stage, summary)

    with stage("train"):
        result = train(cfg, data_dir, out)
        weights = weights_of(result)
        summary["checkpoint"] = weights
        summary["text_encoder"] = resolve_text_encoder(cfg.text_encoder)

    prompts = write_eval_prompts(out / "eval_prompts.txt", cfg.eval_prompts, cfg.world.size, cfg.world.seed)
    with stage("generate"):
        from jobs.generate import GenerateConfig, generate_images, load_generated
        from jobs.inference import save_grid

        gen_cfg = config_lib.override(GenerateConfig(prompts=str(prompts), out=str(out / "samples"), checkpoint=weights,
                                            seeds=[0]), {"sampler.steps": 25, "sampler.cfg_scale": 3.0, **cfg.generate},
                             "demo generate")
        gen = generate_images(gen_cfg)
        rows = load_generated(gen_cfg.out)[:32]
        import numpy as np

        grid = save_grid(np.stack([r["image"] for r in rows]), out / "sample_grid.png",
                         captions=[r["prompt"] for r in rows], ncol=8)
        summary["sample_grid"] = str(grid)
        summary["images_per_s"] = gen["images_per_s"]

    with stage("eval"):
        from jobs.evaluate import EvalConfig, evaluate

        scores = evaluate(EvalConfig(images=gen_cfg.out, out=str(out / "eval")))
        summary["eval"] = {k: v for k, v in scores.items() if k.startswith("world/") or "artifact" in k}

    with stage("tune"):
        from jobs.tune.sampling import SamplingTuneConfig, run_sampling

        tune_cfg = config_lib.override(SamplingTuneConfig(checkpoint=weights, prompts=str(prompts)), {
            "subsets": [16, 32], "run.out": str(out / "tune"), "run.name": "sampling", "run.num_samples": 1,
            "space": {"cfg_scale": {"grid": [1.0, 2.0, 4.0, 6.0]}, "sampler": "euler", "steps": 15},
            **cfg.tune,
        }, "demo tune")
        tuned = run_sampling(tune_cfg)
        summary["tune"] = {"best": tuned["best"], "dir": tune_cfg.run.out}

    summary["stage_seconds"] = stage.times
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary, out)
    return summary


def world_data(cfg: DemoConfig, out: Path, stage: Stages, summary: dict[str, Any]) -> str:
    """The demo's training data, on the joined Ray: the world served on loopback -> fetch -> curate
    (-> recaption when a captioner is configured). Returns the dataset folder training reads."""
    from pipelines import fetch as fetch_lib
    from pipelines.world import WorldConfig, WorldServer, resolve_text_encoder, write_world

    world_cfg = WorldConfig(seed=cfg.world.seed, size=cfg.world.size, relation_fraction=cfg.world.relation_fraction)
    with WorldServer(world_cfg, cfg.world.n) as server:
        with stage("world"):
            write_world(str(out / "world"), world_cfg, cfg.world.n, server.base_url)
            print(f"{cfg.world.n} scenes at {cfg.world.size}px served from {server.base_url}")
        with stage("fetch"):
            fetch_cfg = config_lib.override(fetch_lib.FetchConfig(
                urls=str(out / "world" / "world.tsv"), out=str(out / "data" / "raw"), allow_hosts=["127.0.0.1"],
                image_size=cfg.world.size, resize_mode="no", encode_format="png", encode_quality=1, shard_size=400,
            ), cfg.fetch, "demo fetch")
            fetched = fetch_lib.run(fetch_cfg)
            print(fetch_lib.stats_table(fetched), end="")
            summary["fetch_manifest"] = fetched.manifest_uri

    with stage("curate"):
        from pipelines.curate import CurateConfig, curate, read_units

        curate_cfg = config_lib.from_dict(CurateConfig, {
            "output": str(out / "data" / "curated"),
            # The fetched world is read by the DALL-E 3 parquet reader, which also reads `minit2i fetch` output.
            "sources": {"dalle3": {"paths": [str(out / "data" / "raw")], "weight": 1.0}},
            "filters": {"tokenizer": resolve_text_encoder(cfg.text_encoder), "min_side": cfg.world.size, "max_caption_tokens": 256},
            "dedup": {"near_threshold": 0},   # simple scenes share pHashes; keep only exact-pixel dedup tight
            "shard_rows": 500,
        }, "demo curate")
        curate_cfg = config_lib.override(curate_cfg, cfg.curate, "demo curate")
        curate(curate_cfg, read_units(curate_cfg))
        summary["curate_manifest"] = str(out / "data" / "curated" / "manifest.json")
        data_dir = str(out / "data" / "curated")

    if cfg.recaption.get("model"):
        with stage("recaption"):
            from pipelines import recaption as recaption_lib

            rc = config_lib.override(recaption_lib.RecaptionConfig(data=data_dir, out=str(out / "data" / "recaptioned"),
                                                          t5_tokenizer="tiny-t5"), cfg.recaption, "demo recaption")
            result = recaption_lib.run(rc)
            print(recaption_lib.summary(result))
            data_dir = rc.out
    else:
        print("\n=== recaption: skipped === no captioner configured (recaption.model=<VLM folder> runs it); "
              "the world's captions are exact, so training uses them as they are")

    return data_dir


def train(cfg: DemoConfig, data_dir: str, out: Path, name: str = "demo", overrides: dict[str, Any] | None = None):
    """The demo's training run (`train_config` + the demo's `train` overrides + `overrides`) on
    `data_dir`; checkpoints under out/runs/name. Returns Ray Train's Result."""
    from jobs.train.config import TrainConfig
    from jobs.train.driver import main as train_main
    from pipelines.world import resolve_text_encoder

    train_cfg = config_lib.load(TrainConfig, repo_path(cfg.train_config), [])
    train_cfg = config_lib.override(train_cfg, {
        "name": name, "storage_path": str(out / "runs"), "data.datasets": [data_dir],
        "text_encoder.name_or_path": resolve_text_encoder(cfg.text_encoder),
        "logging.dir": str(out / ("train_logs" if name == "demo" else f"train_logs_{name}")), **cfg.train, **(overrides or {}),
    }, "demo train")
    return train_main(train_cfg)


def weights_of(result) -> str:
    """The inference weights folder (safetensors + model.json) of the run's latest checkpoint."""
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return checkpoint.path  # a training checkpoint is also a weights folder (model.json + safetensors)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="minit2i demo: summary", show_lines=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    ev = summary.get("eval", {})
    for cat in DEMO_CATEGORIES:
        if f"world/{cat}" in ev:
            table.add_row(f"prompt following: {cat.replace('_', ' ')}", f"{100 * ev[f'world/{cat}']:.1f}%")
    for key in ("world/overall", "artifact_ratio"):
        if key in ev:
            table.add_row(key, f"{ev[key]:.3f}")
    table.add_row("sample grid", summary.get("sample_grid", "-"))
    table.add_row("checkpoint (EMA safetensors)", summary.get("checkpoint", "-"))
    tune_dir = Path(summary.get("tune", {}).get("dir", out / "tune"))
    table.add_row("tune table / plot", f"{tune_dir / 'results.csv'}  {tune_dir / 'plot.png'}")
    table.add_row("manifests", f"{summary.get('fetch_manifest', '-')}\n{summary.get('curate_manifest', '-')}")
    for name, sec in summary.get("stage_seconds", {}).items():
        table.add_row(f"time: {name}", f"{sec:.1f}s")
    Console().print(table)


def run(cfg: DemoConfig) -> int:
    run_demo(cfg)
    return 0
