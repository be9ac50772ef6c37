"""The fault proxy itself: S3 clients work through it, and each fault does what it says."""

from __future__ import annotations

import time

import boto3
import pytest
from botocore.config import Config

from tests.fault_proxy import FaultProxy


@pytest.fixture()
def proxy(s3_server):
    with FaultProxy(s3_server) as p:
        yield p


def _client(url: str):
    return boto3.client("s3", endpoint_url=url, config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                                               connect_timeout=5, read_timeout=10))


def test_clients_work_through_the_proxy(proxy, s3_server):
    import pyarrow.fs as pafs

    s3 = _client(proxy.url)
    s3.put_object(Bucket="test-bucket", Key="proxy/a.bin", Body=b"x" * 100_000)
    assert s3.get_object(Bucket="test-bucket", Key="proxy/a.bin")["Body"].read() == b"x" * 100_000
    assert s3.head_object(Bucket="test-bucket", Key="proxy/a.bin")["ContentLength"] == 100_000
    fs = pafs.S3FileSystem(endpoint_override=proxy.url.removeprefix("http://"), scheme="http", region="us-east-1")
    with fs.open_output_stream("test-bucket/proxy/b.bin") as f:
        f.write(b"y" * 12_000_000)                     # pyarrow: a multipart upload
    assert fs.get_file_info("test-bucket/proxy/b.bin").size == 12_000_000
    assert proxy.counters.requests >= 5 and proxy.counters.outage_answers == 0


def test_outage_answers_slow_down_then_ends(proxy):
    s3 = _client(proxy.url)
    proxy.outage(1.5)
    with pytest.raises(Exception) as err:
        s3.put_object(Bucket="test-bucket", Key="proxy/c.bin", Body=b"z")
    assert "SlowDown" in str(err.value) or "503" in str(err.value)
    assert proxy.counters.outage_answers == 1
    deadline = time.monotonic() + 5
    while proxy.in_outage and time.monotonic() < deadline:
        time.sleep(0.1)
    s3.put_object(Bucket="test-bucket", Key="proxy/c.bin", Body=b"z")
    assert _client(proxy.url).get_object(Bucket="test-bucket", Key="proxy/c.bin")["Body"].read() == b"z"


def test_a_dropped_write_lands_but_the_client_sees_an_error(proxy, s3_server):
    s3 = _client(proxy.url)
    proxy.drop_writes(1.0)
    with pytest.raises(Exception):
        s3.put_object(Bucket="test-bucket", Key="proxy/d.bin", Body=b"applied")
    assert proxy.counters.dropped_writes == 1
    direct = _client(s3_server)
    assert direct.get_object(Bucket="test-bucket", Key="proxy/d.bin")["Body"].read() == b"applied"
