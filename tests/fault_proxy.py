"""A fault-injecting reverse proxy for the loopback S3 server: outages, dropped writes, latency.

Cloud storage fails in a few ways that matter to a data job: a throttling or outage window where
every request gets 503 SlowDown (or 500), a connection that drops after the server applied a write
but before the client saw the answer, and slow answers. `FaultProxy` stands between boto3/pyarrow
and moto's server on 127.0.0.1 and injects exactly those, on command, so the tests of every stage
that writes to S3 can check what survives.

Written by hand: toxiproxy needs its Go server and works on TCP only (it cannot answer 503 with an
S3 error body), and mitmproxy's reverse mode runs as a separate asyncio application; what is needed
here is ~150 lines of HTTP/1.1 relaying with three switches.

Every socket is on 127.0.0.1. Each client request is relayed on a fresh upstream connection, the
request body byte for byte (Content-Length or chunked, as boto3's aws-chunked uploads send it).
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>")
INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
            b"<Message>We encountered an internal error. Please try again.</Message>"
            b"<RequestId>fault-proxy</RequestId></Error>")


@dataclass
class Faults:
    """What the proxy does to the next requests (guarded by FaultProxy.lock)."""
    outage_until: float = 0.0        # monotonic time until which every request gets `outage_status`
    outage_status: int = 503         # 503 SlowDown or 500 InternalError
    drop_share: float = 0.0          # share of writes (PUT/POST) cut after the server applied them
    latency: float = 0.0             # seconds added before relaying each request
    armed: tuple[str, str, float] | None = None   # (method, path substring, seconds): the outage such a request starts
    rng: random.Random = field(default_factory=lambda: random.Random(0))


@dataclass
class Counters:
    requests: int = 0
    outage_answers: int = 0
    dropped_writes: int = 0
    outage_started: float = 0.0      # monotonic time an armed outage (`outage_on`) began
    outage_ended: float = 0.0        # ... and the time it ended (or will end)
    methods: dict[str, int] = field(default_factory=dict)


class FaultProxy:
    """`with FaultProxy("http://127.0.0.1:PORT") as proxy:` -> proxy.url is the endpoint to use."""

    def __init__(self, upstream: str, host: str = "127.0.0.1"):
        parsed = urlparse(upstream)
        if parsed.hostname is None or not parsed.hostname.startswith("127."):
            raise ValueError(f"fault proxy upstream {upstream!r} must be a loopback http URL")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.faults = Faults()
        self.counters = Counters()
        self.lock = threading.Lock()
        proxy = self

        class Handler(_RelayHandler):
            owner = proxy

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    # -- switches ----------------------------------------------------------------------------

    def outage(self, seconds: float, status: int = 503) -> None:
        """Answer every request with `status` (S3 error body) for the next `seconds`."""
        with self.lock:
            self.faults.outage_until = time.monotonic() + seconds
            self.faults.outage_status = status

    def outage_on(self, path_part: str, seconds: float, status: int = 503, method: str = "PUT") -> None:
        """Start an outage of `seconds` at the first `method` request whose path contains `path_part`
        (that request already gets `status`): an outage that lands at a chosen step of a job."""
        with self.lock:
            self.faults.armed = (method, path_part, seconds)
            self.faults.outage_status = status

    def drop_writes(self, share: float, seed: int = 0) -> None:
        """Relay `share` of PUT/POST requests to the server, then cut the client's connection before
        it sees the answer: the write happened, the client cannot know."""
        with self.lock:
            self.faults.drop_share = share
            self.faults.rng = random.Random(seed)

    def delay(self, seconds: float) -> None:
        with self.lock:
            self.faults.latency = seconds

    def clear(self) -> None:
        with self.lock:
            self.faults = Faults()

    def recovery(self, stage: str) -> str:
        """A line for the test's output: the armed outage a stage rode out and how long after its
        end the stage finished (call it as the stage returns)."""
        c = self.counters
        return (f"{stage}: rode out {c.outage_ended - c.outage_started:.0f}s of outage; "
                f"done {time.monotonic() - c.outage_ended:.1f}s after it ended")

    @property
    def in_outage(self) -> bool:
        return time.monotonic() < self.faults.outage_until

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, *args) -> None:  # quiet: the tests print what matters
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:                      # trailers up to the blank line
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)     # chunk data + CRLF
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        proxy = self.owner
        body = self._read_body()
        with proxy.lock:
            proxy.counters.requests += 1
            proxy.counters.methods[self.command] = proxy.counters.methods.get(self.command, 0) + 1
            faults = proxy.faults
            if faults.armed and faults.armed[0] == self.command and faults.armed[1] in self.path:
                faults.outage_until, faults.armed = time.monotonic() + faults.armed[2], None
                proxy.counters.outage_started = time.monotonic()
                proxy.counters.outage_ended = faults.outage_until
            outage = time.monotonic() < faults.outage_until
            drop = (self.command in ("PUT", "POST") and faults.drop_share > 0
                    and faults.rng.random() < faults.drop_share)
            latency, status = faults.latency, faults.outage_status
            if outage:
                proxy.counters.outage_answers += 1
        if latency:
            time.sleep(latency)
        if outage:
            payload = SLOW_DOWN if status == 503 else INTERNAL
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in self.headers.items():
                if key.lower() not in ("connection", "keep-alive", "proxy-connection"):
                    conn.putheader(key, value)
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if drop:
            with proxy.lock:
                proxy.counters.dropped_writes += 1
            # The server has applied the write; the client gets a reset instead of the answer.
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.close()
            return
        self.send_response_only(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() not in _HOP_BY_HOP and (key.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(key, value)        # a HEAD answer keeps the object's length
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
