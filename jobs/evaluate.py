"""`minit2i eval`: score a checkpoint's images with the metrics in jobs/metrics, per image and overall.

Images come from a finished `minit2i generate` folder (`images=...`) or are generated first from
`generate.*` (prompt file, checkpoint, weights, sampler); without a prompt file, a benchmark's own
file gives the prompts (GenEval metadata, DPG-Bench, COCO captions). Every evaluation reports the
patch-boundary artifact ratio; the synthetic-world checks run on prompts of the world grammar; CLIP
score, FID, GenEval and DPG-Bench run when their weights (and files) are given. Output:
`records.parquet` (one row per image, for slicing afterwards), `summary.json`, and a printed table.
`score` is the same code path Tune calls and the train job's periodic evaluation runs.

    minit2i eval images=gen out=ev metrics.clip_model=/models/clip
    minit2i eval generate.checkpoint=ckpt metrics.geneval_metadata=evaluation_metadata.jsonl \
        metrics.geneval_detector=/models/mask2former metrics.clip_model=/models/clip-vit-l-14
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines import config as config_lib
from jobs.generate import GenerateConfig, decode_png, generate_images, load_generated
from jobs.metrics import artifacts, dpg, geneval, world
from jobs.metrics import fid as fid_lib
from pipelines import storage


@dataclass
class MetricsConfig:
    world: bool = True                     # synthetic-world checks on prompts that parse in its grammar
    patch_size: int | None = None          # artifact-ratio grid; None = the model's patch size (else 16)
    clip_model: str | None = None          # transformers CLIPModel folder -> CLIP score and GenEval colours (official: ViT-L/14)
    fid_model: str | None = None           # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID) or a transformers folder (FD)
    fid_reference: str | None = None       # .npz stats (mu/sigma or ref_mu/ref_sigma) or reference images (generate, Parquet, PNG folder)
    fid_preprocess: str = "minit2i"        # "minit2i" (the reference's resize, its published stats) or "pytorch-fid"
    coco_captions: str | None = None       # COCO FID-30K {id: caption} JSON: the prompts when eval generates
    geneval_metadata: str | None = None    # GenEval evaluation_metadata.jsonl: the prompts when eval generates
    geneval_detector: str | None = None    # Mask2Former COCO instance: transformers folder or mmdetection .pth
    dpg_bench: str | None = None           # DPG-Bench: ELLA's dpg_bench.csv or the nested Parquet (prompts + questions)
    vqa_model: str | None = None           # transformers VQA folder judging DPG-Bench
    device: str = "auto"                   # "auto" (cuda when present), "cpu", "cuda"


@dataclass
class EvalConfig:
    images: str | None = None              # a finished `minit2i generate` folder; None = generate now
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    out: str = "outputs/eval"


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def read_reference_images(uri: str) -> list[np.ndarray]:
    """uint8 [H, W, 3] images from a generate folder, a folder of Parquet shards with `image`, or PNG/JPEG files."""
    import pyarrow.parquet as pq

    from pipelines import manifest as manifest_lib

    if storage.exists(storage.join(uri, manifest_lib.MANIFEST_NAME)) and manifest_lib.read(uri).kind == "generate":
        return [r["image"] for r in load_generated(uri)]
    shards = storage.list_files(uri, ".parquet")
    images = []
    for s in shards:
        fs, path = storage.resolve(s)
        for data in pq.read_table(path, columns=["image"], filesystem=fs).column("image").to_pylist():
            if data is not None:
                images.append(decode_png(data))
    if not shards:
        from PIL import Image

        for f in sorted(storage.list_files(uri)):
            if f.lower().endswith((".png", ".jpg", ".jpeg")):
                images.append(np.asarray(Image.open(io.BytesIO(storage.read_bytes(f))).convert("RGB")))
    if not images:
        raise ValueError(f"FID reference {uri} holds no images (expected Parquet shards with `image`, or PNG/JPEG files)")
    return images


class Scorers:
    """The metric models of a MetricsConfig, loaded once (in the eval driver or once per Tune trial)."""

    def __init__(self, cfg: MetricsConfig):
        self.cfg = cfg
        device = _device(cfg.device)
        from jobs.metrics.clip_score import ClipScorer

        self.clip = ClipScorer(cfg.clip_model, device) if cfg.clip_model else None
        self.fid, self.fid_ref = None, None
        if cfg.fid_model or cfg.fid_reference:
            if not (cfg.fid_model and cfg.fid_reference):
                raise ValueError("FID needs both metrics.fid_model and metrics.fid_reference")
            self.fid = fid_lib.feature_extractor(cfg.fid_model, device, cfg.fid_preprocess)
            if str(cfg.fid_reference).endswith(".npz"):
                self.fid_ref = fid_lib.load_stats(cfg.fid_reference)   # images: at the first score(), at their size
        self.geneval = None
        if cfg.geneval_detector:
            from jobs.metrics.mask2former import Mask2FormerDetector

            self.geneval = geneval.GenEvalJudge(Mask2FormerDetector(cfg.geneval_detector, device), self.clip)
        self.dpg = dpg.load_benchmark(cfg.dpg_bench) if cfg.dpg_bench else None
        if self.dpg is not None and not cfg.vqa_model:
            raise ValueError("DPG-Bench needs metrics.vqa_model (a transformers VQA folder)")
        self.vqa = dpg.VQA(cfg.vqa_model, device) if cfg.vqa_model else None

    def _fid_reference(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.fid_ref is None:
            images = [fid_lib.reference_resize(im, size) for im in read_reference_images(self.cfg.fid_reference)]
            self.fid_ref = fid_lib.feature_stats(self.fid(images))
        return self.fid_ref

    def score(self, rows: list[dict[str, Any]], patch_size: int = 16) -> tuple[list[dict], dict[str, float]]:
        """rows with image (uint8 [H, W, 3]), prompt, metadata -> (per-image records, summary)."""
        images = np.stack([r["image"] for r in rows])
        prompts = [r["prompt"] for r in rows]
        records = [{k: v for k, v in r.items() if k not in ("image",)} for r in rows]
        for rec in records:
            rec["metadata"] = json.dumps(rec.get("metadata") or {}, sort_keys=True)
        summary: dict[str, float] = {"images": float(len(rows))}

        ratios = artifacts.per_image_ratio(images, patch_size)
        summary["artifact_ratio"] = artifacts.artifact_ratio(images, patch_size)
        summary["artifact_patch"] = float(patch_size)
        for rec, ratio in zip(records, ratios):
            rec["artifact_ratio"] = float(ratio)

        if self.cfg.world:
            verdicts = []
            for rec, image, prompt in zip(records, images, prompts):
                try:
                    parsed = world.parse_caption(prompt)
                except ValueError:
                    rec["world_category"] = None           # not a world prompt: no exact check
                    continue
                v = world.check_image(image, parsed)
                verdicts.append(v)
                rec.update({f"world_{k}": val for k, val in v.record().items()})
            summary.update({f"world/{k}": v for k, v in world.summarize(verdicts).items()})

        if self.clip is not None:
            clip = self.clip(images, prompts)
            for rec, s in zip(records, clip):
                rec["clip_score"] = float(s)
            summary["clip_score"] = float(np.mean(clip))

        if self.fid is not None:
            ref = self._fid_reference(images.shape[1])
            summary["fid"] = fid_lib.frechet_distance(*fid_lib.feature_stats(self.fid(images)), *ref)

        if self.geneval is not None:
            picked = [i for i, r in enumerate(rows) if geneval.is_geneval(r.get("metadata"))]
            if not picked:
                raise ValueError("GenEval detector given but no image has GenEval metadata (tag, include): "
                                 "generate from GenEval's evaluation_metadata.jsonl")
            # `generate` keeps a metadata line without its prompt; put it back for the rules and the summary.
            metas = [geneval.parse_metadata({**rows[i]["metadata"], "prompt": rows[i]["prompt"]},
                                            f"image {rows[i].get('key', i)}") for i in picked]
            results = self.geneval(images[picked], metas)
            for i, res in zip(picked, results):
                records[i].update({"geneval_tag": res["tag"], "geneval_correct": res["correct"],
                                   "geneval_reason": res["reason"], "geneval_details": res["details"]})
            summary.update({f"geneval/{k}": v for k, v in geneval.summarize(results).items()})

        if self.dpg is not None:
            results = []
            for rec, image, row in zip(records, images, rows):
                item = str((row.get("metadata") or {}).get("item_id", ""))
                if item not in self.dpg:
                    continue
                qs = self.dpg[item].questions
                res = dpg.score_image(qs, self.vqa(image, [q.text for q in qs]))
                rec["dpg_score"] = None if res is None else res["score"]
                results.append((item, res))
            summary.update({f"dpg/{k}": v for k, v in dpg.summarize(self.dpg, results).items()})
        return records, summary


def benchmark_prompts(cfg: MetricsConfig) -> list[dict] | None:
    """The prompts of the one benchmark file given (prompt + the metadata its scorer needs), else None."""
    given = [k for k in ("geneval_metadata", "dpg_bench", "coco_captions") if getattr(cfg, k)]
    if len(given) > 1:
        raise ValueError(f"eval generates from one benchmark file at a time, got {', '.join(given)} "
                         "(or give generate.prompts)")
    if cfg.geneval_metadata:
        return geneval.load_metadata(cfg.geneval_metadata)
    if cfg.dpg_bench:
        return [{"prompt": item.prompt, "item_id": i} for i, item in dpg.load_benchmark(cfg.dpg_bench).items()]
    if cfg.coco_captions:
        return [{"prompt": c, "coco_id": i} for i, c in fid_lib.load_coco_captions(cfg.coco_captions)]
    return None


def write_benchmark_prompts(cfg: MetricsConfig, out: str) -> str | None:
    """The benchmark's prompts as a JSONL that `generate` reads (metadata kept per image), or None."""
    rows = benchmark_prompts(cfg)
    if rows is None:
        return None
    uri = storage.join(out, "benchmark_prompts.jsonl")
    storage.write_bytes(uri, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return uri


def write_records(records: list[dict], uri: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Metrics apply to some images only (GenEval rows, world prompts): give every row every column.
    keys = list(dict.fromkeys(k for r in records for k in r))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), buf)
    storage.write_bytes(uri, buf.getvalue())


def print_summary(summary: dict[str, float], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console(width=100).print(table)


def evaluate(cfg: EvalConfig) -> dict[str, float]:
    """Generate (unless images are given), score, write records.parquet + summary.json; returns the summary."""
    images = cfg.images
    if images is None:
        gen = dataclasses.replace(cfg.generate, out=storage.join(cfg.out, "images"))
        gen.prompts = gen.prompts or write_benchmark_prompts(cfg.metrics, cfg.out) or ""
        stats = generate_images(gen)
        print(f"eval: generated {stats['generated']} images ({stats['images_per_s']:.2f} images/s)")
        images = gen.out
    rows = load_generated(images)
    settings = json.loads(rows[0].get("settings") or "{}")
    patch = cfg.metrics.patch_size or settings.get("patch_size") or 16
    records, summary = Scorers(cfg.metrics).score(rows, int(patch))
    write_records(records, storage.join(cfg.out, "records.parquet"))
    storage.write_bytes(storage.join(cfg.out, "summary.json"),
                        json.dumps({"images": images, "settings": settings, "summary": summary}, indent=2, sort_keys=True).encode())
    return summary


def run(cfg: EvalConfig) -> int:
    summary = evaluate(cfg)
    print_summary(summary, f"eval of {cfg.images or cfg.generate.checkpoint or 'a fresh model'}")
    print(f"wrote {storage.join(cfg.out, 'records.parquet')} and summary.json")
    return 0
