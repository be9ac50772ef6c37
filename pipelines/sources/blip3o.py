"""BLIP3o-60K: GPT-4o-distilled images with their prompts, as WebDataset tar shards.

Layout (huggingface.co/datasets/BLIP3o/BLIP3o-60k): eleven tars named by category, RELEASE_TARS
(the list the reference's `scripts/datasets/download_blip3o_60k.py` and `utils/data_util.py`
expect; mirrors may use `<category>/shards-00000.tar`). A sample is a run of consecutive members
sharing a key, `{key}.jpg|png` + `{key}.txt` (WebDataset's convention: the key is the member path
up to the first dot of its file name). Every row is tagged with its tar (origin); a sample without
an image member is a row without an image whose note names the members it has.

`geneval_train.tar` holds prompts written from GenEval's own templates and object classes (the
reason it exists is to teach the GenEval skills), so curate's contamination report flags it by
name (FLAGGED) whatever the n-gram check finds.
"""

from __future__ import annotations

import itertools
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipelines.sources import ALIASES, ReadUnit, expand, iter_tar, pick, row

SOURCE = "blip3o"
PROBE_MEMBERS = 64  # members looked at to recognise the layout before the job starts
RELEASE_TARS = ("dalle3.tar", "geneval_train.tar", "human_gestures.tar", "journeyDB.tar", "mscoco_human.tar",
                "object_1.tar", "object_2.tar", "occupation_1.tar", "occupation_2.tar", "text_1.tar", "text_2.tar")
FLAGGED = {"geneval_train.tar": "BLIP3o-60K's GenEval training split: prompts from GenEval's templates and classes"}


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


def release_report(units: list[ReadUnit]) -> dict[str, list[str]]:
    """Which of the release's eleven tars were given, which not, and which other tars were read."""
    names = {posixpath.basename(u.origin) for u in units if u.source == SOURCE}
    return {"missing": [t for t in RELEASE_TARS if t not in names],
            "other": sorted(u.origin for u in units if u.source == SOURCE and posixpath.basename(u.origin) not in RELEASE_TARS)}


def read(unit: ReadUnit) -> Iterator[dict[str, Any]]:
    image_exts, caption_exts = ALIASES[SOURCE]["image"], ALIASES[SOURCE]["caption"]
    for pos, (key, parts) in enumerate(_samples(unit)):
        image = next((parts[e] for e in image_exts if e in parts), None)
        text = next((parts[e] for e in caption_exts if e in parts), None)
        caption = text.decode("utf-8", errors="replace") if text is not None else None
        note = None
        if image is None:
            note = (f"{unit.origin}: sample {key} has no image member ({key}.jpg); "
                    f"members: {', '.join(f'{key}.{e}' for e in sorted(parts))}")
        yield row(unit, key, pos, image, caption, note=note)
