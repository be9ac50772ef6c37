"""`minit2i train` itself on a GPU box, against the Ray-free step, in one run (GPU_CHECKS 1 and 4).

The job as a user runs it: `python -m jobs.cli train --config jobs/configs/b16_pretrain.yaml` with
a local Ray instance, one Ray Train worker per GPU (NCCL), DeepSpeed ZeRO-2 in bf16, the model
compiled, the Ray Data ingest decoding and cropping 640x512 JPEGs from Parquet shards, and a
FLAN-T5-large-shaped encoder (random weights, the byte-level ByT5 tokenizer: nothing to download)
encoding the captions online at prompt length 256, as the recipe does. Its console lines give
img/s and MFU per logging interval; the steady state is their median once the compile is past.

Beside it, in the same run and on the same card: the job's step without Ray (benchmarks/gpu_bench.py
`--only job`: the same DeepSpeed engine on random text features), the T5 encoder alone at the same
batch, and the bf16 matmul ceiling. If the job ran at the Ray-free step's speed plus the T5
encoding, its img/s would be 1 / (1/step + 1/t5); the ratio of the measured img/s to that says
what Ray Train, the data path and the job's bookkeeping cost. Then sampling: the published preset
(Euler, 100 steps, CFG 6) timed alone, and `minit2i sample` with `sampler.preset=b16-geneval` on the
run's own checkpoint (its trained weights: a few dozen steps leave the EMA at its start), which
writes a grid.

    python benchmarks/gpu_job.py --out $OUT                       # ~6 minutes on one H100/H200
    python benchmarks/gpu_job.py --cpu-check --out /tmp/gj        # the plumbing on a CPU: debug model, 64px

Results: gpu_job.json, the job's log and the sample grid under --out; a table printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LINE = re.compile(r"\[train\] step (\d+)/(\d+)\s+(.*)$")


def parse_train_lines(text: str) -> list[dict]:
    """The rank-0 console lines of `minit2i train` (`[train] step N/T  key value ...`) as dicts."""
    rows = []
    for line in text.splitlines():
        m = LINE.search(line)
        if not m:
            continue
        row = {"step": int(m.group(1)), "total": int(m.group(2))}
        parts = m.group(3).split()
        for key, value in zip(parts[::2], parts[1::2]):
            try:
                row[key] = float(value)
            except ValueError:
                pass
        rows.append(row)
    return rows


def steady(rows: list[dict], after: int, key: str) -> float | None:
    """Median of `key` over the logging intervals after step `after` (the compile and the pipeline's
    fill are in the first ones)."""
    values = [r[key] for r in rows if key in r and r["step"] > after]
    return statistics.median(values) if values else None


def save_t5_large(out: Path) -> str:
    """A FLAN-T5-large-shaped encoder (d_model 1024, 24 layers, 16 heads, d_ff 2816) with random
    weights and the ByT5 tokenizer, in bf16, saved with save_pretrained: loaded by the job exactly as
    a real FLAN-T5-large folder. Its cost depends on its shape and the prompt length (256, padded),
    not on the vocabulary."""
    import torch

    from model.text_encoder import build_tiny_t5

    return str(build_tiny_t5(out, d_model=1024, num_layers=24, num_heads=16, d_ff=2816, dtype=torch.bfloat16))


class GpuMonitor:
    """nvidia-smi sampled once a second in the background, each sample stamped on arrival (perf_counter),
    so utilisation can be read over the steady-state window alone (the compile is minutes of ~0%)."""

    def __init__(self, path: Path):
        self.path, self.proc, self.rows, self.thread = path, None, [], None

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-l", "1"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            return self
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self):
        with open(self.path, "w") as f:
            for line in self.proc.stdout:
                f.write(line)
                try:
                    util, mem = (float(x) for x in line.split(","))
                except ValueError:
                    continue
                self.rows.append((time.perf_counter(), util, mem))

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.thread.join(timeout=5)

    def window(self, t0: float | None, t1: float | None) -> dict:
        """Utilisation between t0 and t1 (median, share of samples under 50%) and the run's peak memory."""
        inside = [(u, m) for t, u, m in self.rows if t0 is not None and t1 is not None and t0 <= t <= t1]
        if not inside:
            return {}
        utils = [u for u, _ in inside]
        return {"gpu_util_median": statistics.median(utils), "gpu_util_below_50": sum(u < 50 for u in utils) / len(utils),
                "gpu_samples": len(utils), "gpu_mem_max_mib": max(m for _, _, m in self.rows)}


def run_logged(cmd: list[str], log: Path, timeout: float, stamps: dict | None = None) -> tuple[int, float, str]:
    """Run `cmd`, echo and keep its output; (exit status, wall seconds, output). With `stamps`, the
    arrival time (perf_counter) of each `[train] step N` line is kept there by step."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        for line in proc.stdout:
            f.write(line)
            m = LINE.search(line)
            if m and stamps is not None:
                stamps[int(m.group(1))] = time.perf_counter()
            if "[train]" in line or "Error" in line or "error" in line or "wrote" in line:
                print(line, end="", flush=True)
        rc = proc.wait()
        timer.cancel()
    return rc, time.perf_counter() - t0, log.read_text()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "outputs/gpu_job"), help="results folder")
    p.add_argument("--work", default=None, help="scratch folder for the data, the encoder and the run (default: a temp dir)")
    p.add_argument("--batch", type=int, default=32, help="images per GPU per step (the job's micro_batch)")
    p.add_argument("--steps", type=int, default=80, help="optimiser steps of the job")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--parts", nargs="+", default=["ref", "job", "sample"], choices=["ref", "job", "sample"])
    p.add_argument("--budget", type=float, default=420,
                   help="seconds since the start past which the sampling part is skipped (a device lease is short)")
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every train job")
    p.add_argument("--variant", action="append", default=[],
                   help="run the job once more per --variant, with these space-separated key=value overrides, on "
                        "the same machine, e.g. --variant data.decode_actors=4 --variant data.decode_actors=8")
    p.add_argument("--job-timeout", type=float, default=330)
    p.add_argument("--plain-step", action="store_true",
                   help="also time the plain compiled step (no DeepSpeed: gpu_bench --only train), ~2 more minutes")
    p.add_argument("--cpu-check", action="store_true", help="debug model at 64px on the CPU: checks the plumbing only")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    from benchmarks.bench_train import _make_512_shards

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_job-"))
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.cpu_check
    if not cuda and not args.cpu_check:
        print("no CUDA device: run with --cpu-check to check the plumbing on a CPU", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count() if cuda else 1
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                     "device": torch.cuda.get_device_name() if cuda else "cpu", "gpus": gpus,
                     "batch_per_gpu": args.batch, "steps": args.steps}

    def dump():
        (out / "gpu_job.json").write_text(json.dumps(results, indent=2))

    t0 = time.perf_counter()
    rows = args.batch * gpus * (args.steps + 2)
    data = _make_512_shards(str(work / "data"), rows, shards=max(4, 2 * gpus), row_group_size=64)
    t5 = save_t5_large(work / "t5-large") if cuda else "tiny-t5"
    results["prep_s"] = time.perf_counter() - t0
    print(f"prepared {rows} rows of 640x512 JPEGs and the text encoder in {results['prep_s']:.0f} s", flush=True)

    if "ref" in args.parts and cuda:
        ref_json = work / "ref.json"
        plain = ["--only", "train", "--no-eager"] if args.plain_step else []
        rc, wall, _ = run_logged([sys.executable, "benchmarks/gpu_bench.py", "--only", "matmul", "--only", "job",
                                  "--job", "2:compile", "--only", "t5", *plain, "--batch", str(args.batch),
                                  "--steps", "20", "--out", str(ref_json)], out / "ref.log", timeout=240 + 120 * args.plain_step)
        ref = json.loads(ref_json.read_text()) if ref_json.exists() else {}
        results["ref"] = {"rc": rc, "wall_s": wall, **ref}
        dump()

    run_dir = work / "runs"
    if "job" in args.parts:
        if cuda:
            base = ["--config", "jobs/configs/b16_pretrain.yaml", f"text_encoder.name_or_path={t5}",
                    f"scaling.num_workers={gpus}", "scaling.cpus_per_worker=4"]
        else:
            base = ["--config", "jobs/configs/debug.yaml", "scaling.num_workers=1",
                    "scaling.cpus_per_worker=1", "data.decode_actors=0"]
        results["jobs"] = []
        for i, variant in enumerate(args.variant or [""]):
            # Variants run one after another on the same machine: an A/B that a second lease cannot give.
            name = "gpu_job" if i == 0 else f"gpu_job_v{i}"
            cmd = [sys.executable, "-m", "jobs.cli", "train", *base, f"name={name}", f"storage_path={run_dir}",
                   f"data.datasets=[{data}]", f"data.batch_size={args.batch * gpus}", f"optim.micro_batch={args.batch}",
                   f"optim.steps={args.steps}", "optim.warmup_steps=10", f"checkpoint.every={args.steps}",
                   f"logging.every={args.log_every}", "logging.sample_every=0", "data.shuffle_rows=512",
                   "scaling.max_failures=0", *args.set, *variant.split()]
            stamps: dict[int, float] = {}
            log = out / ("job.log" if i == 0 else f"job_v{i}.log")
            with GpuMonitor(work / f"smi_{i}.csv") as mon:
                rc, wall, text = run_logged(cmd, log, timeout=args.job_timeout, stamps=stamps)
            lines = parse_train_lines(text)
            after = 2 * args.log_every
            # nvidia-smi over the steady intervals only: from the line that closes the last unsteady one to the last
            results["jobs"].append({"variant": variant, "rc": rc, "wall_s": wall, "lines": lines, "cmd": cmd,
                                    "img_s": steady(lines, after, "img_per_s"), "mfu": steady(lines, after, "mfu"),
                                    **mon.window(stamps.get(after), max(stamps.values()) if stamps else None)})
            dump()
            if rc != 0:
                print(f"the job failed (exit {rc}); its log: {log}", flush=True)

    if "sample" in args.parts and cuda:
        if time.perf_counter() - t_start > args.budget:
            results["sample"] = {"skipped": f"past the {args.budget:.0f} s budget"}
        else:
            sj = work / "sample.json"
            rc, wall, _ = run_logged([sys.executable, "benchmarks/gpu_bench.py", "--only", "sample", "--sample",
                                      "euler:100:6.0", "--out", str(sj)], out / "sample_bench.log", timeout=150)
            results["sample"] = {"rc": rc, "wall_s": wall, **(json.loads(sj.read_text()) if sj.exists() else {})}
            if (run_dir / "gpu_job").exists() and time.perf_counter() - t_start < args.budget + 40:
                prompts = "[a red apple on a table, two dogs on the grass, a blue car beside a house, three cups]"
                rc, wall, _ = run_logged([sys.executable, "-m", "jobs.cli", "sample", f"checkpoint={run_dir / 'gpu_job'}",
                                          "weights=model", "sampler.preset=b16-geneval", f"prompts={prompts}", "per_prompt=4",
                                          f"out={out / 'sample_grid.png'}"], out / "sample_cmd.log", timeout=130)
                results["sample_cmd"] = {"rc": rc, "wall_s": wall, "images": 16}
        dump()

    results["total_s"] = time.perf_counter() - t_start
    dump()
    report(results)
    return 0 if all(j["rc"] == 0 for j in results.get("jobs", [])) else 1


def report(r: dict) -> None:
    print(f"\n{r['device']} x{r['gpus']}, torch {r['torch']}, {r['date']}; B/16 512px, {r['batch_per_gpu']} images per GPU per step")
    ref = r.get("ref", {})
    step = next((x for x in ref.get("job", []) if "img_s" in x), None)
    t5 = next((x for x in ref.get("t5", []) if "prompts_s" in x), None)
    if "matmul_tflops" in ref:
        print(f"bf16 matmul ceiling (8192^3): {ref['matmul_tflops'][0]:.0f} TFLOP/s")
    print(f"{'what':<52}{'img/s':>9}{'MFU':>8}{'vs step':>9}")
    if step:
        print(f"{'Ray-free job step (DeepSpeed ZeRO-2 bf16, compiled)':<52}{step['img_s']:>9.1f}"
              f"{100 * step.get('mfu', 0):>7.1f}%{1.0:>9.2f}   first step {step['first_step_s']:.0f} s")
    elif ref.get("job"):
        print("Ray-free job step:", ref["job"])
    plain = next((x for x in ref.get("train", []) if "img_s" in x), None)
    if plain:
        ratio = f"{plain['img_s'] / step['img_s']:.2f}" if step else "-"
        print(f"{'plain compiled step (no DeepSpeed, autocast)':<52}{plain['img_s']:>9.1f}"
              f"{100 * plain.get('mfu', 0):>7.1f}%{ratio:>9}")
    if t5:
        print(f"{'T5-large-shaped encoder alone (prompts/s)':<52}{t5['prompts_s']:>9.1f}")
    both = 1 / (1 / step["img_s"] + 1 / t5["prompts_s"]) if step and t5 else None
    if both:
        print(f"{'step + T5 encoding, if nothing else cost':<52}{both:>9.1f}{'':>8}{both / step['img_s']:>9.2f}")
    for job in r.get("jobs", []):
        what = "minit2i train " + (job["variant"] or "(Ray Train, Ray Data, T5 online)")
        if job.get("img_s"):
            mfu = f"{100 * job['mfu']:.1f}%" if job.get("mfu") else "-"
            ratio = f"{job['img_s'] / step['img_s']:.2f}" if step else "-"
            print(f"{what:<52}{job['img_s']:>9.1f}{mfu:>8}{ratio:>9}   wall {job['wall_s']:.0f} s")
            if both:
                print(f"  job / (step + T5) = {job['img_s'] / both:.2f}")
            if job.get("gpu_util_median") is not None:
                print(f"  nvidia-smi over the steady intervals ({job['gpu_samples']} samples): median utilisation "
                      f"{job['gpu_util_median']:.0f}%, {100 * job['gpu_util_below_50']:.0f}% of samples under 50%; "
                      f"max memory {job['gpu_mem_max_mib']:.0f} MiB")
        else:
            print(f"{what}: exit {job['rc']}, no steady-state interval logged (wall {job['wall_s']:.0f} s)")
    s = r.get("sample", {})
    for x in s.get("sample", []):
        if "img_s" in x:
            print(f"sampling {x['sampler']} {x['steps']} steps CFG {x['cfg_scale']} (NFE {x['nfe']}, batch {x['batch']}, "
                  f"compiled, bf16): {x['img_s']:.2f} img/s")
    if "skipped" in s:
        print("sampling:", s["skipped"])
    if "sample_cmd" in r:
        c = r["sample_cmd"]
        print(f"minit2i sample weights=model sampler.preset=b16-geneval, 16 images: exit {c['rc']}, wall {c['wall_s']:.0f} s (loads included)")
    print(f"total {r['total_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
