"""GPU measurements that only a GPU can give: B/16 training throughput and MFU at 512px in bf16,
sampling speed, T5 encoding cost, and VLM recaption throughput.

The `train` part is Ray- and DeepSpeed-free on purpose: it times the same `training_loss` step the
Ray Train job runs (plain torch, bf16 autocast over fp32 master weights, fused AdamW with beta2
0.95), so it runs on a bare GPU box. The `job` part times the job's own DeepSpeed step (needs
deepspeed, not Ray). Weights are random (throughput does not depend on their values); the VLM is built from
a LLaVA-1.5-7B-shaped config with random weights and forced to generate a fixed number of tokens.

    python benchmarks/gpu_bench.py --out results.json            # everything, ~5 minutes on an H100
    python benchmarks/gpu_bench.py --only train --batch 32
    python benchmarks/gpu_bench.py --only job --batch 32          # DeepSpeed ZeRO-2 eager vs compiled, ZeRO-3
    python benchmarks/gpu_bench.py --only recaption --recaption 16:dynamic 16:static 48:static
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from model.denoiser import DenoiserConfig, SamplerConfig, sample, training_loss
from model.mmjit import MMJiT, forward_flops, preset

# Dense bf16 tensor-core peaks from the datasheets (TFLOP/s), for MFU.
PEAK_BF16 = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}


def peak_for(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def timed(fn, warmup: int, iters: int) -> float:
    """Median seconds per call, with CUDA sync around each timed call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def matmul_ceiling() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    sec = timed(lambda: a @ b, 3, 10)
    return 2 * 8192 ** 3 / sec / 1e12


def text_inputs(B: int, L: int, dim: int, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    text = torch.randn(B, L, dim, device=device, generator=g)
    lengths = torch.randint(8, L, (B,), device=device, generator=g)         # realistic padding
    mask = torch.arange(L, device=device)[None] < lengths[:, None]
    return text, mask


def bench_train(preset_name: str, batch: int, compile_: bool, steps: int, peak: float | None,
                weights: str = "fp32", attn_mask: bool = False) -> dict:
    """weights="fp32": fp32 master weights under bf16 autocast (what torch AMP does); "bf16": bf16
    weights in forward/backward, as DeepSpeed's bf16 mode runs them (its fp32 master copy lives in
    the optimizer; here AdamW steps the bf16 weights directly, a few ms cheaper per step)."""
    torch.manual_seed(0)
    cfg = preset(preset_name, text_dim=1024, image_size=512, attn_mask=attn_mask)
    net = MMJiT(cfg).cuda()
    if weights == "bf16":
        net = net.to(torch.bfloat16)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    fwd = torch.compile(net) if compile_ else net
    x = torch.rand(batch, 3, 512, 512, device="cuda") * 2 - 1
    text, mask = text_inputs(batch, 256, 1024)
    den = DenoiserConfig()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = training_loss(fwd, x, text, mask, den, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    sec = timed(step, 5 if compile_ else 3, steps)
    img_s = batch / sec
    tflops = img_s * 3 * forward_flops(cfg)["total"] / 1e12
    out = {"preset": preset_name, "batch": batch, "compile": compile_, "weights": weights, "attn_mask": attn_mask,
           "step_s": sec, "img_s": img_s,
           "model_tflops": tflops, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
    if peak:
        out["mfu"] = tflops / peak
    del net, opt, fwd
    torch.cuda.empty_cache()
    return out


def bench_job_step(batch: int, zero_stage: int, compile_: bool, steps: int, peak: float | None) -> dict:
    """The job's own step on one GPU: DeepSpeed engine (bf16, ZeRO stage as given, one-process NCCL
    group), uint8 HWC images scaled on the device, per-sample noise draws, one EMA. Needs deepspeed."""
    from jobs.train.step import OptimConfig, ShardedEMA, TrainStep, build_engine

    torch.manual_seed(0)
    cfg = preset("B/16", text_dim=1024, image_size=512)
    optim = OptimConfig(lr=1e-4, warmup_steps=0, zero_stage=zero_stage, compile=compile_)
    t0 = time.perf_counter()
    engine, precision = build_engine(cfg, optim, batch, torch.device("cuda"))
    ema = ShardedEMA(engine, [0.9999])
    step_fn = TrainStep(engine, precision, DenoiserConfig(), optim, ema, seed=0)
    x = torch.randint(0, 256, (batch, 512, 512, 3), dtype=torch.uint8).pin_memory()
    text, mask = text_inputs(batch, 256, 1024)
    i = iter(range(1 << 30))

    def step():
        n = next(i)
        step_fn(n, x, text, mask, positions=list(range(n * batch, (n + 1) * batch)))

    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    sec = timed(step, 3, steps)
    img_s = batch / sec
    tflops = img_s * 3 * forward_flops(cfg)["total"] / 1e12
    out = {"what": "job step (DeepSpeed bf16, EMA, per-sample draws)", "batch": batch, "zero_stage": zero_stage,
           "compile": compile_, "first_step_s": first, "step_s": sec, "img_s": img_s, "model_tflops": tflops,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
    if peak:
        out["mfu"] = tflops / peak
    engine.destroy()
    del engine, ema, step_fn
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def bench_sampling(batch: int, steps: int, sampler: str, compile_: bool, cfg_scale: float = 2.0) -> dict:
    torch.manual_seed(0)
    cfg = preset("B/16", text_dim=1024, image_size=512)
    net = MMJiT(cfg).cuda().to(torch.bfloat16).eval()
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.02)
    fwd = torch.compile(net) if compile_ else net
    text, mask = text_inputs(batch, 256, 1024)
    text = text.to(torch.bfloat16)
    scfg = SamplerConfig(sampler=sampler, steps=steps, cfg_scale=cfg_scale)

    def run():
        return sample(lambda z, t, m: fwd(z.to(torch.bfloat16), t, m), text, mask, (batch, 3, 512, 512), scfg,
                      generator=torch.Generator(device="cuda").manual_seed(0))

    sec = timed(run, 1, 2)
    nfe = steps if sampler == "euler" else 2 * steps - 1
    return {"sampler": sampler, "steps": steps, "nfe": nfe, "cfg_scale": cfg_scale, "batch": batch, "compile": compile_,
            "sec": sec, "img_s": batch / sec}


def bench_t5(batch: int) -> dict:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    with torch.device("cuda"):
        enc = T5EncoderModel(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (batch, 256), device="cuda")
    attn = torch.ones_like(ids)
    with torch.no_grad():
        sec = timed(lambda: enc(input_ids=ids, attention_mask=attn), 2, 10)
    return {"model": "FLAN-T5-large-shaped encoder (bf16)", "batch": batch, "prompts_s": batch / sec}


def bench_recaption(batch: int, new_tokens: int, cache: str = "dynamic") -> dict:
    """LLaVA-1.5-7B-shaped generate() at `batch` images; cache "static" preallocates the KV cache, and
    transformers then compiles the decode step (the first, untimed call pays the compile)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(cfg).eval()
    torch.set_default_dtype(torch.float32)
    n_img = 576  # (336/14)^2 image tokens, LLaVA-1.5 layout
    prompt = torch.cat([torch.tensor([1]), torch.full((n_img,), 32000), torch.randint(100, 30000, (40,))])
    ids = prompt[None].repeat(batch, 1).cuda()
    pixels = torch.randn(batch, 3, 336, 336, device="cuda", dtype=torch.bfloat16)

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  cache_implementation="static" if cache == "static" else None)

    sec = timed(run, 1, 2)
    params = sum(p.numel() for p in model.parameters())
    out = {"model": f"LLaVA-1.5-7B-shaped ({params / 1e9:.2f}B, bf16, random weights)", "batch": batch, "cache": cache,
           "new_tokens": new_tokens, "sec": sec, "images_s": batch / sec, "tokens_s": batch * new_tokens / sec}
    del model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", choices=["matmul", "train", "job", "sample", "t5", "recaption"], action="append")
    p.add_argument("--job", nargs="+", default=["2:eager", "2:compile", "3:eager"],
                   help="job-step setups as ZERO_STAGE:eager|compile (needs deepspeed)")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--weights", nargs="+", default=["fp32"], choices=["fp32", "bf16"], help="weight dtypes to time")
    p.add_argument("--no-eager", action="store_true", help="time only the torch.compile'd step")
    p.add_argument("--recaption", nargs="+", default=["16:dynamic"],
                   help="recaption setups as BATCH:CACHE (dynamic or static: the preallocated KV cache, decode compiled)")
    p.add_argument("--sample", nargs="+", default=["heun:20:2.0"],
                   help="sampling setups as SAMPLER:STEPS:CFG (batch 16, B/16 512px, bf16, compiled); the published "
                        "preset is euler:100:6.0")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_bench.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPU throughput only", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = peak_for(name)
    results: dict = {"device": name, "torch": torch.__version__, "peak_bf16_tflops": peak, "date": time.strftime("%Y-%m-%d")}
    todo = args.only or ["matmul", "train", "job", "sample", "t5", "recaption"]

    def attempt(key, fn):
        try:
            results.setdefault(key, []).append(fn())
            print(key, json.dumps(results[key][-1]), flush=True)
        except Exception as err:  # keep going: one failing section must not lose the others
            results.setdefault(key, []).append({"error": f"{type(err).__name__}: {err}"})
            print(key, "FAILED", err, flush=True)
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(results, indent=2))  # keep what is done if a later part dies

    if "matmul" in todo:
        attempt("matmul_tflops", matmul_ceiling)
    if "train" in todo:
        for compile_ in ((True,) if args.no_eager else (False, True)):
            for w in args.weights:
                for b in args.batch:
                    attempt("train", lambda: bench_train("B/16", b, compile_, args.steps, peak, w))
    if "job" in todo:
        for setup in args.job:
            stage, mode = setup.split(":")
            for b in args.batch:
                attempt("job", lambda: bench_job_step(b, int(stage), mode == "compile", args.steps, peak))
    if "sample" in todo:
        for setup in args.sample:
            sampler, steps, cfg_scale = setup.split(":")
            attempt("sample", lambda: bench_sampling(16, int(steps), sampler, True, float(cfg_scale)))
    if "t5" in todo:
        attempt("t5", lambda: bench_t5(64))
    if "recaption" in todo:
        for setup in args.recaption:
            batch, cache = setup.split(":")
            attempt("recaption", lambda: bench_recaption(int(batch), 64, cache))
    Path(args.out).write_text(json.dumps(results, indent=2))

    print(f"\n{name}, torch {torch.__version__}, {results['date']}")
    if "matmul_tflops" in results:
        print(f"measured bf16 matmul ceiling: {results['matmul_tflops'][0]}")
    print(f"{'B/16 512px train':<20}{'weights':>8}{'batch':>6}{'compile':>8}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'mem GB':>8}")
    for r in results.get("train", []):
        if "error" in r:
            print("  train error:", r["error"])
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{'':<20}{r.get('weights', 'fp32'):>8}{r['batch']:>6}{str(r['compile']):>8}{r['img_s']:>9.1f}{r['model_tflops']:>9.1f}{mfu:>7}{r['peak_mem_gb']:>8.1f}")
    for r in results.get("job", []):
        if "error" in r:
            print("  job step error:", r["error"])
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{'job step, ZeRO-' + str(r['zero_stage']):<20}{'bf16':>8}{r['batch']:>6}{str(r['compile']):>8}{r['img_s']:>9.1f}"
              f"{r['model_tflops']:>9.1f}{mfu:>7}{r['peak_mem_gb']:>8.1f}   first step {r['first_step_s']:.0f} s")
    for key in ("sample", "t5", "recaption"):
        for r in results.get(key, []):
            print(key, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
