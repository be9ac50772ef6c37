"""MM-JiT training-step throughput and MFU on one GPU: plain torch, no Ray, no DeepSpeed.

    python benchmarks/gpu_train_step.py --preset B/16 --batch 32 --steps 20 [--compile]
    python benchmarks/gpu_train_step.py --preset debug --device cpu --steps 2      # smoke test

bf16 autocast, fused AdamW (beta2 0.95), the real v-loss from model/denoiser.py on random images
and random "T5" features (text length 256 x 1024 for B/16 and L/16). MFU = analytic training FLOPs
(3 x forward, model.mmjit.forward_flops; denoiser only, T5 excluded) x img/s / peak bf16 FLOP/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.denoiser import DenoiserConfig, training_loss  # noqa: E402
from model.mmjit import MMJiT, count_params, forward_flops, preset  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense, SXM datasheets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="B/16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--text-dim", type=int, default=None, help="default: 1024 (64 for debug)")
    args = p.parse_args()

    device = torch.device(args.device)
    text_dim = args.text_dim or (64 if args.preset == "debug" else 1024)
    cfg = preset(args.preset, text_dim=text_dim)
    torch.manual_seed(0)
    net = MMJiT(cfg).to(device)
    torch.nn.init.normal_(net.final.weight, std=0.02)          # non-zero output so every layer gets gradients
    model = torch.compile(net) if args.compile else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    den = DenoiserConfig(noise_scale=2.0)
    B, S = args.batch, cfg.image_size
    x = torch.rand(B, 3, S, S, device=device) * 2 - 1
    text = torch.randn(B, cfg.text_length, text_dim, device=device)
    mask = torch.ones(B, cfg.text_length, dtype=torch.bool, device=device)
    mask[:, cfg.text_length // 2:] = False                     # typical captions use part of the prompt length
    use_amp = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, _ = training_loss(model, x, text, mask, den)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    img_s = B / dt
    train_flops = 3 * forward_flops(cfg)["total"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"device: {name}  preset {args.preset} ({count_params(cfg) / 1e6:.1f}M params) {S}px  batch {B}  "
          f"compile {args.compile}")
    print(f"step {dt * 1000:.1f} ms  {img_s:.1f} img/s  train TFLOP/s {train_flops * img_s / 1e12:.1f}  "
          f"loss {loss.item():.4f}" + (f"  MFU {100 * train_flops * img_s / peak:.1f}%" if peak else ""))
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
