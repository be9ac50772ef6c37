"""The CC12M WebDataset mirror (pixparse/cc12m-wds): its tar shards, read through `webdataset`.

Layout (as img2dataset's WebDataset writer makes it, `img2dataset/writer.py`
WebDatasetSampleWriter, whose `wds.TarWriter` writes a sample's members in sorted order):
`cc12m-train-0000.tar` ... `cc12m-train-2175.tar`, each a run of samples

    <key>.jpg    the image, shortest edge resized to 512 when it was larger (the mirror's card)
    <key>.json   img2dataset's row metadata: caption, url, key, status, error_message, width,
                 height, original_width, original_height, exif (and sha256 of the download when
                 the run computed one)
    <key>.txt    the alt text (img2dataset's save_caption)

where `<key>` is img2dataset's 9-digit `compute_key` (shard id x 10^5 + position). Only successful
downloads are in the tars. The CaptionEmporium LLaVA-NeXT captions were made from this mirror, so
their `key` and `url` name the same samples.

A source spec is a brace pattern (`SRC/cc12m-train-{0000..2175}.tar`, webdataset's own notation,
expanded by its `braceexpand` dependency), a folder or `s3://` prefix (every `*.tar` directly in
it, by name; other files such as the card or `_info.json` are ignored), or one tar.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow.fs as pafs

from pipelines import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode formats, in preference order


@dataclass(frozen=True)
class Tar:
    uri: str
    size: int

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri)


def _listing(folder: str) -> dict[str, int]:
    """uri -> size of the files directly in `folder` (local or s3://), one listing call."""
    fs, path = storage.resolve(folder)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return {}
    prefix = "s3://" if storage.is_s3(folder) else ""
    return {prefix + i.path: i.size for i in fs.get_file_info(pafs.FileSelector(path))
            if i.type == pafs.FileType.File}


def list_tars(spec: str) -> list[Tar]:
    """The tars a source spec names, in order (brace order, else by name); missing ones are an error."""
    import braceexpand

    spec = str(spec).strip()
    if not spec:
        raise ValueError("wds: empty source spec; give a brace pattern, a folder/s3:// prefix or a .tar")
    if "{" in spec:
        uris = list(braceexpand.braceexpand(spec))
        listings: dict[str, dict[str, int]] = {}
        tars, missing = [], []
        for uri in uris:
            parent = uri.rsplit("/", 1)[0] if "/" in uri else "."
            listing = listings.setdefault(parent, _listing(parent))
            key = uri if storage.is_s3(uri) else storage.resolve(uri)[1]
            if key in listing:
                tars.append(Tar(uri, listing[key]))
            else:
                missing.append(uri)
        if missing:
            raise FileNotFoundError(f"wds: {len(missing)} of the {len(uris)} tars {spec} names do not exist "
                                    f"(first: {missing[0]}); narrow the pattern to the tars you have")
        return tars
    fs, path = storage.resolve(spec)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [Tar(spec, info.size)]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"wds: {spec} does not exist")
    tars = [Tar(uri if storage.is_s3(spec) else storage.join(spec, posixpath.basename(uri)), size)
            for uri, size in sorted(_listing(spec).items()) if uri.endswith(".tar")]
    if not tars:
        raise ValueError(f"wds: no .tar files directly in {spec}")
    return tars


class _HashingStream:
    """A read-only stream that hashes what passes through it; named by its file name, so the
    messages webdataset builds from it (`... @ <stream>`) are the same wherever the tar lives."""

    def __init__(self, uri: str):
        fs, path = storage.resolve(uri)
        self.uri, self._f = uri, fs.open_input_stream(path)
        self.sha256, self.bytes = hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n) if n is not None and n >= 0 else self._f.read()
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(8 << 20):
            pass

    def close(self) -> None:
        self._f.close()

    def __repr__(self) -> str:
        return posixpath.basename(self.uri)


@dataclass
class Sample:
    key: str
    image: bytes | None            # the first member with an IMAGE_EXTS extension
    image_member: str | None       # its member name
    text: str | None               # <key>.txt (alt text)
    meta: dict[str, Any] | None    # <key>.json; None when absent or unreadable
    members: list[str] = field(default_factory=list)
    problem: str | None = None     # what is wrong with the sample's members, if anything


@dataclass
class TarRead:
    """The outcome of reading one tar: its digest and, when it is damaged, where reading stopped."""

    sha256: str = ""
    bytes: int = 0
    error: str | None = None         # the tar-level error (truncated, not a tar), or None
    broken_key: str | None = None    # the sample whose member it broke inside, when it broke inside one


def _sample(raw: dict[str, Any], tar: str) -> Sample:
    key = raw["__key__"]
    members = sorted(f"{key}.{ext}" for ext in raw if not ext.startswith("__"))
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    problems = []
    meta = None
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        except ValueError as err:
            meta = None
            problems.append(f"{tar}: {key}.json unreadable ({str(err).splitlines()[0][:80]})")
    text = raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else None
    if ext is None:
        problems.insert(0, f"{tar}: sample {key} has no image member ({key}.jpg); members: {', '.join(members)}")
    return Sample(key, raw[ext] if ext else None, f"{key}.{ext}" if ext else None, text, meta, members,
                  "; ".join(problems) or None)


def read_tar(uri: str, outcome: TarRead) -> Iterator[Sample]:
    """Samples of one tar in archive order (webdataset's tar iteration and key grouping).

    A damaged tar (truncated, or not a tar) ends the iteration instead of raising: `outcome` then
    says what happened and which sample was being read, and its digest still covers every byte.
    """
    from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

    name = posixpath.basename(uri)
    stream = _HashingStream(uri)
    errors: list[Exception] = []
    seen: list[str] = []   # the member whose data is being read
    done: list[str] = []   # the last member read whole

    def stop(exn: Exception) -> bool:  # webdataset handler: record the first error, stop reading
        errors.append(exn)
        return False

    def select(fname: str) -> bool:  # called before a member's data is read: remembers where we are
        seen[:] = [fname]
        return True

    def read_whole(files):
        for f in files:
            if f:
                done[:] = [f["fname"]]
            yield f

    try:
        files = tar_file_expander([{"url": uri, "stream": stream}], handler=stop, select_files=select)
        for raw in group_by_keys(read_whole(files), handler=stop):
            yield _sample(raw, name)
        if errors:
            exn = errors[0]
            outcome.error = f"{name}: {type(exn).__name__}: {str(exn.args[0]) if exn.args else exn}"[:300]
            if seen and seen != done:  # it broke inside this member
                outcome.broken_key = base_plus_ext(seen[0])[0]
        try:
            stream.drain()
        except OSError:
            pass
    finally:
        stream.close()
    outcome.sha256, outcome.bytes = stream.sha256.hexdigest(), stream.bytes
