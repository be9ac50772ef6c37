"""Training benchmarks (measurements, not tests): `minit2i bench train`.

(a) the same DeepSpeed step (debug model, same batch) in a plain process vs inside a Ray Train
    worker -> the overhead ratio; (b) 512px decode + resize + centre-crop images/s per CPU core
    through our Ray Data stages vs a plain PyTorch DataLoader over the same Parquet shards.
The GPU step (B/16, 512px, bf16, MFU) is benchmarks/gpu_bench.py, run on a GPU box.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from jobs.ray_init import init_ray

STEP_MODEL = dict(preset="debug", overrides={"depth": 2})
STEP_BATCH, STEP_WARMUP, STEP_TIMED, STEP_THREADS = 16, 3, 20, 2


def _timed_steps(loop_config: dict) -> float:
    """Seconds per DeepSpeed step of the debug model on fixed random data (runs anywhere)."""
    import torch

    from jobs.train_step import ModelConfig, OptimConfig, TrainStep, build_engine
    from model.denoiser import DenoiserConfig

    torch.manual_seed(0)
    torch.set_num_threads(STEP_THREADS)        # the same threads in both places (Ray sets 1 per CPU it grants)
    cfg = ModelConfig(**loop_config["model"]).build(64, 32)
    optim = OptimConfig(lr=1e-3, warmup_steps=10, zero_stage=2)
    engine, precision = build_engine(cfg, optim, STEP_BATCH, torch.device("cpu"))
    step = TrainStep(engine, precision, DenoiserConfig(noise_scale=1.0), optim, None, seed=0)
    x = torch.rand(STEP_BATCH, 3, cfg.image_size, cfg.image_size) * 2 - 1
    text, mask = torch.randn(STEP_BATCH, 32, 64), torch.ones(STEP_BATCH, 32, dtype=torch.bool)
    for i in range(STEP_WARMUP + STEP_TIMED):
        if i == STEP_WARMUP:
            t0 = time.perf_counter()
        step(i, x, text, mask, list(range(i * STEP_BATCH, (i + 1) * STEP_BATCH)))
    return (time.perf_counter() - t0) / STEP_TIMED


def _ray_worker(loop_config: dict) -> None:
    # Ray Train 2.x keeps metrics only beside checkpoints, so the one number goes through a file.
    with open(loop_config["out"], "w") as f:
        f.write(str(_timed_steps(loop_config)))


def bench_step() -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    plain = _timed_steps({"model": STEP_MODEL})
    init_ray(num_cpus=4)
    with tempfile.TemporaryDirectory() as tmp:
        result = TorchTrainer(
            _ray_worker, train_loop_config={"model": STEP_MODEL, "out": os.path.join(tmp, "s_per_step")},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": STEP_THREADS}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name="bench-step", storage_path=tmp,
                                 worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}}),
        ).fit()
        if result.error:
            raise RuntimeError(f"Ray Train step benchmark failed: {result.error}")
        in_ray = float(open(os.path.join(tmp, "s_per_step")).read())
    print(f"(a) DeepSpeed ZeRO-2 step, debug model depth 2, batch {STEP_BATCH}, {STEP_TIMED} steps, CPU:")
    print(f"    plain process {plain * 1000:.1f} ms/step   Ray Train worker {in_ray * 1000:.1f} ms/step   "
          f"ratio {in_ray / plain:.3f} (aim <= 1.10)")
    return {"plain_ms": plain * 1000, "ray_ms": in_ray * 1000, "ratio": in_ray / plain}


def _make_512_shards(root: str, n: int, shards: int) -> str:
    """n JPEG photos-like images (640x512 noise + gradients) in Parquet shards with a manifest."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipelines import manifest as manifest_lib

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:640]
    entries = []
    per = -(-n // shards)
    for s in range(shards):
        rows = []
        for i in range(s * per, min(n, (s + 1) * per)):
            base = np.stack([(xx + i * 7) % 256, (yy * 2 + i) % 256, (xx + yy) % 256], -1)
            arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            rows.append({"key": f"{i:06d}", "caption": f"image {i}", "image": buf.getvalue(), "status": "success"})
        path = os.path.join(root, f"shard-{s:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=16)
        entries.append(manifest_lib.shard_entry(root, path, len(rows)))
    manifest_lib.write(root, manifest_lib.Manifest(kind="bench", config={"n": n}, shards=entries))
    return root


def bench_ingest(n: int = 256, cpus: int = 2) -> dict:
    """512px decode + crop, images/s per core: our Ray Data stages vs torch DataLoader, `cpus` each."""
    import numpy as np
    import ray
    import torch

    from jobs.train_data import DataConfig, LoadImages, build_index, decode_crop, iter_batches

    with tempfile.TemporaryDirectory() as tmp:
        root = _make_512_shards(os.path.join(tmp, "data"), n, shards=4)
        cfg = DataConfig(datasets=[root], batch_size=16, decode_actors=cpus, decode_cpus=1, steps_per_block=1)
        index = build_index(cfg)
        steps = index.num_rows // cfg.batch_size
        init_ray(num_cpus=4)
        # Warm the actor pool start-up out of the measurement with one short pass, then time a full one.
        for _ in iter_batches(index, cfg, 512, 0, 2, 0, 1):
            pass
        t0 = time.perf_counter()
        seen = sum(len(b["key"]) for _, b in iter_batches(index, cfg, 512, 0, steps, 0, 1))
        ours = seen / (time.perf_counter() - t0)

        class Rows(torch.utils.data.Dataset):
            """The same rows, read and decoded by DataLoader worker processes."""

            def __init__(self):
                self.load = None

            def __len__(self):
                return index.num_rows

            def __getitem__(self, i):
                if self.load is None:
                    self.load = LoadImages(index, cfg, 512).read
                row = self.load({"data": np.array([i])})
                return torch.from_numpy(decode_crop(row["image"][0], 512))

        loader = torch.utils.data.DataLoader(Rows(), batch_size=16, num_workers=cpus, persistent_workers=True)
        for _ in zip(range(2), loader):
            pass
        t0 = time.perf_counter()
        seen = sum(len(b) for b in loader)
        plain = seen / (time.perf_counter() - t0)
    print(f"(b) 512px decode + resize + centre crop, {index.num_rows} JPEGs (640x512), {cpus} CPU workers each:")
    print(f"    Ray Data stages {ours / cpus:.1f} img/s/core   torch DataLoader {plain / cpus:.1f} img/s/core   "
          f"ratio {ours / plain:.2f} (aim >= 1.0)")
    return {"ray_img_s_core": ours / cpus, "loader_img_s_core": plain / cpus, "ratio": ours / plain}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minit2i bench train")
    p.add_argument("--images", type=int, default=256, help="512px JPEGs for the ingest benchmark")
    args = p.parse_args(argv or [])
    bench_step()
    bench_ingest(n=args.images)
    return 0


