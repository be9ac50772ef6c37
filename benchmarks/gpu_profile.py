"""Where a B/16 512px bf16 training step spends its GPU time: top kernels, and what masking the
padded text keys (MMJiTConfig.attn_mask=True) costs against MiniT2I's unmasked attention.

    python benchmarks/gpu_profile.py --batch 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import model.mmjit as mmjit
from benchmarks.gpu_bench import bench_train, peak_for


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    peak = peak_for(torch.cuda.get_device_name())
    print("unmasked (MiniT2I):   ", bench_train("B/16", args.batch, True, 10, peak), flush=True)
    print("attn_mask=True:       ", bench_train("B/16", args.batch, True, 10, peak, attn_mask=True), flush=True)

    # Kernel-level profile of the eager step (names are readable without compile).
    from torch.profiler import ProfilerActivity, profile

    from model.denoiser import DenoiserConfig, training_loss
    from benchmarks.gpu_bench import text_inputs

    cfg = mmjit.preset("B/16", text_dim=1024, image_size=512)
    net = mmjit.MMJiT(cfg).cuda()
    x = torch.rand(args.batch, 3, 512, 512, device="cuda") * 2 - 1
    text, mask = text_inputs(args.batch, 256, 1024)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = training_loss(net, x, text, mask, DenoiserConfig())
        loss.backward()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
