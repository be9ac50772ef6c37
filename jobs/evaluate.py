"""`minit2i eval`: score a checkpoint's images with the metrics in jobs/metrics, per image and overall.

Images come from a finished `minit2i generate` folder (`images=...`) or are generated first from
`generate.*` (prompt file, checkpoint, weights, sampler). Every evaluation reports the patch-boundary
artifact ratio; the synthetic-world checks run on prompts of the world grammar; CLIP score, FID,
GenEval and DPG-Bench run when their weights (and files) are given. Output: `records.parquet` (one
row per image, for slicing afterwards), `summary.json`, and a printed table. `score` is the same
code path Tune calls and the train job's periodic evaluation runs.

    minit2i eval images=gen out=ev metrics.clip_model=/models/clip
    minit2i eval generate.prompts=evaluation_metadata.jsonl generate.checkpoint=ckpt metrics.geneval_detector=/models/det
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
from pipelines import storage


@dataclass
class MetricsConfig:
    world: bool = True                     # synthetic-world checks on prompts that parse in its grammar
    patch_size: int | None = None          # artifact-ratio grid; None = the model's patch size (else 16)
    clip_model: str | None = None          # transformers CLIPModel folder -> CLIP score (+ GenEval colours)
    fid_model: str | None = None           # TorchScript InceptionV3 (.pt) or transformers vision folder
    fid_reference: str | None = None       # reference images (generate/dataset folder, PNG folder) or .npz stats
    geneval_detector: str | None = None    # transformers object detector folder; prompts = GenEval metadata JSONL
    dpg_csv: str | None = None             # DPG-Bench dpg_bench.csv (prompts + questions)
    vqa_model: str | None = None           # transformers VQA folder for DPG-Bench
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


def read_reference_images(uri: str) -> np.ndarray:
    """uint8 [N, H, W, 3] from a generate folder, a folder of Parquet shards with `image`, or PNG/JPEG files."""
    import pyarrow.parquet as pq

    from pipelines import manifest as manifest_lib

    if storage.exists(storage.join(uri, manifest_lib.MANIFEST_NAME)) and manifest_lib.read(uri).kind == "generate":
        return np.stack([r["image"] for r in load_generated(uri)])
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
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        from PIL import Image

        h, w, _ = images[0].shape
        images = [np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC)) for im in images]
    return np.stack(images)


class Scorers:
    """The metric models of a MetricsConfig, loaded once (in the eval driver or once per Tune trial)."""

    def __init__(self, cfg: MetricsConfig):
        self.cfg = cfg
        device = _device(cfg.device)
        from jobs.metrics.clip_score import ClipScorer
        from jobs.metrics.fid import FeatureExtractor, feature_stats, load_stats

        self.clip = ClipScorer(cfg.clip_model, device) if cfg.clip_model else None
        self.fid, self.fid_ref = None, None
        if cfg.fid_model or cfg.fid_reference:
            if not (cfg.fid_model and cfg.fid_reference):
                raise ValueError("FID needs both metrics.fid_model and metrics.fid_reference")
            self.fid = FeatureExtractor(cfg.fid_model, device)
            ref = cfg.fid_reference
            self.fid_ref = load_stats(ref) if str(ref).endswith(".npz") else feature_stats(self.fid(read_reference_images(ref)))
        self.detector = geneval.Detector(cfg.geneval_detector, device) if cfg.geneval_detector else None
        self.dpg_questions = dpg.load_benchmark(cfg.dpg_csv)[1] if cfg.dpg_csv else None
        if self.dpg_questions is not None and not cfg.vqa_model:
            raise ValueError("DPG-Bench needs metrics.vqa_model (a transformers VQA folder)")
        self.vqa = dpg.VQA(cfg.vqa_model, device) if cfg.vqa_model else None

    def _colour_fn(self, image: np.ndarray, label: str):
        if self.clip is None:
            return lambda d: geneval.median_colour(image, d.box)
        names = list(geneval.COLOURS)

        def colour(d):
            x0, y0, x1, y1 = (int(round(v)) for v in d.box)
            crop = image[max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)]
            return names[self.clip.classify(crop, [f"a photo of a {c} {label}" for c in names])]

        return colour

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
            from jobs.metrics.fid import feature_stats, frechet_distance

            summary["fid"] = frechet_distance(*feature_stats(self.fid(images)), *self.fid_ref)

        if self.detector is not None:
            tags, correct = [], []
            for rec, image, row in zip(records, images, rows):
                meta = row.get("metadata") or {}
                if "tag" not in meta or "include" not in meta:
                    continue
                dets = self.detector(image[None])[0]
                ok, why = geneval.judge(meta, dets, self._colour_fn(image, meta["include"][0]["class"]))
                rec.update({"geneval_tag": meta["tag"], "geneval_correct": ok, "geneval_reason": why})
                tags.append(meta["tag"])
                correct.append(ok)
            if not tags:
                raise ValueError("GenEval detector given but no image has GenEval metadata (tag, include): "
                                 "generate from the GenEval evaluation_metadata.jsonl")
            summary.update({f"geneval/{k}": v for k, v in geneval.summarize(tags, correct).items()})

        if self.dpg_questions is not None:
            per_image = []
            for rec, image, row in zip(records, images, rows):
                item = str((row.get("metadata") or {}).get("item_id", ""))
                if item not in self.dpg_questions:
                    continue
                qs = self.dpg_questions[item]
                s = dpg.score_answers(qs, self.vqa(image, [q.text for q in qs]))
                rec["dpg_score"] = s["score"]
                per_image.append(s)
            summary.update({f"dpg/{k}": v for k, v in dpg.summarize(per_image).items()})
        return records, summary


def write_dpg_prompts(csv_path: str, out: str) -> str:
    """dpg_bench.csv -> a prompts JSONL (prompt + item_id) that `generate` reads."""
    prompts, _ = dpg.load_benchmark(csv_path)
    uri = storage.join(out, "dpg_prompts.jsonl")
    storage.write_bytes(uri, "".join(json.dumps({"prompt": p, "item_id": i}) + "\n" for i, p in prompts.items()).encode())
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
        if cfg.metrics.dpg_csv and not gen.prompts:
            gen.prompts = write_dpg_prompts(cfg.metrics.dpg_csv, cfg.out)
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
