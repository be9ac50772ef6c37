"""Import and export time of a released-size MiniT2I checkpoint (random weights, made here).

Writes a B/16 (or L/16) folder in the released diffusers layout (`transformer/config.json` +
`diffusion_pytorch_model.safetensors`, `model.net.*` keys, the unused timestep and pooled
embedders included) with random fp32 weights, then times `weights import`, loading the result
with `load_weights`, and `weights export`. Nothing is downloaded.

    python -m benchmarks.bench_weights [--model B/16] [--dir /tmp/bench-weights]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch


def write_random_release(folder: Path, name: str) -> Path:
    """`folder/transformer/` with the released keys for preset `name` (1024-dim text, 512px)."""
    from safetensors.torch import save_file

    from model import released
    from model.mmjit import preset

    cfg = preset(name, text_dim=1024, image_size=512, text_length=256)
    config = released.diffusers_config(cfg, {"text_encoder": {"name_or_path": "google/flan-t5-large"}})
    shapes = {**released.model_shapes(cfg), **released.unused_shapes(cfg.text_dim, config["cond_vec_size"])}
    g = torch.Generator().manual_seed(0)
    tensors = {released.PREFIX + k: torch.randn(tuple(s), generator=g) * 0.02 for k, s in shapes.items()}
    (folder / "transformer").mkdir(parents=True)
    save_file(tensors, str(folder / "transformer" / released.WEIGHTS_NAME))
    (folder / "transformer" / released.CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def main(argv: list[str] | None = None) -> int:
    from model import released
    from model.checkpoint import load_weights

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="B/16", choices=["B/16", "L/16"])
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp folder, removed after)")
    args = p.parse_args(argv)

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-weights-"))
    try:
        t = time.perf_counter()
        src = write_random_release(root / "release", args.model)
        made = time.perf_counter() - t
        size = (src / "transformer" / released.WEIGHTS_NAME).stat().st_size
        report = released.import_weights(src, root / "imported")
        t = time.perf_counter()
        load_weights(root / "imported")
        loaded = time.perf_counter() - t
        t = time.perf_counter()
        released.export_diffusers(root / "imported", root / "exported")
        exported = time.perf_counter() - t
        print(f"{args.model} released-layout folder: {size / 1e9:.2f} GB fp32 (written in {made:.1f} s)")
        print(f"  weights import    {report.seconds:6.1f} s   (read, check every key and shape, write the weights folder)")
        print(f"  load_weights      {loaded:6.1f} s   (build MM-JiT and load the imported folder)")
        print(f"  weights export    {exported:6.1f} s   (back to the diffusers layout)")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
