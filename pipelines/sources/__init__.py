"""Readers for the finetune set's three public releases, into one row schema.

Every reader turns a release's raw layout into rows of the same shape:

    key      str          the release's own id for the sample (tar key, image path, row index)
    source   str          "blip3o", "dalle3" or "sharegpt4o"
    origin   str          the file the row came from (e.g. "geneval_train.tar"), relative to the
                          folder the user named, so it does not change when the data moves
    pos      int          position of the row inside `origin` (sample, row or member index)
    image    bytes|None   the encoded image as stored in the release
    caption  str|None     the prompt/caption text
    url      str|None     the image URL, for releases that ship URLs instead of bytes
    caption_from str|None the release field the caption came from when it is a fallback
                          (DALL-E 3's `synthetic_caption` where `caption` is empty), else None
    note     str|None     what is missing, naming the member or field (a sample without its image)

A release is read in *read units*, one per file (or per group of byte-split tar parts); a unit is
the grain of parallelism and `(source, origin, pos)` orders rows deterministically.

Field, column and extension names differ between releases and between versions of one release;
they are mapped in one place, `ALIASES`, and `pick` fails with the file and the names it looked for.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines import storage

# The one place where release-specific names live. The first name present wins, so the order is a
# preference: e.g. a DALL-E 3 parquet with both `caption` and `text` reads `caption`.
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    # BLIP3o-60K: WebDataset tar members `{key}.{ext}` (webdataset's own convention).
    "blip3o": {
        "image": ("jpg", "jpeg", "png", "webp"),
        "caption": ("txt", "caption", "prompt"),
    },
    # LAION DALL-E 3 parquet releases; also reads `minit2i fetch` output (image + alt_text/caption).
    "dalle3": {
        "image": ("image", "jpg", "png", "image_bytes"),
        "caption": ("caption", "prompt", "text", "revised_prompt", "alt_text"),
        "url": ("url", "link", "image_url"),
        # OpenDatasets/dalle-3-dataset: used per row where `caption` is empty, as the reference does.
        "fallback_caption": ("synthetic_caption",),
    },
    # ShareGPT-4o-Image text_to_image.json records.
    "sharegpt4o": {
        "caption": ("input_prompt", "prompt", "text", "caption"),
        "image": ("output_image", "image", "image_path", "output_image_path"),
        "member": ("png", "jpg", "jpeg", "webp"),  # image members of the tar parts
    },
}

SOURCES = ("blip3o", "dalle3", "sharegpt4o")

ROW_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),
    ("origin", pa.string()),
    ("pos", pa.int64()),
    ("image", pa.binary()),
    ("caption", pa.string()),
    ("url", pa.string()),
    ("caption_from", pa.string()),
    ("note", pa.string()),
])


@dataclass
class ReadUnit:
    """One file (or one byte-split archive) of a release: what a single read task reads."""

    source: str
    origin: str                                  # stable name, relative to the folder given
    uris: list[str] = field(default_factory=list)  # >1 only for byte-split tar parts, read in order
    metadata: str = ""                           # ShareGPT-4o: the JSON the images belong to

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReadUnit":
        return cls(source=d["source"], origin=d["origin"], uris=list(d["uris"]), metadata=d.get("metadata") or "")


def pick(available, source: str, role: str, where: str, required: bool = True) -> str | None:
    """The release's name for `role` (e.g. the caption column) among `available`, by ALIASES."""
    names = ALIASES[source][role]
    have = set(available)
    for name in names:
        if name in have:
            return name
    if required:
        raise ValueError(
            f"{where}: unknown {source} layout: no {role} column/field (looked for {', '.join(names)}; "
            f"found {', '.join(sorted(map(str, have))) or 'nothing'}). Add the new name to "
            f"pipelines/sources ALIASES[{source!r}][{role!r}] if this is a new release."
        )
    return None


def expand(paths: list[str], suffixes: tuple[str, ...], what: str) -> list[tuple[str, str]]:
    """(uri, origin) for every file under `paths` (files or folders) whose name ends with a suffix.

    origin is the path relative to the folder named (or the file name for a file named directly).
    Sorted by origin; two files with the same origin are an error, since origin identifies rows.
    """
    found: dict[str, str] = {}
    for path in paths:
        fs, inner = storage.resolve(path)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{what}: {path} does not exist")
        if info.type == pafs.FileType.Directory:
            files = [u for u in storage.list_files(path, recursive=True) if not suffixes or u.endswith(suffixes)]
            if not files:
                kinds = "/".join(suffixes) + " " if suffixes else ""
                raise ValueError(f"{what}: no {kinds}files under {path}")
            pairs = [(u, storage.relpath(u, path).replace("\\", "/")) for u in files]
        else:
            pairs = [(path, posixpath.basename(inner))]
        for uri, origin in pairs:
            if origin in found and found[origin] != uri:
                raise ValueError(f"{what}: {uri} and {found[origin]} both map to origin {origin!r}; name distinct folders")
            found[origin] = uri
    return sorted(((u, o) for o, u in found.items()), key=lambda p: p[1])


class _ConcatStream:
    """Reads several files as one stream (byte-split archive parts `x.tar.gz.part_aa`, `_ab`, ...)."""

    def __init__(self, uris: list[str]):
        self._uris = list(uris)
        self._f = None

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if self._f is None:
                if not self._uris:
                    break
                fs, path = storage.resolve(self._uris.pop(0))
                self._f = fs.open_input_stream(path)
            chunk = self._f.read(-1 if n < 0 else n - len(out))
            if not chunk:
                self._f.close()
                self._f = None
                continue
            out += chunk
        return bytes(out)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._uris = []


def iter_tar(uris: list[str], where: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every regular file, in archive order.

    The stdlib `tarfile` in stream mode ("r|*") is used rather than webdataset's readers: it reads
    the archive strictly in order (so positions are deterministic), needs no seeking (so S3 streams
    and byte-split parts work), handles gzip transparently, and adds no dependency.
    """
    import tarfile

    stream = _ConcatStream(uris)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                name = name.lstrip("/")
                base = posixpath.basename(name)
                if base.startswith("._"):  # macOS AppleDouble metadata, not a sample
                    continue
                f = tar.extractfile(member)
                yield name, (f.read() if f is not None else b"")
    except tarfile.TarError as err:
        raise ValueError(f"{where}: not a readable tar archive: {err}") from err
    finally:
        stream.close()


_PART = re.compile(r"[._-]?part[._-]?[a-z0-9]+$", re.IGNORECASE)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def group_archive_parts(pairs: list[tuple[str, str]], what: str) -> list[tuple[str, list[str]]]:
    """(origin, uris) per archive: whole `.tar`/`.tar.gz` files alone, byte-split parts joined in name order."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for uri, origin in pairs:
        if origin.endswith(ARCHIVE_SUFFIXES):
            groups.setdefault(origin, []).append((origin, uri))
            continue
        stem = _PART.sub("", origin)
        if stem == origin:
            raise ValueError(
                f"{what}: {uri} is neither a tar archive ({', '.join(ARCHIVE_SUFFIXES)}) nor a "
                f"byte-split part (name ending in part_aa, .partab, ...)"
            )
        groups.setdefault(stem, []).append((origin, uri))
    return [(stem, [u for _, u in sorted(members)]) for stem, members in sorted(groups.items())]


def read_unit(unit: ReadUnit) -> Iterator[dict[str, Any]]:
    """Rows of one read unit in their stored order (see the module docstring for the row shape)."""
    from pipelines.sources import blip3o, dalle3, sharegpt4o

    readers = {"blip3o": blip3o.read, "dalle3": dalle3.read, "sharegpt4o": sharegpt4o.read}
    if unit.source not in readers:
        raise ValueError(f"unknown source {unit.source!r}; expected one of {', '.join(SOURCES)}")
    yield from readers[unit.source](unit)


def row(unit: ReadUnit, key: str, pos: int, image: bytes | None, caption: str | None, url: str | None = None,
        caption_from: str | None = None, note: str | None = None) -> dict[str, Any]:
    return {"key": key, "source": unit.source, "origin": unit.origin, "pos": pos,
            "image": image, "caption": caption, "url": url, "caption_from": caption_from, "note": note}
