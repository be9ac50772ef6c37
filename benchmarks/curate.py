"""Throughput of `minit2i curate` on generated releases (BLIP3o tars + a DALL-E 3 parquet).

    python -m benchmarks.curate --rows 2000 --side 512

Writes a synthetic world to a temp folder (smooth random JPEGs, 10% planted re-encoded
duplicates), builds it once on a local Ray, prints rows/s and MB/s for the whole job. Uses the
tiny ByT5 tokenizer, so token counting is cheaper than with FLAN-T5's SentencePiece.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from tests.pipelines.sources.layouts import encode, smooth_image, wds_members, write_parquet, write_tar


def make_world(root: Path, rows: int, side: int, per_tar: int) -> int:
    total = 0
    blip_rows = rows * 3 // 4
    for t in range(0, blip_rows, per_tar):
        samples = []
        for i in range(t, min(t + per_tar, blip_rows)):
            img = smooth_image(i - 1 if i % 10 == 9 else i, (side, side))  # every 10th: a near copy of its neighbour
            data = encode(img, "JPEG", quality=90 if i % 10 else 80)
            samples.append((f"{i:08d}", {"jpg": data, "txt": f"a photo of object {i} on a red table, left of a cup"}))
            total += len(data)
        write_tar(root / "blip3o" / f"shards-{t // per_tar:05d}.tar", wds_members(samples))
    images = [encode(smooth_image(10**6 + i, (side, side)), "JPEG") for i in range(rows - blip_rows)]
    total += sum(map(len, images))
    write_parquet(root / "dalle3" / "train-0.parquet", {"caption": [f"dalle prompt {i}" for i in range(len(images))],
                                                         "image": images}, image_as_struct="image")
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--per-tar", type=int, default=250)
    args = parser.parse_args()

    import ray

    from pipelines.config import from_dict
    from model.text_encoder import build_tiny_t5
    from pipelines.curate import CurateConfig, curate

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        nbytes = make_world(root, args.rows, args.side, args.per_tar)
        print(f"world: {args.rows} rows, {nbytes / 1e6:.0f} MB of JPEG in {time.perf_counter() - t0:.1f}s")
        cfg = from_dict(CurateConfig, {
            "output": str(root / "out"),
            "sources": {"blip3o": {"paths": [str(root / "blip3o")]}, "dalle3": {"paths": [str(root / "dalle3")]}},
            "filters": {"tokenizer": str(build_tiny_t5(root / "t5")), "min_side": 256},
            "parallelism": {"concurrency": os.cpu_count()},
        })
        from jobs.ray_init import init_ray

        init_ray(num_cpus=os.cpu_count())
        ray.data.DataContext.get_current().enable_progress_bars = False
        t0 = time.perf_counter()
        result = curate(cfg, log=lambda m: None)
        dt = time.perf_counter() - t0
        ray.shutdown()
        print(f"curate: {args.rows} rows -> {result.rows} kept in {dt:.1f}s: "
              f"{args.rows / dt:.0f} rows/s, {nbytes / 1e6 / dt:.1f} MB/s on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
