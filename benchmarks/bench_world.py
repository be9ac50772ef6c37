"""Synthetic-world throughput: scene specs, render + encode, and the loopback HTTP server.

    python benchmarks/bench_world.py [--seconds 3] [--clients 8]

Speed is measured here, never asserted in tests. Numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import http.client
import threading
import time

from pipelines import world


def rate(fn, seconds: float) -> float:
    """Calls of fn(i) per second over about `seconds`."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            fn(n)
            n += 1
    return n / elapsed


def server_rate(config: world.WorldConfig, seconds: float, clients: int) -> float:
    """Images per second served to `clients` keep-alive HTTP clients on 127.0.0.1."""
    with world.WorldServer(config, n=10**6) as server:
        host, port = server.base_url.split("//")[1].split(":")
        counts = [0] * clients
        stop = time.perf_counter() + seconds

        def client(k: int) -> None:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            i = k
            while time.perf_counter() < stop:
                conn.request("GET", world.scene_path(i, config))
                conn.getresponse().read()
                counts[k] += 1
                i += clients
            conn.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    print(f"scene specs           {rate(lambda i: world.make_scene(i), args.seconds):10.0f} /s")
    for size in (32, 64, 128, 256):
        for fmt in ("png", "jpeg"):
            config = world.WorldConfig(size=size, image_format=fmt)
            print(f"render+encode {size:3d} {fmt:4s} {rate(lambda i: world.image_bytes(i, config), args.seconds):10.0f} img/s")
    for size in (32, 64):
        config = world.WorldConfig(size=size)
        print(f"HTTP serve {size:3d} png    {server_rate(config, args.seconds, args.clients):10.0f} img/s "
              f"({args.clients} keep-alive clients)")


if __name__ == "__main__":
    main()
