"""BLIP3o-60K: GPT-4o-distilled images with their prompts, as WebDataset tar shards.

Layout (huggingface.co/datasets/BLIP3o/BLIP3o-60k): `*.tar` files, some named by category
(`geneval_train.tar`; mirrors use `<category>/shards-00000.tar`). A sample is a run of consecutive
members sharing a key, `{key}.jpg|png` + `{key}.txt` (WebDataset's convention: the key is the
member path up to the first dot of its file name). Every row is tagged with its tar (origin).
"""

from __future__ import annotations

import itertools
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipelines.sources import ALIASES, ReadUnit, expand, iter_tar, pick, row

SOURCE = "blip3o"
PROBE_MEMBERS = 64  # members looked at to recognise the layout before the job starts


@dataclass
class Blip3oConfig:
    paths: list[str] = field(default_factory=list)  # .tar files or folders holding them; [] = not used
    weight: float = 0.06                            # mix weight (MiniT2I finetune recipe)


def units(cfg: Blip3oConfig) -> list[ReadUnit]:
    pairs = expand(list(cfg.paths), (".tar",), f"sources.{SOURCE}.paths")
    return [ReadUnit(SOURCE, origin, [uri]) for uri, origin in pairs]


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension) of a member name: `a/b/000.seg.png` -> (`a/b/000`, `seg.png`)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def probe(unit: ReadUnit) -> None:
    """Fail early, naming the tar, when its first members are not image + caption samples."""
    members = list(itertools.islice(iter_tar(unit.uris, unit.uris[0]), PROBE_MEMBERS))
    if not members:
        return  # an empty tar holds no rows; nothing to recognise
    exts = {split_key(name)[1] for name, _ in members}
    pick(exts, SOURCE, "image", unit.uris[0])
    pick(exts, SOURCE, "caption", unit.uris[0])


def _samples(unit: ReadUnit) -> Iterator[tuple[str, dict[str, bytes]]]:
    key, parts = None, {}
    for name, data in iter_tar(unit.uris, unit.uris[0]):
        k, ext = split_key(name)
        if k != key and key is not None:
            yield key, parts
            parts = {}
        key = k
        parts[ext] = data
    if key is not None:
        yield key, parts


def read(unit: ReadUnit) -> Iterator[dict[str, Any]]:
    image_exts, caption_exts = ALIASES[SOURCE]["image"], ALIASES[SOURCE]["caption"]
    for pos, (key, parts) in enumerate(_samples(unit)):
        image = next((parts[e] for e in image_exts if e in parts), None)
        text = next((parts[e] for e in caption_exts if e in parts), None)
        caption = text.decode("utf-8", errors="replace") if text is not None else None
        yield row(unit, key, pos, image, caption)
