"""`minit2i world OUT n=1600 [serve=true]`: write (and serve on 127.0.0.1) the synthetic world.

The world (pipelines/world.py) is a CC12M-style URL list of rendered, exactly captioned scenes;
with serve=true this process serves the images until interrupted, so `minit2i fetch` can run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorldCommandConfig:
    out: str = ""                        # folder for world.tsv, specs.jsonl, manifest.json (local or s3://)
    n: int = 0                           # number of scenes
    size: int = 64                       # image side in pixels
    seed: int = 0                        # world seed
    relation_fraction: float = 0.4       # share of two-object relation scenes
    format: str = "png"                  # image format served (png or jpeg)
    host: str = "127.0.0.1"              # host in the URLs and, with serve, the bind address
    port: int = 8765                     # port in the URLs; 0 with serve picks a free one
    serve: bool = False                  # serve the images until interrupted


def run(args: WorldCommandConfig) -> int:
    from pipelines.world import SPECS_NAME, URLS_NAME, WorldConfig, WorldServer, write_world

    config = WorldConfig(seed=args.seed, size=args.size, relation_fraction=args.relation_fraction,
                         image_format=args.format).validate()
    if not args.serve:
        if args.port == 0:
            raise ValueError("port=0 (a free port) only makes sense with serve=true")
        uri = write_world(args.out, config, args.n, f"http://{args.host}:{args.port}")
        print(f"world: {args.n} scenes -> {args.out} ({URLS_NAME}, {SPECS_NAME}); manifest: {uri}")
        return 0
    # Ctrl-C stops the server even when this process was started with SIGINT ignored, as a
    # background job of a script or a pytest-xdist worker's child inherits it (Python then installs
    # no KeyboardInterrupt handler, and the server would ignore Ctrl-C for ever).
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Bind first so the URL list carries the real port.
    server = WorldServer(config, args.n, host=args.host, port=args.port)
    uri = write_world(args.out, config, args.n, server.base_url)
    print(f"world: {args.n} scenes -> {args.out}; manifest: {uri}")
    print(f"serving {server.base_url}/scene/... (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
