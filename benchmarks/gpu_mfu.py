"""How far B/16 512px bf16 training is from what this GPU's kernels allow, and what moves it.

Three parts, one run (the GPU is shared and time on it is short):

1. Floor. Every matmul of one training step (forward, and the two backward products of each
   linear) timed alone through cuBLAS at its real shape, plus SDPA forward+backward per backend.
   Their sum is the step time if everything else (norms, RoPE, SiLU, residual adds, copies, the
   optimiser) were free: the MFU this architecture can reach on this stack without new kernels.
2. Variants of the compiled plain-PyTorch step (the same `training_loss` the job runs): whole-model
   vs per-block compile, SDPA backend, SwiGLU's two input matmuls as one, batch size.
3. Where the compiled step's GPU time goes: matmuls, attention, fused elementwise kernels, other.

    python benchmarks/gpu_mfu.py                    # all parts, ~6 minutes on an H100
    python benchmarks/gpu_mfu.py --only floor --batch 64
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import model.mmjit as mmjit
from benchmarks.gpu_bench import peak_for, text_inputs, timed
from model.denoiser import DenoiserConfig, training_loss

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def b16() -> mmjit.MMJiTConfig:
    return mmjit.preset("B/16", text_dim=1024, image_size=512)


# --------------------------------------------------------------------------------------------
# 1. Floor: matmuls and attention alone
# --------------------------------------------------------------------------------------------

def linear_shapes(cfg: mmjit.MMJiTConfig, batch: int) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, count) of every linear in one forward pass."""
    D, F_, L, N = cfg.width, cfg.mlp_hidden, cfg.text_length, cfg.num_patches
    Mi, Mt = batch * N, batch * L
    joint = cfg.depth
    return [
        ("qkv img", Mi, D, 3 * D, joint), ("proj img", Mi, D, D, joint),
        ("w1,w3 img", Mi, D, F_, 2 * joint), ("w2 img", Mi, F_, D, joint),
        # the last joint block updates no text: its text out-proj and MLP are skipped
        ("qkv txt", Mt, D, 3 * D, joint + cfg.text_depth), ("proj txt", Mt, D, D, joint - 1 + cfg.text_depth),
        ("w1,w3 txt", Mt, D, F_, 2 * (joint - 1 + cfg.text_depth)), ("w2 txt", Mt, F_, D, joint - 1 + cfg.text_depth),
        ("text_embed", Mt, cfg.text_dim, D, 1),
        ("patch_embed", Mi, cfg.patch_size ** 2 * cfg.in_channels, cfg.bottleneck, 1),
        ("patch_embed 2", Mi, cfg.bottleneck, D, 1), ("final", Mi, D, cfg.patch_size ** 2 * cfg.in_channels, 1),
    ]


def time_gemms(cfg, batch: int) -> dict:
    """Seconds per step spent in matmuls if each ran alone at cuBLAS speed: forward Y = X W^T,
    backward dX = dY W and dW = dY^T X, each over fresh random bf16 operands."""
    rows, total = [], 0.0
    for name, M, K, N, count in linear_shapes(cfg, batch):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        fwd = timed(lambda: x @ w.t(), 3, 20)
        dgrad = timed(lambda: dy @ w, 3, 20)
        wgrad = timed(lambda: dy.t() @ x, 3, 20)
        sec = fwd + dgrad + wgrad
        total += count * sec
        rows.append({"name": name, "M": M, "K": K, "N": N, "count": count,
                     "tflops_fwd": 2 * M * K * N / fwd / 1e12, "tflops_dgrad": 2 * M * K * N / dgrad / 1e12,
                     "tflops_wgrad": 2 * M * K * N / wgrad / 1e12, "ms_per_step": 1e3 * count * sec})
        del x, w, dy
    return {"rows": rows, "seconds": total}


def time_attention(cfg, batch: int, seq: int) -> dict:
    """SDPA forward+backward on [B, H, S, Dh] bf16 per backend (seconds, TFLOP/s counting
    forward 4*S^2*D and backward 2x that, as MFU does)."""
    out = {}
    flops = 3 * 4 * batch * seq * seq * cfg.width
    for name, backend in BACKENDS.items():
        q, k, v = (torch.randn(batch, cfg.num_heads, seq, cfg.head_dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        g = torch.randn(batch, cfg.num_heads, seq, cfg.head_dim, device="cuda", dtype=torch.bfloat16)

        def run():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v).backward(g)
        try:
            sec = timed(run, 3, 20)
            out[name] = {"seconds": sec, "tflops": flops / sec / 1e12}
        except RuntimeError as err:       # a backend that refuses this shape or device
            out[name] = {"error": str(err).splitlines()[0][:200]}
        del q, k, v, g
    return out


def floor(batch: int, peak: float) -> dict:
    cfg = b16()
    gemm = time_gemms(cfg, batch)
    joint = time_attention(cfg, batch, cfg.text_length + cfg.num_patches)
    text = time_attention(cfg, batch, cfg.text_length)
    best = lambda d: min(v["seconds"] for v in d.values() if "seconds" in v)
    attn = cfg.depth * best(joint) + cfg.text_depth * best(text)
    step = gemm["seconds"] + attn
    model_flops = 3 * mmjit.forward_flops(cfg)["total"] * batch
    return {"batch": batch, "gemm_ms": 1e3 * gemm["seconds"], "attention_ms": 1e3 * attn, "floor_ms": 1e3 * step,
            "floor_img_s": batch / step, "floor_mfu": model_flops / step / 1e12 / peak,
            "gemm": gemm["rows"], "attention_joint": joint, "attention_text": text}


# --------------------------------------------------------------------------------------------
# 2. Variants of the compiled step
# --------------------------------------------------------------------------------------------

class SwiGLU13(torch.nn.Module):
    """SwiGLU with w1 and w3 stacked into one [2F, D] matmul (one read of x, one launch)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = torch.nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


def build(batch: int, fuse_w13: bool):
    torch.manual_seed(0)
    cfg = b16()
    net = mmjit.MMJiT(cfg)
    if fuse_w13:
        for m in list(net.modules()):
            for attr in ("mlp", "img_mlp", "txt_mlp"):
                if isinstance(getattr(m, attr, None), mmjit.SwiGLU):
                    setattr(m, attr, SwiGLU13(cfg.width, cfg.mlp_hidden))
    net = net.cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    x = torch.rand(batch, 3, 512, 512, device="cuda") * 2 - 1
    text, mask = text_inputs(batch, 256, 1024)
    return cfg, net, opt, x, text, mask


def variant(name: str, batch: int, compile_mode: str, backend: str | None, fuse_w13: bool, peak: float,
            profile_out: Path | None = None) -> dict:
    torch._dynamo.reset()
    cfg, net, opt, x, text, mask = build(batch, fuse_w13)
    if compile_mode == "model":
        fwd = torch.compile(net, dynamic=False)
    elif compile_mode == "blocks":
        for block in [*net.txt_preamble_blocks, *net.double_blocks]:
            block.compile(dynamic=False)
        fwd = net
    else:
        fwd = net
    gen = torch.Generator(device="cuda").manual_seed(0)
    den = DenoiserConfig()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(BACKENDS[backend]) if backend else nullcontext():
            loss, _ = training_loss(fwd, x, text, mask, den, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    sec = timed(step, 3, 15)
    img_s = batch / sec
    out = {"name": name, "batch": batch, "compile": compile_mode, "sdpa": backend or "default", "fuse_w13": fuse_w13,
           "first_step_s": first, "step_ms": 1e3 * sec, "img_s": img_s,
           "mfu": img_s * 3 * mmjit.forward_flops(cfg)["total"] / 1e12 / peak,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
    if profile_out is not None:
        out["profile"] = kernel_breakdown(step, profile_out)
    del net, opt, fwd
    torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------
# 3. Kernel time by kind
# --------------------------------------------------------------------------------------------

def kind_of(kernel: str) -> str:
    k = kernel.lower()
    if any(s in k for s in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    if any(s in k for s in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "s16816")):
        return "matmul"
    if k.startswith("triton"):
        return "fused elementwise (triton)"
    if "adam" in k or "foreach" in k or "multi_tensor" in k:
        return "optimizer"
    return "other"


def kernel_breakdown(step, out_path: Path) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) * 1e6 / 3
    by_kind: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            by_kind[kind_of(e.name)] = by_kind.get(kind_of(e.name), 0.0) + e.time_range.elapsed_us() / 3
    out_path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    busy = sum(by_kind.values())
    return {"wall_ms": wall_us / 1e3, "kernel_ms": busy / 1e3,
            **{k: {"ms": v / 1e3, "share": v / busy} for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}


VARIANTS = {
    # name: (compile, sdpa backend, fuse_w13)
    "model": ("model", None, False),
    "blocks": ("blocks", None, False),
    "model+cudnn": ("model", "cudnn", False),
    "model+w13": ("model", None, True),
    "eager": ("none", None, False),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", choices=["floor", "variants"], action="append")
    p.add_argument("--batch", type=int, nargs="+", default=[32])
    p.add_argument("--variants", nargs="+", default=["model", "blocks", "model+cudnn", "model+w13"], choices=list(VARIANTS))
    p.add_argument("--profile", default="model", help="variant whose kernels are broken down by kind ('' for none)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPU throughput only", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    peak = peak_for(name) or 989.4
    out_dir = Path(args.out)
    results: dict = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "peak_bf16": peak}
    save = lambda: (out_dir / "gpu_mfu.json").write_text(json.dumps(results, indent=2))
    todo = args.only or ["floor", "variants"]
    if "floor" in todo:
        for b in args.batch:
            results.setdefault("floor", []).append(floor(b, peak))
            f = results["floor"][-1]
            print(f"floor b{b}: gemm {f['gemm_ms']:.1f} ms + attention {f['attention_ms']:.1f} ms = {f['floor_ms']:.1f} ms"
                  f" -> {f['floor_img_s']:.1f} img/s, MFU {100 * f['floor_mfu']:.1f}%", flush=True)
            for r in f["gemm"]:
                print(f"   {r['name']:<14} M{r['M']:>6} K{r['K']:>5} N{r['N']:>5} x{r['count']:<3} fwd {r['tflops_fwd']:5.0f}"
                      f" dgrad {r['tflops_dgrad']:5.0f} wgrad {r['tflops_wgrad']:5.0f} TFLOP/s  {r['ms_per_step']:6.1f} ms")
            for seq, d in (("joint", f["attention_joint"]), ("text", f["attention_text"])):
                print(f"   attention {seq}:", {k: (round(v["tflops"]) if "tflops" in v else v["error"]) for k, v in d.items()})
            save()
    if "variants" in todo:
        for b in args.batch:
            for v in args.variants:
                mode, backend, w13 = VARIANTS[v]
                prof_path = out_dir / f"profile_{v}_b{b}.txt" if v == args.profile else None
                try:
                    r = variant(v, b, mode, backend, w13, peak, prof_path)
                except Exception as err:       # keep the other variants' numbers
                    r = {"name": v, "batch": b, "error": f"{type(err).__name__}: {str(err)[:300]}"}
                    torch.cuda.empty_cache()
                results.setdefault("variants", []).append(r)
                print("variant", json.dumps(r), flush=True)
                save()

    print(f"\n{name}, torch {torch.__version__}, {results['date']}, B/16 512px bf16 autocast, fused AdamW")
    for f in results.get("floor", []):
        print(f"floor (matmuls + attention alone), batch {f['batch']}: {f['floor_img_s']:.1f} img/s, MFU {100 * f['floor_mfu']:.1f}%")
    print(f"{'variant':<14}{'batch':>6}{'compile':>8}{'sdpa':>9}{'w13':>6}{'img/s':>8}{'MFU':>7}{'mem GB':>8}{'1st s':>7}")
    for r in results.get("variants", []):
        if "error" in r:
            print(f"{r['name']:<14}{r['batch']:>6}  error: {r['error']}")
            continue
        print(f"{r['name']:<14}{r['batch']:>6}{r['compile']:>8}{r['sdpa']:>9}{str(r['fuse_w13']):>6}{r['img_s']:>8.1f}"
              f"{100 * r['mfu']:>6.1f}%{r['peak_mem_gb']:>8.1f}{r['first_step_s']:>7.0f}")
        if "profile" in r:
            print("   kernel time by kind:", {k: (f"{v['ms']:.1f} ms ({100 * v['share']:.0f}%)" if isinstance(v, dict) else f"{v:.1f}")
                                               for k, v in r["profile"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
