"""Training benchmarks (measurements, not tests): `minit2i bench train`.

(a) the same DeepSpeed step (debug model, same batch) in a plain process vs inside a Ray Train
    worker -> the overhead ratio; (b) 512px decode + resize + centre-crop images/s per CPU core
    at steady state through our Ray Data stages vs a plain PyTorch DataLoader over the same
    Parquet shards in the same recorded order, with the row-group reads each needs; (c) torch's
    AdamW fused kernel vs its per-tensor loop on the CPU, over the demo model's parameters as one
    flat fp32 tensor (what the optimiser steps under ZeRO-1/2) and as separate tensors (ZeRO-3).
The GPU step (B/16, 512px, bf16, MFU) is benchmarks/gpu_bench.py, run on a GPU box.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

from jobs.ray_init import init_ray

STEP_MODEL = dict(preset="debug", overrides={"depth": 2})
STEP_BATCH, STEP_WARMUP, STEP_TIMED, STEP_THREADS = 16, 3, 20, 2


def _timed_steps(loop_config: dict) -> float:
    """Seconds per DeepSpeed step of the debug model on fixed random data (runs anywhere)."""
    import torch

    from jobs.train.step import ModelConfig, OptimConfig, TrainStep, build_engine
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


def _make_512_shards(root: str, n: int, shards: int, row_group_size: int, distinct: int = 128) -> str:
    """n rows of photo-like 640x512 JPEGs (~80 KB; `distinct` different ones, repeated, which
    decode at the same cost) in Parquet shards with a manifest."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipelines import manifest as manifest_lib

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:640]
    jpegs = []
    for i in range(min(n, distinct)):
        base = np.stack([(xx + i * 7) % 256, (yy * 2 + i) % 256, (xx + yy) % 256], -1)
        arr = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
        jpegs.append(buf.getvalue())
    entries = []
    per = -(-n // shards)
    for s in range(shards):
        rows = [{"key": f"{i:06d}", "caption": f"image {i}", "image": jpegs[i % len(jpegs)], "status": "success"}
                for i in range(s * per, min(n, (s + 1) * per))]
        path = os.path.join(root, f"shard-{s:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
        entries.append(manifest_lib.shard_entry(root, path, len(rows)))
    manifest_lib.write(root, manifest_lib.Manifest(kind="bench", config={"n": n}, shards=entries))
    return root


class LRURows:
    """What a plain PyTorch Dataset does: one row per __getitem__, recent row groups kept (LRU)."""

    def __init__(self, index, cache: int = 16):
        from collections import OrderedDict

        self.index, self.cache, self.size = index, OrderedDict(), cache
        self.files, self.group_reads = {}, 0

    def __call__(self, gid: int) -> bytes:
        import pyarrow.parquet as pq

        from pipelines import storage

        sid, row, unit = self.index.rows[gid]
        if unit not in self.cache:
            if sid not in self.files:
                fs, path = storage.resolve(self.index.shards[sid])
                self.files[sid] = pq.ParquetFile(fs.open_input_file(path))
            self.cache[unit] = self.files[sid].read_row_group(int(self.index.units[unit][1]), columns=["image"]).column("image")
            self.group_reads += 1
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        self.cache.move_to_end(unit)
        return self.cache[unit][int(row - self.index.units[unit][2])].as_py()


def _tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and all its descendants (Ray's daemons and
    workers, DataLoader workers) that are still alive."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class _Steady:
    """Batch arrival times and CPU seconds, measured between the batches at 1/4 and 3/4 of a pass.

    Not from the first batch: while one side starts up, whatever it decoded ahead piles up, and a
    window that starts there also times draining that pile. Between two points well inside the
    pass the pipeline is in its steady state at both ends.
    """

    def __init__(self, batch: int, total: int):
        self.batch, self.t0, self.n = batch, time.perf_counter(), 0
        self.at = (total // 4, 3 * total // 4)
        self.marks = []

    def tick(self) -> None:
        self.n += 1
        if self.n == 1:
            self.first = time.perf_counter() - self.t0
        if self.n in self.at:
            self.marks.append((time.perf_counter(), _tree_cpu_seconds()))

    def result(self) -> dict:
        (t0, c0), (t1, c1) = self.marks
        images = (self.at[1] - self.at[0]) * self.batch
        return {"img_s": images / (t1 - t0), "cores": (c1 - c0) / (t1 - t0), "first_s": self.first}


def bench_ingest(n: int = 3072, cpus: int = 2, rounds: int = 2) -> dict:
    """512px decode + crop at steady state, images/s per core: Ray Data stages vs torch DataLoader.

    Same shards, same recorded order (one worker's plan), `cpus` decode processes each, uint8
    batches of 16 out. Rounds alternate the two so load on the shared box hits both alike.
    """
    import numpy as np
    import torch

    from jobs.train.data import DataConfig, ReadRows, build_index, decode_crop, iter_batches, worker_rows

    B = 16
    with tempfile.TemporaryDirectory() as tmp:
        root = _make_512_shards(os.path.join(tmp, "data"), n, shards=4, row_group_size=32)
        cfg = DataConfig(datasets=[root], batch_size=B, partitions=1, shuffle_rows=256,
                         decode_actors=cpus, decode_cpus=1)      # steps_per_block: the default 4
        index = build_index(cfg)
        steps = index.num_rows // B
        plan = worker_rows(index, cfg, 0, steps, 0, 1)
        init_ray(num_cpus=4)

        # Row-group reads over the pass: our planned reader vs the DataLoader's per-worker LRU
        # caches (DataLoader hands batch i to worker i % cpus).
        planned = ReadRows(index, cfg, plan=(0, steps, 0, 1))
        for i in range(0, len(plan), B * cfg.steps_per_block):
            planned({"data": np.arange(i, min(len(plan), i + B * cfg.steps_per_block))})
        lru = [LRURows(index) for _ in range(cpus)]
        for i, gid in enumerate(plan):
            lru[(i // B) % cpus](int(gid))
        reads = {"ray": planned.group_reads, "loader": sum(r.group_reads for r in lru)}

        class Rows(torch.utils.data.Dataset):
            """The plan's rows, read and decoded in DataLoader worker processes."""

            def __init__(self):
                self.read = None

            def __len__(self):
                return len(plan)

            def __getitem__(self, i):
                if self.read is None:
                    self.read = LRURows(index)
                with warnings.catch_warnings():          # the same zero-copy view as the Ray side's collate
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    return torch.from_numpy(decode_crop(self.read(int(plan[i])), 512))

        def ray_pass() -> dict:
            clock = _Steady(B, steps)
            for _ in iter_batches(index, cfg, 512, 0, steps, 0, 1):
                clock.tick()
            return clock.result()

        def loader_pass() -> dict:
            clock = _Steady(B, steps)
            for _ in torch.utils.data.DataLoader(Rows(), batch_size=B, num_workers=cpus):
                clock.tick()
            return clock.result()

        runs = {"ray": [], "loader": []}
        for _ in range(rounds):
            runs["ray"].append(ray_pass())
            runs["loader"].append(loader_pass())
    med = {k: {m: float(np.median([r[m] for r in v])) for m in ("img_s", "cores", "first_s")} for k, v in runs.items()}
    print(f"(b) 512px decode + resize + centre crop, {len(plan)} JPEGs (640x512) in row groups of 32, the recorded order, "
          f"{cpus} decode processes each; steady state (batches {steps // 4}..{3 * steps // 4}); median of {rounds} alternating rounds:")
    print(f"    {'':18}{'img/s':>8}{'img/s/core':>11}{'CPU cores busy':>16}{'first batch s':>15}{'row-group reads':>17}")
    for k, name in (("ray", "Ray Data stages"), ("loader", "torch DataLoader")):
        m = med[k]
        print(f"    {name:18}{m['img_s']:>8.0f}{m['img_s'] / cpus:>11.1f}{m['cores']:>16.2f}{m['first_s']:>15.2f}{reads[k]:>17}")
    ratio = med["ray"]["img_s"] / med["loader"]["img_s"]
    print(f"    ratio {ratio:.2f} (aim >= 1.0); rounds (img/s Ray/DataLoader): "
          + ", ".join(f"{a['img_s']:.0f}/{b['img_s']:.0f}" for a, b in zip(runs["ray"], runs["loader"])))
    print("    (CPU cores busy: CPU-seconds per second of every process on each side, Ray's daemons included)")
    return {"ray": med["ray"], "loader": med["loader"], "ratio": ratio, "group_reads": reads}


ADAMW_MODEL = dict(preset="debug", overrides={"depth": 6, "patch_size": 8})     # the demo's model


def bench_adamw(rounds: int = 3, steps: int = 30) -> dict:
    """(c): ms per AdamW step, fused vs torch's per-tensor (single-tensor) loop, one thread,
    alternating rounds (median); the optimiser jobs/train/step.py builds is the fused one."""
    import statistics

    import torch

    from jobs.train.step import ModelConfig
    from model.mmjit import MMJiT

    torch.set_num_threads(1)
    params = [p.detach() for p in MMJiT(ModelConfig(**ADAMW_MODEL).build(64, 64)).parameters()]
    layouts = {"flat": [torch.cat([p.reshape(-1) for p in params])], "per tensor": params}

    def ms_per_step(tensors: list, fused: bool) -> float:
        ps = [torch.nn.Parameter(t.clone()) for t in tensors]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95), **({"fused": True} if fused else {"foreach": False}))
        for _ in range(3):
            opt.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        return (time.perf_counter() - t0) / steps * 1000

    out = {}
    print(f"(c) AdamW step on the CPU, demo model ({sum(p.numel() for p in params):,} parameters), 1 thread, "
          f"median of {rounds} alternating rounds of {steps} steps:")
    for name, tensors in layouts.items():
        times = {"loop": [], "fused": []}
        for _ in range(rounds):
            for kind in times:
                times[kind].append(ms_per_step(tensors, kind == "fused"))
        loop, fused = statistics.median(times["loop"]), statistics.median(times["fused"])
        out[name] = {"loop_ms": loop, "fused_ms": fused, "ratio": fused / loop}
        print(f"    {name:10s} per-tensor loop {loop:6.2f} ms   fused {fused:6.2f} ms   ratio {fused / loop:.2f}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="minit2i bench train")
    p.add_argument("--images", type=int, default=3072, help="rows of 512px JPEGs for the ingest benchmark")
    p.add_argument("--rounds", type=int, default=2, help="alternating ingest rounds (median reported)")
    p.add_argument("--only", choices=["step", "ingest", "adamw"], help="run one of the three")
    args = p.parse_args(argv or [])
    # Ray starts its worker processes at niceness 15 (RAY_worker_niceness) so its own daemons stay
    # responsive; the plain-process and DataLoader sides run at 0. On a shared machine that alone
    # hands Ray's side less CPU, so the local Ray instance started here runs its workers at 0 too.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if args.only in (None, "step"):
        bench_step()
    if args.only in (None, "ingest"):
        bench_ingest(n=args.images, rounds=args.rounds)
    if args.only in (None, "adamw"):
        bench_adamw()
    return 0


