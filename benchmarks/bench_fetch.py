"""Fetch throughput: our `minit2i fetch` (Ray tasks) vs plain img2dataset, same list, same server.

    minit2i bench fetch [--images 300] [--side 640]

A loopback HTTP server (its own process, 127.0.0.1) serves `--images` generated JPEGs; both tools
download the same URL list with the same resize settings (keep_ratio to 256, JPEG 95, Parquet out,
32 threads per worker, one worker per CPU). Each tool gets a small warm-up run first, so the timed run
measures steady-state fetching, not Ray worker start-up or first imports. Prints images/s for both
and the ratio (ours / img2dataset).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path


def _image(seed: int, side: int) -> bytes:
    import numpy as np
    from PIL import Image

    h, w = side * 3 // 4, side
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.005, 0.05, 3)
    img = np.stack([128 + 100 * np.sin(a * xx + seed), 128 + 100 * np.cos(b * yy), 128 + 100 * np.sin(c * (xx + yy))], -1)
    img += rng.normal(0, 6, img.shape)  # some texture, so JPEGs have realistic sizes
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _serve(count: int, side: int, port_queue) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    images = [_image(i, side) for i in range(count)]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            i = int(self.path.rsplit("/", 1)[-1].split(".")[0])
            body = images[i % count]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port_queue.put((server.server_address[1], sum(map(len, images))))
    server.serve_forever()


def _url_list(path: Path, base: str, start: int, count: int) -> Path:
    path.write_text("url\tcaption\n" + "".join(f"{base}/img/{i}.jpg\tpicture {i}\n" for i in range(start, start + count)))
    return path


def _ours(urls: Path, out: Path, shard_size: int) -> int:
    from pipelines import fetch

    cfg = fetch.FetchConfig(urls=str(urls), out=str(out), shard_size=shard_size, image_size=256,
                            resize_mode="keep_ratio", encode_quality=95, threads=32, allow_hosts=["127.0.0.1"])
    return fetch.run(cfg).stats["success"]


def _img2dataset(urls: Path, out: Path, shard_size: int, processes: int) -> tuple[int, float]:
    """(successes, seconds inside its workers: first shard start to last shard end)."""
    import json

    import pyarrow.parquet as pq
    from img2dataset import download

    download(url_list=str(urls), output_folder=str(out), input_format="tsv", url_col="url", caption_col="caption",
             output_format="parquet", image_size=256, resize_mode="keep_ratio", resize_only_if_bigger=True,
             encode_quality=95, processes_count=processes, thread_count=32, number_sample_per_shard=shard_size,
             extract_exif=False, compute_hash="sha256", timeout=10, distributor="multiprocessing")
    ok = sum(pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
             for p in sorted(out.glob("*.parquet")))
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    return ok, max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minit2i bench fetch", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--side", type=int, default=640, help="served image width (height is 3/4 of it)")
    parser.add_argument("--shard-size", type=int, default=50)
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    cpus = os.cpu_count() or 1
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_serve, args=(args.images, args.side, ports), daemon=True)
    server.start()
    import ray

    from jobs.ray_init import init_ray

    try:
        port, served_bytes = ports.get(timeout=300)
        base = f"http://127.0.0.1:{port}"
        # Ray's own sockets stay on loopback too (it would swap 127.0.0.1 for the outward address).
        os.environ.setdefault("MINIT2I_RAY_NODE_IP", "127.0.0.3")
        init_ray(num_cpus=cpus, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            warm = _url_list(tmp / "warm.tsv", base, 0, 2 * cpus)
            urls = _url_list(tmp / "urls.tsv", base, 0, args.images)
            _ours(warm, tmp / "ours-warm", 1)
            _img2dataset(warm, tmp / "i2d-warm", 1, cpus)
            t0 = time.perf_counter()
            ours_ok = _ours(urls, tmp / "ours", args.shard_size)
            ours_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            i2d_ok, i2d_inner = _img2dataset(urls, tmp / "i2d", args.shard_size, cpus)
            i2d_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
        server.terminate()
        server.join()

    load = os.getloadavg()[0]
    print(f"\nfetch benchmark: {args.images} JPEGs ({args.side}x{args.side * 3 // 4}, {served_bytes / args.images / 1e3:.0f} kB avg) "
          f"from 127.0.0.1, resize keep_ratio 256, {cpus} CPUs, load average {load:.1f}")
    rows = [
        ("minit2i fetch, end to end (warm Ray)", ours_ok, ours_s),
        ("img2dataset 1.47, end to end", i2d_ok, i2d_s),
        ("img2dataset 1.47, inside its workers", i2d_ok, i2d_inner),
    ]
    print(f"{'run':<40}{'images':>8}{'seconds':>10}{'images/s':>10}")
    for name, ok, seconds in rows:
        print(f"{name:<40}{ok:>8}{seconds:>10.2f}{ok / seconds:>10.1f}")
    ours = ours_ok / ours_s
    # img2dataset spawns a fresh process pool per call (each re-imports it, torch included), so its
    # end-to-end time carries start-up; the in-worker figure leaves that out and is the fairer one.
    print(f"ratio ours / img2dataset: end to end {ours / (i2d_ok / i2d_s):.2f}, "
          f"vs its in-worker rate {ours / (i2d_ok / i2d_inner):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
