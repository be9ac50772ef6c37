"""Tiny fixtures written in each release's real on-disk layout (shared by the reader and curate tests)."""

from __future__ import annotations

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
