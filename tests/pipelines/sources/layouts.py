"""Tiny fixtures written in each release's real on-disk layout (shared by the reader and curate tests)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def smooth_image(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A random low-frequency picture: distinct seeds are >= 18 pHash bits apart, re-encodes <= 4."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], gz: bool = False) -> Path:
    """A tar with `members` (name, bytes) in exactly this order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def wds_members(samples: list[tuple[str, dict[str, bytes | str]]]) -> list[tuple[str, bytes]]:
    """WebDataset members: each sample's files `{key}.{ext}` consecutively (str -> utf-8)."""
    return [(f"{key}.{ext}", data.encode() if isinstance(data, str) else data)
            for key, parts in samples for ext, data in parts.items()]


def write_parquet(path: Path, columns: dict[str, list], image_as_struct: str | None = None) -> Path:
    """A Parquet file; `image_as_struct` names a column written as HF datasets' {bytes, path} struct."""
    arrays = {}
    for name, values in columns.items():
        if name == image_as_struct:
            arrays[name] = pa.array(
                [None if v is None else {"bytes": v, "path": None} for v in values],
                type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        elif values and isinstance(next((v for v in values if v is not None), ""), bytes):
            arrays[name] = pa.array(values, type=pa.binary())
        else:
            arrays[name] = pa.array(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)
    return path


def write_sharegpt(root: Path, records: list[dict], archives: dict[str, list[tuple[str, bytes]]],
                   jsonl: bool = False, split_parts: int = 0) -> tuple[Path, Path]:
    """text_to_image.json(l) + image archives under root/images; `split_parts` > 0 byte-splits each
    archive into that many `{name}.part_aa`, `_ab`, ... files. Returns (metadata, images folder)."""
    root.mkdir(parents=True, exist_ok=True)
    meta = root / ("text_to_image.jsonl" if jsonl else "text_to_image.json")
    meta.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    images = root / "images"
    for name, members in archives.items():
        tar = write_tar(images / name, members, gz=name.endswith(".gz"))
        if split_parts:
            data = tar.read_bytes()
            tar.unlink()
            step = -(-len(data) // split_parts)
            for i in range(split_parts):
                (images / f"{name}.part_a{chr(ord('a') + i)}").write_bytes(data[i * step:(i + 1) * step])
    return meta, images


def write_geneval_prompts(path: Path, prompts: list[str]) -> Path:
    """GenEval's evaluation_metadata.jsonl layout: one object per line with tag, include, prompt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"tag": "color_attr", "include": [], "prompt": p}) + "\n" for p in prompts))
    return path


# --- CC12M: the pixparse/cc12m-wds mirror and the CaptionEmporium LLaVA-NeXT captions -----------

CC12M_WDS_SCHEMA = ("caption", "url", "key", "status", "error_message", "width", "height",
                    "original_width", "original_height", "exif")  # img2dataset's meta, in its order


def write_cc12m_wds(root: Path, shards: list[list[dict]]) -> list[Path]:
    """`cc12m-train-NNNN.tar` files written by img2dataset's own WebDataset writer, as the mirror was.

    Each sample is {url, caption, image (bytes, or None for a failed download, which img2dataset
    keeps out of the tar), original_size (w, h) before its resize}. Keys are img2dataset's
    `compute_key` with 10^5 samples a shard and 4-digit shard ids (9 digits, as in the mirror).
    Returns the tars; img2dataset's per-shard parquet beside each is removed (the mirror has none)
    and the folder also gets the mirror's non-tar files.
    """
    from img2dataset.downloader import compute_key
    from img2dataset.writer import WebDatasetSampleWriter

    root.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(n, pa.int32() if n in ("width", "height", "original_width", "original_height") else pa.string())
                        for n in CC12M_WDS_SCHEMA])
    tars = []
    for shard_id, samples in enumerate(shards):
        writer = WebDatasetSampleWriter(shard_id, str(root), True, 4, schema, "jpg")
        for i, s in enumerate(samples):
            key = compute_key(i, shard_id, 5, 4)
            ok = s["image"] is not None
            w, h = Image.open(io.BytesIO(s["image"])).size if ok else (None, None)
            ow, oh = s.get("original_size", (w, h))
            meta = {"caption": s["caption"], "url": s["url"], "key": key,
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "HTTP Error 404: Not Found",
                    "width": w, "height": h, "original_width": ow if ok else None,
                    "original_height": oh if ok else None, "exif": "{}" if ok else None}
            writer.write(s["image"], key, s["caption"], meta)
        writer.close()
        (root / f"{shard_id:04d}.parquet").unlink()
        tars.append((root / f"{shard_id:04d}.tar").rename(root / f"cc12m-train-{shard_id:04d}.tar"))
    (root / "README.md").write_text("# cc12m-wds\n")
    (root / "_info.json").write_text(json.dumps({"splits": {"train": {"num_samples": sum(map(len, shards))}}}))
    return tars


def write_llava_captions(path: Path, rows: list[dict], gz: bool = True) -> Path:
    """CaptionEmporium's train.jsonl(.gz): one object per line, the card's fields in its order."""
    import gzip

    order = ("caption_llava", "caption_llava_short", "caption", "url", "key", "status")
    text = "".join(json.dumps({k: r[k] for k in order if k in r} | {k: v for k, v in r.items() if k not in order}) + "\n"
                   for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode(), mtime=0) if gz else text.encode())
    return path


def write_reference_metadata(path: Path, rows: list[dict]) -> Path:
    """The reference's prepare_cc12m_metadata.py output: success rows, `url, caption (= caption_llava),
    caption_llava_short, key`."""
    kept = [r for r in rows if r.get("status", "success") == "success"]
    return write_parquet(path, {"url": [r.get("url") for r in kept], "caption": [r["caption_llava"] for r in kept],
                                "caption_llava_short": [r["caption_llava_short"] for r in kept],
                                "key": [r["key"] for r in kept]})


# --- the finetune releases as downloaded ---------------------------------------------------------

BLIP3O_TARS = ("dalle3.tar", "geneval_train.tar", "human_gestures.tar", "journeyDB.tar", "mscoco_human.tar",
               "object_1.tar", "object_2.tar", "occupation_1.tar", "occupation_2.tar", "text_1.tar", "text_2.tar")


def write_dalle3_release(root: Path, rows: list[dict]) -> Path:
    """OpenDatasets/dalle-3-dataset: `data/train-000NN-of-00063-<hash>.parquet` with `image` as HF
    datasets' {bytes, path} struct, `caption`, `synthetic_caption`, `image_hash`; plus the card."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("# dalle-3-dataset\n")
    write_parquet(root / "data" / "train-00000-of-00063-6ccf42e2874ccd92.parquet", {
        "image": [r["image"] for r in rows], "caption": [r["caption"] for r in rows],
        "synthetic_caption": [r["synthetic_caption"] for r in rows],
        "image_hash": [hashlib.md5(r["image"] or b"").hexdigest() for r in rows],
    }, image_as_struct="image")
    return root


def write_sharegpt_release(root: Path, records: list[tuple[int, str, bytes | None]], parts: int = 2) -> Path:
    """FreedomIntelligence/ShareGPT-4o-Image as downloaded: `text_to_image.json` (a list of
    {input_prompt, output_image: "image/<n>.png", output_image_resolution}) and the images in
    `text_to_image_part_<i>.tar` as members `image/<n>.png` (dealt round-robin; None = the record's
    image is in no part), beside other files of the release that a reader must leave alone."""
    root.mkdir(parents=True, exist_ok=True)
    meta = [{"input_prompt": prompt, "output_image": f"image/{n}.png", "output_image_resolution": [1024, 1024]}
            for n, prompt, _ in records]
    (root / "text_to_image.json").write_text(json.dumps(meta, indent=2))
    members: list[list[tuple[str, bytes]]] = [[] for _ in range(parts)]
    for i, (n, _, png) in enumerate(records):
        if png is not None:
            members[i % parts].append((f"image/{n}.png", png))
    for i, m in enumerate(members):
        write_tar(root / f"text_to_image_part_{i}.tar", m)
    (root / "README.md").write_text("# ShareGPT-4o-Image\n")
    (root / ".gitattributes").write_text("*.tar filter=lfs\n")
    (root / "text_and_image_to_image.json").write_text("[]")
    write_tar(root / "text_and_image_to_image_part_0.tar", [("image/0.png", encode(smooth_image(99)))])
    return root
