"""Fixtures for the data pipeline tests: a real image server on 127.0.0.1 with hostile endpoints,
and a canary server on 127.0.0.2 that must never receive a request.

Everything listens on loopback only; nothing here talks to any other address.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image


def make_image(seed: int, size: tuple[int, int] = (96, 64), fmt: str = "JPEG") -> bytes:
    """A small deterministic picture (smooth gradient + a seeded block, so JPEG stays small)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), np.full_like(xx, seed * 37 % 256)], -1)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, fmt, quality=90) if fmt == "JPEG" else Image.fromarray(img.astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _serve(host: str, handler_cls) -> tuple[_Server, threading.Thread]:
    server = _Server((host, 0), handler_cls)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


class ImageServer:
    """Routes (all GET):
    /img/N.jpg, /img/N.png  deterministic images      /slow/N.jpg?s=S  image after S seconds
    /status/CODE            that HTTP status           /loop/a, /loop/b  a redirect loop
    /redirect/N.jpg         302 -> /img/N.jpg          /redirect-forbidden  302 -> the 127.0.0.2 canary
    /text                   an HTML page               /truncated.jpg    first half of a JPEG
    /bomb.png               PNG claiming 30000x30000   /big, /big-declared  bodies over the byte cap
    /noai.jpg               image with X-Robots-Tag: noai
    /flaky/N.jpg            503 until `heal()` is called, then the image
    /countdown/N.jpg?fail=K 503 for the first K requests of that path, then the image
    """

    def __init__(self, canary_base: str, big_bytes: int = 300_000):
        self.hits: Counter = Counter()
        self.canary_base = canary_base
        self.big_bytes = big_bytes
        self.healed = False
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, body: bytes = b"", ctype: str = "image/jpeg", headers: dict | None = None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):  # noqa: N802 - http.server's name
                parts = urlsplit(self.path)
                path, query = parts.path, parse_qs(parts.query)
                owner.hits[path] += 1
                name = path.rsplit("/", 1)[-1]
                stem = name.split(".")[0]
                if path.startswith("/img/"):
                    fmt = "PNG" if name.endswith(".png") else "JPEG"
                    return self._send(200, make_image(int(stem), fmt=fmt), "image/png" if fmt == "PNG" else "image/jpeg")
                if path.startswith("/slow/"):
                    time.sleep(float(query.get("s", ["3"])[0]))
                    return self._send(200, make_image(int(stem)))
                if path.startswith("/status/"):
                    return self._send(int(name), b"no", "text/plain")
                if path == "/loop/a":
                    return self._send(302, b"", "text/plain", {"Location": "/loop/b"})
                if path == "/loop/b":
                    return self._send(302, b"", "text/plain", {"Location": "/loop/a"})
                if path.startswith("/redirect/"):
                    return self._send(302, b"", "text/plain", {"Location": f"/img/{name}"})
                if path == "/redirect-forbidden":
                    return self._send(302, b"", "text/plain", {"Location": f"{owner.canary_base}/stolen.jpg"})
                if path == "/text":
                    return self._send(200, b"<html><body>not an image</body></html>", "text/html")
                if path == "/truncated.jpg":
                    data = make_image(7, size=(256, 192))
                    return self._send(200, data[: len(data) // 2])
                if path == "/bomb.png":
                    return self._send(200, png_claiming(30000, 30000), "image/png")
                if path == "/big-declared":
                    return self._send(200, b"\xff" * owner.big_bytes)
                if path == "/big":  # no Content-Length: the cap must hold while streaming
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    try:
                        for _ in range(owner.big_bytes // 10_000 + 1):
                            self.wfile.write(b"\xff" * 10_000)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    self.close_connection = True
                    return None
                if path == "/noai.jpg":
                    return self._send(200, make_image(3), headers={"X-Robots-Tag": "noai, noimageai"})
                if path.startswith("/countdown/"):
                    if owner.hits[path] <= int(query.get("fail", ["1"])[0]):
                        return self._send(503, b"busy", "text/plain", {"Retry-After": "0"})
                    return self._send(200, make_image(int(stem)))
                if path.startswith("/flaky/"):
                    if not owner.healed:
                        return self._send(503, b"busy", "text/plain")
                    return self._send(200, make_image(int(stem)))
                return self._send(404, b"not found", "text/plain")

        self.server, self.thread = _serve("127.0.0.1", Handler)
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"

    def heal(self) -> None:
        self.healed = True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class CanaryServer:
    """Listens on 127.0.0.2; records every request it gets (there must be none)."""

    def __init__(self):
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                owner.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server, self.thread = _serve("127.0.0.2", Handler)
        self.base = f"http://127.0.0.2:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def canary():
    server = CanaryServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def image_server(canary):
    server = ImageServer(canary.base)
    yield server
    server.close()


@pytest.fixture(scope="session")
def cc12m_mirror(tmp_path_factory):
    """A three-tar cc12m-wds mirror in its published layout, with its CaptionEmporium caption file.

    Tars 0 and 1 are written by img2dataset's own WebDataset writer (tar 1 has a gap where a download
    failed). Tar 2 is damaged the ways a copy can be: a sample without its image member, an
    undecodable image, an unreadable .json, and the file cut off inside the last sample's image.
    `samples` maps every key the mirror names to {url, caption, image}; `captions` is the LLaVA file.
    """
    import json

    from img2dataset.downloader import compute_key

    from tests.pipelines.sources.layouts import encode, smooth_image, wds_members, write_cc12m_wds, write_llava_captions, write_tar

    root = tmp_path_factory.mktemp("cc12m-wds")

    def sample(shard: int, i: int) -> dict:
        return {"url": f"https://img.example/{shard}/{i}.jpg", "caption": f"alt text {shard}.{i}",
                "image": encode(smooth_image(100 * shard + i, (96, 64)), "JPEG"), "original_size": (960, 640)}

    shards = [[sample(0, i) for i in range(3)], [sample(1, 0), {**sample(1, 1), "image": None}, sample(1, 2)]]
    write_cc12m_wds(root, shards)
    samples = {compute_key(i, s, 5, 4): x for s, xs in enumerate(shards) for i, x in enumerate(xs) if x["image"]}

    damaged = [sample(2, i) for i in range(5)]
    keys = [compute_key(i, 2, 5, 4) for i in range(5)]
    meta = lambda k, x: json.dumps({"caption": x["caption"], "url": x["url"], "key": k, "status": "success",  # noqa: E731
                                    "error_message": None, "width": 96, "height": 64, "original_width": 960,
                                    "original_height": 640, "exif": "{}"}, indent=4)
    half = damaged[2]["image"][: len(damaged[2]["image"]) // 2]
    members = wds_members([
        (keys[0], {"jpg": damaged[0]["image"], "json": meta(keys[0], damaged[0]), "txt": damaged[0]["caption"]}),
        (keys[1], {"json": meta(keys[1], damaged[1]), "txt": damaged[1]["caption"]}),
        (keys[2], {"jpg": half, "json": meta(keys[2], damaged[2]), "txt": damaged[2]["caption"]}),
        (keys[3], {"jpg": damaged[3]["image"], "json": "{truncated json", "txt": damaged[3]["caption"]}),
        (keys[4], {"jpg": damaged[4]["image"] * 3, "json": meta(keys[4], damaged[4]), "txt": damaged[4]["caption"]}),
    ])
    tar = write_tar(root / "cc12m-train-0002.tar", members)
    data = tar.read_bytes()
    tar.write_bytes(data[: data.index(damaged[4]["image"] * 3) + 200])
    samples.update(zip(keys, damaged))

    lines = [{"caption_llava": f"LLaVA caption of {k}", "caption_llava_short": f"short {k}", "caption": x["caption"],
              "url": x["url"], "key": k, "status": "success"} for k, x in sorted(samples.items())]
    return {"root": root, "samples": samples, "keys": sorted(samples), "lines": lines,
            "captions": write_llava_captions(root.parent / "captions" / "train.jsonl.gz", lines)}
