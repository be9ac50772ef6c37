"""`minit2i generate`: prompts x seeds -> images, as a Ray Data job (GPU actors or CPU), resumable.

A prompt file (txt: one per line; JSONL: objects with `prompt` plus any metadata such as GenEval's
tag/include; Parquet: a `prompt` or `caption` column) is crossed with the seeds and cut into
deterministic shards. Each shard is sampled by one call of a `SampleShard` actor (the checkpoint is
loaded once per actor) and written as `shard-NNNNN.parquet` (key, index, seed, prompt, metadata,
image PNG bytes or image_path, width, height, settings) followed by a marker in `_done/`; a rerun
skips shards whose marker exists and refuses to mix images made with other settings. The manifest
is written last. Image (index i, seed s) starts from the noise `jobs.inference.image_noise` gives
(i, s), the one `minit2i sample seed=s` uses for its i-th prompt, so single images can be re-made.

    minit2i generate prompts=prompts.txt checkpoint=outputs/runs/debug seeds=[0,1] out=gen sampler.cfg_scale=4
    minit2i generate prompts=evaluation_metadata.jsonl checkpoint=weights/minit2i-b16 sampler.preset=geneval out=gen
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobs.inference import SamplerSection
from model.denoiser import SamplerConfig
from pipelines import config as config_lib
from pipelines import manifest as manifest_lib
from pipelines import retry, storage

DONE_DIR = "_done"
DEFAULT_SAMPLER = SamplerConfig()       # Heun, 100 steps, CFG 2.0: where neither a preset nor the checkpoint says


@dataclass
class GenerateConfig:
    prompts: str = ""                          # prompt file: .txt, .jsonl or .parquet (local or s3://)
    out: str = "outputs/generated"             # output folder (local or s3://)
    checkpoint: str | None = None              # weights folder, checkpoint or run folder; None = a fresh `preset` model
    weights: str | None = None                 # which weights file (e.g. ema_0.9999, model); None = best EMA
    preset: str = "debug"                      # preset of the fresh model when no checkpoint is given
    text_encoder: str | None = None            # override the checkpoint's text encoder
    seeds: list[int] = field(default_factory=lambda: [0])
    sampler: SamplerSection = field(default_factory=SamplerSection)   # preset and/or settings; unset: the checkpoint's, else DEFAULT_SAMPLER
    noise_scale: float | None = None           # ODE start noise; None = the checkpoint's training noise_scale
    limit: int | None = None                   # use only the first N prompts
    shard_size: int = 64                       # images per output shard (the unit of resumption)
    batch_size: int = 16                       # images per sampler call inside a shard
    format: str = "parquet"                    # "parquet" (PNG bytes in the shards) or "png" (files in images/)
    num_gpus: float = 0.0                      # GPUs per actor (0 = CPU)
    num_cpus: float = 1.0                      # CPUs per actor
    concurrency: int = 1                       # sampler actors

    def __post_init__(self):
        if self.format not in ("parquet", "png"):
            raise ValueError(f"format must be 'parquet' or 'png', got {self.format!r}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("shard_size and batch_size must be >= 1")
        self.seeds = [int(s) for s in (self.seeds if isinstance(self.seeds, (list, tuple)) else [self.seeds])]


# ---------------------------------------------------------------------------------------------
# Reading prompts


def read_prompts(uri: str) -> list[dict[str, Any]]:
    """[{"prompt": str, "metadata": dict}] in file order, from .txt, .jsonl/.json or .parquet."""
    if not uri:
        raise ValueError("no prompt file given (prompts=...)")
    if not storage.exists(uri):
        raise FileNotFoundError(f"prompt file {uri} does not exist")
    suffix = Path(str(uri)).suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs)
        col = next((c for c in ("prompt", "caption", "text") if c in table.column_names), None)
        if col is None:
            raise ValueError(f"{uri} has no prompt, caption or text column (columns: {', '.join(table.column_names)})")
        keep = [c for c in table.column_names if c != col and not str(table.schema.field(c).type).startswith(("binary", "large_binary"))]
        meta = table.select(keep).to_pylist()
        rows = [{"prompt": str(p), "metadata": m} for p, m in zip(table.column(col).to_pylist(), meta)]
    else:
        text = storage.read_bytes(uri).decode()
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if suffix in (".jsonl", ".json"):
                try:
                    obj = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{uri}:{n}: not valid JSON: {err}") from err
                key = next((k for k in ("prompt", "caption", "text") if k in obj), None)
                if key is None:
                    raise ValueError(f"{uri}:{n}: no prompt, caption or text field")
                rows.append({"prompt": str(obj.pop(key)), "metadata": obj})
            else:
                rows.append({"prompt": line.strip(), "metadata": {}})
    if not rows:
        raise ValueError(f"prompt file {uri} holds no prompts")
    return rows


def plan_shards(prompts: list[dict], seeds: list[int], shard_size: int) -> list[dict[str, list]]:
    """Deterministic shards of (index, seed) rows, prompt-major."""
    rows = [(i, s) for i in range(len(prompts)) for s in seeds]
    shards = []
    for k, start in enumerate(range(0, len(rows), shard_size)):
        chunk = rows[start:start + shard_size]
        shards.append({
            "shard": k,
            "index": [i for i, _ in chunk],
            "seed": [s for _, s in chunk],
            "prompt": [prompts[i]["prompt"] for i, _ in chunk],
            "metadata": [json.dumps(prompts[i]["metadata"], sort_keys=True, default=str) for i, _ in chunk],
        })
    return shards


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


# ---------------------------------------------------------------------------------------------
# The Ray Data stage


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class SampleShard:
    """Ray Data stage: one shard of (prompt, seed) rows in, its images written, a summary row out.

    The constructor loads the network and text encoder once per actor (GPU when the actor has one).
    """

    def __init__(self, cfg: dict, digest: str):
        import torch

        from jobs.inference import load_model, sampler_settings

        self.cfg = config_lib.from_dict(GenerateConfig, cfg)
        self.digest = digest
        device = torch.device("cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.net, self.encoder, meta = load_model(self.cfg.checkpoint, self.cfg.weights, self.cfg.preset,
                                                  self.cfg.text_encoder, device)
        self.sampler = sampler_settings(self.cfg.sampler, meta, DEFAULT_SAMPLER, self.cfg.noise_scale)
        self.settings = json.dumps(settings_of(self.cfg, meta, self.sampler), sort_keys=True)

    def sample(self, prompts: list[str], indices: list[int], seeds: list[int]) -> np.ndarray:
        from jobs.inference import sample_images

        return sample_images(self.net, self.encoder, self.sampler, prompts, indices, seeds, self.cfg.batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summary = {"shard": [], "rows": [], "seconds": []}
        for j, k in enumerate(batch["shard"]):
            t0 = time.perf_counter()
            indices = [int(v) for v in batch["index"][j]]
            seeds = [int(v) for v in batch["seed"][j]]
            prompts = [str(v) for v in batch["prompt"][j]]
            # A shard committed by an actor that died before Ray Data got its answer (a lost node)
            # comes back as a retried batch: it is kept, not made again.
            done = committed_marker(self.cfg.out, int(k))
            if done is not None and done.get("digest") == self.digest:
                n = int(done["rows"])
            else:
                images = self.sample(prompts, indices, seeds)
                n = write_shard(self.cfg.out, int(k), indices, seeds, prompts, [str(v) for v in batch["metadata"][j]],
                                images, self.settings, self.cfg.format, self.digest)
            summary["shard"].append(int(k))
            summary["rows"].append(n)
            summary["seconds"].append(time.perf_counter() - t0)
        return {k: np.asarray(v) for k, v in summary.items()}


def committed_marker(out: str, k: int) -> dict | None:
    """Shard k's done-marker when the shard and its marker are both written, else None."""
    marker = storage.join(out, DONE_DIR, f"{k:05d}.json")
    if storage.exists(marker) and storage.exists(storage.join(out, shard_name(k))):
        return json.loads(storage.read_bytes(marker))
    return None


@retry.in_stage("generate")
def write_shard(out: str, k: int, indices: list[int], seeds: list[int], prompts: list[str], metadata: list[str],
                images: np.ndarray, settings: str, fmt: str, digest: str) -> int:
    """Write shard k (Parquet, plus PNG files for fmt="png"), then its done-marker. Returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [f"{i:06d}-s{s}" for i, s in zip(indices, seeds)]
    pngs = [encode_png(im) for im in images]
    columns = {
        "key": keys, "index": pa.array(indices, pa.int32()), "seed": pa.array(seeds, pa.int64()),
        "prompt": prompts, "metadata": metadata,
        "width": pa.array([im.shape[1] for im in images], pa.int32()),
        "height": pa.array([im.shape[0] for im in images], pa.int32()),
        "settings": [settings] * len(keys),
    }
    if fmt == "png":
        paths = [f"images/{key}.png" for key in keys]
        for p, data in zip(paths, pngs):
            storage.write_bytes(storage.join(out, p), data)
        columns["image_path"] = paths
    else:
        columns["image"] = pa.array(pngs, pa.binary())
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    data = buf.getvalue()
    storage.write_bytes(storage.join(out, shard_name(k)), data)
    # The marker goes last: a shard without one is redone, never half-trusted.
    marker = {"digest": digest, "rows": len(keys), "sha256": hashlib.sha256(data).hexdigest()}
    storage.write_bytes(storage.join(out, DONE_DIR, f"{k:05d}.json"), json.dumps(marker).encode())
    return len(keys)


def settings_of(cfg: GenerateConfig, meta: dict, sampler: SamplerConfig) -> dict:
    return {"checkpoint": cfg.checkpoint, "weights": meta.get("weights"), "text_encoder": cfg.text_encoder,
            "sampler": config_lib.to_dict(sampler), "patch_size": meta.get("model", {}).get("patch_size")}


def settings_digest(cfg: GenerateConfig, prompts_digest: str) -> str:
    """What makes two runs' images interchangeable: model, weights, sampler, seeds, prompts, layout."""
    d = config_lib.to_dict(cfg)
    for k in ("out", "num_gpus", "num_cpus", "concurrency", "batch_size"):
        d.pop(k)
    return hashlib.sha256(json.dumps({**d, "prompts_sha256": prompts_digest}, sort_keys=True).encode()).hexdigest()


@retry.in_stage("generate")
def generate_images(cfg: GenerateConfig) -> dict[str, Any]:
    """Run the job; returns stats (images, generated, skipped_shards, seconds, images_per_s)."""
    if cfg.checkpoint:               # a run folder means its newest checkpoint now, for every actor and the digest
        from jobs.train.checkpoints import weights_folder

        from jobs.inference import read_checkpoint_meta, sampler_settings

        cfg = dataclasses.replace(cfg, checkpoint=weights_folder(cfg.checkpoint))
        # A preset or setting that contradicts the checkpoint fails here, in one line, not in the actors.
        sampler_settings(cfg.sampler, read_checkpoint_meta(cfg.checkpoint), DEFAULT_SAMPLER, cfg.noise_scale)
    prompts = read_prompts(cfg.prompts)[: cfg.limit]
    prompts_digest, _ = storage.file_digest(cfg.prompts)
    digest = settings_digest(cfg, prompts_digest)
    shards = plan_shards(prompts, cfg.seeds, cfg.shard_size)
    pending = []
    for s in shards:
        done = committed_marker(cfg.out, s["shard"])
        if done is not None:
            if done.get("digest") != digest:
                marker = storage.join(cfg.out, DONE_DIR, f"{s['shard']:05d}.json")
                raise ValueError(f"{cfg.out} holds images made with other settings or prompts ({marker}); "
                                 f"write to a new out folder")
            continue
        pending.append(s)
    t0 = time.perf_counter()
    generated = 0
    if pending:
        from jobs.ray_init import init_ray

        ray = init_ray()
        ds = ray.data.from_items(pending, override_num_blocks=len(pending))
        ds = ds.map_batches(SampleShard, fn_constructor_kwargs={"cfg": config_lib.to_dict(cfg), "digest": digest},
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                            num_gpus=cfg.num_gpus, num_cpus=cfg.num_cpus)
        generated = int(sum(r["rows"] for r in ds.take_all()))
    seconds = time.perf_counter() - t0
    entries = [manifest_lib.shard_entry(cfg.out, storage.join(cfg.out, shard_name(s["shard"])), len(s["index"])) for s in shards]
    manifest_lib.write(cfg.out, manifest_lib.Manifest(
        kind="generate", config={**config_lib.to_dict(cfg), "settings_digest": digest},
        inputs=[manifest_lib.input_entry(cfg.prompts)], shards=entries,
        stats={"images": sum(len(s["index"]) for s in shards), "prompts": len(prompts), "seeds": len(cfg.seeds)},
    ))
    return {"images": sum(len(s["index"]) for s in shards), "generated": generated,
            "skipped_shards": len(shards) - len(pending), "seconds": seconds,
            "images_per_s": generated / seconds if generated else 0.0}


def load_generated(root: str) -> list[dict[str, Any]]:
    """Rows of a finished generate folder (manifest required), each with `image` decoded to uint8 [H, W, 3]."""
    import pyarrow.parquet as pq

    m = manifest_lib.read(root)
    rows = []
    for shard in m.shards:
        fs, path = storage.resolve(storage.join(root, shard.path))
        for row in pq.read_table(path, filesystem=fs).to_pylist():
            data = row.pop("image", None)
            if data is None:
                data = storage.read_bytes(storage.join(root, row["image_path"]))
            row["image"] = decode_png(data)
            row["metadata"] = json.loads(row["metadata"] or "{}")
            rows.append(row)
    return rows


def run(cfg: GenerateConfig) -> int:
    stats = generate_images(cfg)
    print(f"generate: {stats['images']} images in {cfg.out} ({stats['generated']} new, "
          f"{stats['skipped_shards']} shards already done); {stats['images_per_s']:.2f} images/s")
    return 0
