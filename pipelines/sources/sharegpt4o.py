"""ShareGPT-4o-Image (text-to-image part): JSON metadata pointing into tar archives of PNGs.

Layout (huggingface.co/datasets/FreedomIntelligence/ShareGPT-4o-Image, as the reference's
`scripts/datasets/prepare_sharegpt4o_webdataset.py` reads it): `text_to_image.json`, a list of
records `{"input_prompt": ..., "output_image": "image/<n>.png", "output_image_resolution": ...}`,
and the images in `text_to_image_part_<i>.tar` as members `image/<n>.png`. `folder` takes the
download folder as it is and reads exactly those files (the card, the editing subset and anything
else beside them are left alone). `metadata` + `images` name other layouts: JSON Lines metadata,
whole `.tar`/`.tar.gz` archives or byte-split parts (`*.tar.gz.part_aa`, `_ab`, ... joined in name
order). A row's key is the image path as the metadata writes it; its origin is the archive that
held the image. Records whose image is in no archive are reported by `missing`, naming the member
(the driver counts them as `image_missing`). Prompts over 256 T5 tokens are dropped by curate's
caption filter, as the reference drops them.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipelines import storage
from pipelines.sources import ALIASES, ReadUnit, expand, group_archive_parts, iter_tar, pick, row

SOURCE = "sharegpt4o"
METADATA_NAME = "text_to_image.json"
PART = re.compile(r"text_to_image_part_\d+\.tar")  # the release's image archives


@dataclass
class ShareGPT4oConfig:
    folder: str = ""                                 # the download folder as is (text_to_image.json + parts)
    metadata: str = ""                               # or: text_to_image.json (or .jsonl); "" = not used
    images: list[str] = field(default_factory=list)  # and: image tar archives / parts, or folders of them
    weight: float = 0.04                             # mix weight (MiniT2I finetune recipe)


def metadata_uri(cfg: ShareGPT4oConfig) -> str:
    return storage.join(cfg.folder, METADATA_NAME) if cfg.folder else cfg.metadata


def normalise_path(path: str) -> str:
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return posixpath.normpath(path.lstrip("/"))


def load_metadata(uri: str) -> dict[str, str]:
    """image path (normalised) -> caption, in file order. Fails naming the file and the field.

    A path listed twice keeps its last caption (the image is one row either way)."""
    text = storage.read_bytes(uri).decode("utf-8")
    try:
        if uri.endswith(".jsonl"):
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{uri}: not valid JSON: {err}") from err
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{uri}: expected a list of records (objects), got {type(records).__name__}")
    out: dict[str, str] = {}
    if not records:
        return out
    caption_field = pick(records[0].keys(), SOURCE, "caption", uri)
    image_field = pick(records[0].keys(), SOURCE, "image", uri)
    for i, record in enumerate(records):
        if caption_field not in record or image_field not in record:
            missing = caption_field if caption_field not in record else image_field
            raise ValueError(f"{uri}: record {i} has no {missing!r} field")
        image = record[image_field]
        if isinstance(image, list):  # some dumps keep a one-element list of output images
            if len(image) != 1:
                raise ValueError(f"{uri}: record {i} field {image_field!r} lists {len(image)} images; expected one")
            image = image[0]
        out[normalise_path(str(image))] = record[caption_field]
    return out


def _folder_units(cfg: ShareGPT4oConfig) -> list[ReadUnit]:
    if cfg.metadata or cfg.images:
        raise ValueError(f"sources.{SOURCE}: give folder, or metadata + images, not both")
    meta = metadata_uri(cfg)
    if not storage.exists(meta):
        raise FileNotFoundError(f"sources.{SOURCE}.folder: {cfg.folder} has no {METADATA_NAME}")
    parts = [u for u in storage.list_files(cfg.folder) if PART.fullmatch(posixpath.basename(u))]
    if not parts:
        raise ValueError(f"sources.{SOURCE}.folder: no text_to_image_part_<i>.tar in {cfg.folder}")
    parts.sort(key=lambda u: int(re.findall(r"\d+", posixpath.basename(u))[-1]))
    return [ReadUnit(SOURCE, posixpath.basename(u), [u], metadata=meta) for u in parts]


def units(cfg: ShareGPT4oConfig) -> list[ReadUnit]:
    if cfg.folder:
        return _folder_units(cfg)
    if not cfg.metadata:
        if cfg.images:
            raise ValueError(f"sources.{SOURCE}.images is set but sources.{SOURCE}.metadata is empty")
        return []
    if not cfg.images:
        raise ValueError(f"sources.{SOURCE}.metadata is set but sources.{SOURCE}.images (the tar parts) is empty")
    if not storage.exists(cfg.metadata):
        raise FileNotFoundError(f"sources.{SOURCE}.metadata: {cfg.metadata} does not exist")
    pairs = expand(list(cfg.images), (), f"sources.{SOURCE}.images")
    groups = group_archive_parts(pairs, f"sources.{SOURCE}.images")
    return [ReadUnit(SOURCE, origin, uris, metadata=cfg.metadata) for origin, uris in groups]


def probe(unit: ReadUnit) -> None:
    load_metadata(unit.metadata)


def _match(name: str, index: dict[str, str]) -> str | None:
    """The metadata path a tar member stands for: the member path or its shortest matching suffix."""
    parts = normalise_path(name).split("/")
    for i in range(len(parts)):
        candidate = "/".join(parts[i:])
        if candidate in index:
            return candidate
    return None


def read(unit: ReadUnit) -> Iterator[dict[str, Any]]:
    index = load_metadata(unit.metadata)
    exts = tuple("." + e for e in ALIASES[SOURCE]["member"])
    pos = 0
    for name, data in iter_tar(unit.uris, unit.uris[0]):
        if not name.lower().endswith(exts):
            continue
        key = _match(name, index)
        if key is None:  # an image the text-to-image metadata does not describe (e.g. an edit input)
            continue
        yield row(unit, key, pos, data, index[key])
        pos += 1


def missing(cfg: ShareGPT4oConfig, found: set[str]) -> list[dict[str, Any]]:
    """Rows for metadata records whose image was in none of the archives (origin: the metadata
    file), each with a note naming the member."""
    metadata = metadata_uri(cfg)
    index = load_metadata(metadata)
    unit = ReadUnit(SOURCE, posixpath.basename(storage.resolve(metadata)[1]), [metadata])
    where = "text_to_image_part_*.tar" if cfg.folder else f"sources.{SOURCE}.images"
    return [row(unit, key, pos, None, caption, note=f"{key}: in no archive of {where}")
            for pos, (key, caption) in enumerate(index.items()) if key not in found]
