"""One way to reach files on local disk and S3, through pyarrow's filesystems.

Dataset folders, manifests and checkpoints are addressed by URI: a local path or `s3://bucket/key`.
S3 credentials come only from the standard AWS chain (env, profile, instance role); an endpoint
override (MinIO, a loopback test server) comes from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`.
Nothing here ever records credentials.

Writes are atomic: local files are written to a temporary name and renamed; an S3 object is
written in one PutObject, visible whole or not at all, and leaves nothing behind when it fails
(pyarrow's S3 output stream always starts a multipart upload, even for 1 kB, and leaves it open
when the connection drops). A dataset is complete only once its manifest exists.

Every call here on S3 goes through boto3 with botocore's own retries off, under the one retry policy
(pipelines/retry.py): transient errors are retried with backoff for the policy's budget, each retry
line naming the stage, the operation, the object and the error. The pyarrow filesystem handed to
other libraries (Parquet readers, Ray Data, Ray Train's checkpoint uploads, Tune's experiment state)
retries inside the AWS SDK with as many attempts as the same budget allows.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import shutil
import threading
import uuid
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipelines import retry

_CHUNK = 8 << 20
_PUT_LIMIT = 5 << 30             # S3's single-PutObject limit; larger objects go multipart
_PART = 256 << 20                # multipart part size above it (at most 10,000 parts: 2.5 TB)
TEMP_MARK = ".tmp-"              # in the name of a local temporary file (never on S3: PUTs are whole)
_FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def sdk_attempts(policy: retry.RetryPolicy) -> int:
    """Attempts the AWS SDK's standard strategy needs to keep trying for the policy's budget: its waits
    are uniform in [0, min(20 s, 25 ms * 2**n)], so about 10 s each once past the first ten."""
    return 10 + int(policy.budget / 10)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with the AWS SDK retrying for the policy's budget. It keeps its retry
    strategy when pickled into a Ray worker (Ray Train uploads checkpoints from the workers with the
    filesystem the driver gave RunConfig); pyarrow 26 pickles S3FileSystem without it, back to 3 attempts."""

    def __init__(self, attempts: int, **kwargs: Any):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)
        self.attempts, self.kwargs = attempts, kwargs

    def __reduce__(self):
        return (_rebuild_s3, (self.attempts, self.kwargs))


def _rebuild_s3(attempts: int, kwargs: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(attempts, **kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = _endpoint()
    kwargs: dict[str, Any] = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs = {"endpoint_override": parsed.netloc or parsed.path, "scheme": parsed.scheme or "https"}
    region = _region()
    if region:
        kwargs["region"] = region
    return RetryingS3FileSystem(sdk_attempts(retry.policy()), **kwargs)


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def s3_client():
    """A boto3 S3 client with botocore's retries off (the policy retries), one per process and endpoint."""
    key = (os.getpid(), _endpoint(), _region())
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=10,
                            read_timeout=60, max_pool_connections=32)
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=key[1], region_name=key[2], config=config)
        return _clients[key]


def split_s3(uri: str) -> tuple[str, str]:
    """("bucket", "key") of s3://bucket/key."""
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    return bucket, key


def _status(err: Exception) -> int:
    return int(getattr(err, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _not_found(err: Exception) -> bool:
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
    return _status(err) == 404 or code in ("NoSuchKey", "404", "NotFound")


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
    """Whether a file (or, on S3, any object under the prefix uri/) exists."""
    if not is_s3(uri):
        fs, path = resolve(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    bucket, key = split_s3(uri)
    key = key.rstrip("/")
    client = s3_client()

    def probe() -> bool:
        if key:
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except Exception as err:  # noqa: BLE001 - 404 means "not a file"; the rest is retry's to judge
                if not _not_found(err):
                    raise
        listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
        return bool(listing.get("KeyCount"))

    return retry.call(probe, f"HEAD {uri}")


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        fs, path = resolve(uri)
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{uri} does not exist") from err
    bucket, key = split_s3(uri)
    client = s3_client()

    def get() -> bytes:
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()   # a cut body is retried whole
        except Exception as err:  # noqa: BLE001
            if _not_found(err):
                raise FileNotFoundError(f"{uri} does not exist") from err
            raise

    return retry.call(get, f"GET {uri}")


def _write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if err.errno in _FULL_DISK:
            free = shutil.disk_usage(os.path.dirname(path)).free
            raise OSError(err.errno, f"no space to write {path}: it needs {len(data):,} bytes and the disk has "
                                     f"{free:,} free (or a file-size limit is lower); nothing was changed there") from err
        raise
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _put_multipart(client, bucket: str, key: str, data: bytes) -> None:
    """An object over S3's PutObject limit, in parts; any failure aborts the upload (no debris)."""
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    try:
        parts = []
        for n, at in enumerate(range(0, len(data), _PART), start=1):
            body = data[at:at + _PART]
            part = retry.call(lambda: client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=n, Body=body),
                              f"PUT part {n} of s3://{bucket}/{key}")
            parts.append({"PartNumber": n, "ETag": part["ETag"]})
        retry.call(lambda: client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload,
                                                            MultipartUpload={"Parts": parts}),
                   f"COMPLETE s3://{bucket}/{key}")
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
        except Exception:  # noqa: BLE001 - the job's closing sweep (abort_uploads) removes it then
            pass
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically: readers see the old file, the new file, or nothing."""
    if not is_s3(uri):
        _write_local(resolve(uri)[1], data)
        return
    bucket, key = split_s3(uri)
    client = s3_client()
    if len(data) > _PUT_LIMIT:
        retry.call(lambda: _put_multipart(client, bucket, key, data), f"PUT s3://{bucket}/{key}")
        return
    # One request: the same bytes again are harmless when a dropped answer hid that it landed.
    retry.call(lambda: client.put_object(Bucket=bucket, Key=key, Body=data), f"PUT {uri} ({len(data):,} bytes)")


def _keys(uri: str, recursive: bool) -> list[str]:
    bucket, key = split_s3(uri)
    prefix = f"{key.rstrip('/')}/" if key.rstrip("/") else ""
    client = s3_client()

    def listing() -> list[str]:
        out, token = [], None
        while True:                                   # bounded by the listing's own end
            kwargs = {"Bucket": bucket, "Prefix": prefix, **({} if recursive else {"Delimiter": "/"})}
            page = client.list_objects_v2(**kwargs, **({"ContinuationToken": token} if token else {}))
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    return retry.call(listing, f"LIST {uri}")


def delete(uri: str) -> None:
    if not is_s3(uri):
        fs, path = resolve(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
        return
    bucket, key = split_s3(uri)
    client = s3_client()
    keys = [key] + _keys(uri, recursive=True) if key else _keys(uri, recursive=True)
    for at in range(0, len(keys), 1000):             # DeleteObjects takes 1000 keys; a missing key is no error
        batch = {"Objects": [{"Key": k} for k in keys[at:at + 1000]], "Quiet": True}
        retry.call(lambda: client.delete_objects(Bucket=bucket, Delete=batch), f"DELETE {uri}")


def list_files(uri: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted URIs of files under `uri` whose name ends with `suffix` (temp files excluded)."""
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        return sorted(f"s3://{bucket}/{k}" for k in _keys(uri, recursive)
                      if k.endswith(suffix) and TEMP_MARK not in posixpath.basename(k))
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    return sorted(info.path for info in infos
                  if info.type == pafs.FileType.File and info.path.endswith(suffix) and TEMP_MARK not in info.base_name)


def temp_files(uri: str) -> list[str]:
    """Temporary files a killed local write left under `uri` (S3 writes leave none)."""
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        return sorted(f"s3://{bucket}/{k}" for k in _keys(uri, True) if TEMP_MARK in posixpath.basename(k))
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if i.type == pafs.FileType.File and TEMP_MARK in i.base_name)


def open_uploads(uri: str) -> list[tuple[str, str]]:
    """(s3:// URI, upload id) of the multipart uploads started under `uri` and never completed."""
    if not is_s3(uri):
        return []
    bucket, key = split_s3(uri)
    prefix = f"{key.rstrip('/')}/" if key.rstrip("/") else ""
    client = s3_client()

    def listing() -> list[tuple[str, str]]:
        out, marker = [], {}
        while True:                                   # bounded by the listing's own end
            page = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix, **marker)
            out += [(f"s3://{bucket}/{u['Key']}", u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return out
            marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    return retry.call(listing, f"LIST uploads {uri}")


def abort_uploads(uri: str) -> list[str]:
    """Abort the unfinished multipart uploads under a job's own prefix `uri` (call once the job's writes
    are done: an upload in flight would be cut). Returns the keys whose uploads were aborted."""
    if not is_s3(uri):
        return []                                 # a local folder has no uploads (and needs no boto3)
    client = s3_client()
    aborted = []
    for target, upload in open_uploads(uri):
        bucket, key = split_s3(target)
        retry.call(lambda: client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload), f"ABORT {target}")
        aborted.append(target)
    return aborted


def relpath(uri: str, root: str) -> str:
    """Path of `uri` relative to dataset folder `root` (both local or both s3://)."""
    uri, root = str(uri), str(root).rstrip("/")
    if is_s3(uri):
        return uri[len(root) + 1:]
    return os.path.relpath(uri, root)


def file_digest(uri: str) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, streamed (on S3 a cut stream starts the hash again)."""

    def digest(stream) -> tuple[str, int]:
        h = hashlib.sha256()
        size = 0
        while chunk := stream.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        return h.hexdigest(), size

    if not is_s3(uri):
        fs, path = resolve(uri)
        with fs.open_input_stream(path) as f:
            return digest(f)
    bucket, key = split_s3(uri)
    client = s3_client()

    def get() -> tuple[str, int]:
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as err:  # noqa: BLE001
            if _not_found(err):
                raise FileNotFoundError(f"{uri} does not exist") from err
            raise
        with body:
            return digest(body)

    return retry.call(get, f"GET {uri}")
