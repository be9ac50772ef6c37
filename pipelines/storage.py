"""One way to reach files on local disk and S3, through pyarrow's filesystems.

Dataset folders, manifests and checkpoints are addressed by URI: a local path or `s3://bucket/key`.
S3 credentials come only from the standard AWS chain (env, profile, instance role); an endpoint
override (MinIO, a loopback test server) comes from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`.
Nothing here ever records credentials.

Writes are atomic: local files are written to a temporary name and renamed; an S3 PUT makes the
object visible whole or not at all. A dataset is complete only once its manifest exists.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

_CHUNK = 8 << 20


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs = {"endpoint_override": parsed.netloc or parsed.path, "scheme": parsed.scheme or "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://"):].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{uri} does not exist") from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically: readers see the old file, the new file, or nothing."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    with fs.open_output_stream(path) as f:  # one PUT (or multipart completed at close): atomic
        f.write(data)


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted URIs of files under `uri` whose name ends with `suffix` (temp files excluded)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    prefix = "s3://" if is_s3(uri) else ""
    out = [
        prefix + info.path
        for info in infos
        if info.type == pafs.FileType.File and info.path.endswith(suffix) and ".tmp-" not in info.base_name
    ]
    return sorted(out)


def relpath(uri: str, root: str) -> str:
    """Path of `uri` relative to dataset folder `root` (both local or both s3://)."""
    uri, root = str(uri), str(root).rstrip("/")
    if is_s3(uri):
        return uri[len(root) + 1:]
    return os.path.relpath(uri, root)


def file_digest(uri: str) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, streamed."""
    fs, path = resolve(uri)
    h = hashlib.sha256()
    size = 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
