"""The synthetic world: seeded scenes of coloured shapes with exact captions, served over HTTP.

The embedded default needs data that exists offline and whose truth is known, so that the fetch
path runs for real and prompt-following checks are exact (the GenEval idea: colour, count and
position checks, here with no detector because every object is a solid patch of a known colour).

A scene is either
  count:     1..4 objects of one colour and one shape       "a red circle", "three blue squares"
  relation:  two objects of different colours, one placed   "a blue square to the left of a
             left of / right of / above / below the other    yellow triangle"
Scene `index` of world `seed` is a pure function of (seed, index, size, config): any process can
render it again, which is how the HTTP server answers and how evaluation knows the truth.

Geometry, chosen so that checks on clean renders are exact: the image is a g x g grid of cells
(g = max(2, size // 40): 2 at 32 and 64 px); each object is a solid shape with a square bbox
inside its own cell with a margin, so objects never touch and connected components count them;
no anti-aliasing, so every object pixel is exactly its palette colour, and the background is a
grey far from all of them. Bounding boxes are (x0, y0, x1, y1) in pixels, x1/y1 exclusive.

Files (`write_world`): `world.tsv` (url<TAB>caption, no header: the CC12M list format),
`specs.jsonl` (one scene per line with its url and caption), `manifest.json` (written last).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import random
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image, ImageDraw

# Well separated in RGB (the closest pair, orange/yellow, is ~84 apart; the background is >=100
# from every colour), so nearest-palette classification of a clean or lightly compressed pixel is
# unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
# relation -> caption phrase; a relation reads "objects[0] <phrase> objects[1]".
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
KINDS = ("count", "relation")


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0                   # world seed: scene i is a function of (seed, i) and the fields below
    size: int = 64                  # image side in pixels (>= 32)
    relation_fraction: float = 0.4  # share of two-object relation scenes; the rest are count scenes
    max_count: int = 4              # count scenes hold 1..max_count objects (<= 4, grid permitting)
    image_format: str = "png"       # png (lossless: exact colours) or jpeg

    def validate(self) -> "WorldConfig":
        if self.size < 32:
            raise ValueError(f"world size {self.size} too small: scenes need at least 32 px")
        if not 0.0 <= self.relation_fraction <= 1.0:
            raise ValueError(f"world relation_fraction {self.relation_fraction} must be in [0, 1]")
        if not 1 <= self.max_count <= min(len(COUNT_WORDS), _grid(self.size) ** 2):
            raise ValueError(f"world max_count {self.max_count} must be in 1..{len(COUNT_WORDS)}")
        if self.image_format not in _FORMATS:
            raise ValueError(f"world image_format {self.image_format!r}: use one of {', '.join(_FORMATS)}")
        return self


# format -> (PIL format, file suffix, MIME type)
_FORMATS = {"png": ("PNG", "png", "image/png"), "jpeg": ("JPEG", "jpg", "image/jpeg")}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    bbox: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1), exclusive; None when parsed from text


@dataclass(frozen=True)
class Scene:
    kind: str                       # "count" or "relation"
    objects: tuple[Obj, ...]
    relation: str | None = None     # for kind "relation": objects[0] <relation> objects[1]
    size: int = 0                   # image side; 0 for a scene parsed from a caption
    seed: int = 0
    index: int = 0

    @property
    def caption(self) -> str:
        if self.kind == "count":
            first = self.objects[0]
            n = len(self.objects)
            noun = first.shape if n == 1 else first.shape + "s"
            return f"{_article(first.colour) if n == 1 else COUNT_WORDS[n]} {first.colour} {noun}"
        a, b = self.objects
        return f"{_article(a.colour)} {a.colour} {a.shape} {RELATIONS[self.relation]} {_article(b.colour)} {b.colour} {b.shape}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["objects"] = [{**o, "bbox": list(o["bbox"]) if o["bbox"] else None} for o in d["objects"]]
        d["caption"] = self.caption
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "scene") -> "Scene":
        try:
            objects = tuple(Obj(o["colour"], o["shape"], tuple(o["bbox"]) if o.get("bbox") else None) for o in d["objects"])
            scene = cls(d["kind"], objects, d.get("relation"), d.get("size", 0), d.get("seed", 0), d.get("index", 0))
            caption = scene.caption
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise ValueError(f"{where} is not a scene spec: {err!r}") from err
        if "caption" in d and d["caption"] != caption:
            raise ValueError(f"{where}: caption {d['caption']!r} does not match its spec ({caption!r})")
        return scene


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _grid(size: int) -> int:
    return max(2, size // 40)


def _margin(size: int) -> int:
    return max(2, size // 32)


def relation_holds(a: tuple[int, int, int, int], b: tuple[int, int, int, int], relation: str) -> bool:
    """Whether bbox `a` is `relation` bbox `b`: no overlap along the relation's axis, and the centre
    offset along that axis larger than across it (so "left of" is never mostly "above")."""
    ax, ay = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    bx, by = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    if relation == "left of":
        return a[2] <= b[0] and abs(ay - by) < bx - ax
    if relation == "right of":
        return b[2] <= a[0] and abs(ay - by) < ax - bx
    if relation == "above":
        return a[3] <= b[1] and abs(ax - bx) < by - ay
    if relation == "below":
        return b[3] <= a[1] and abs(ax - bx) < ay - by
    raise ValueError(f"unknown relation {relation!r}: use one of {', '.join(RELATIONS)}")


def _place(rng: random.Random, size: int, row: int, col: int) -> tuple[int, int, int, int]:
    """A random square bbox inside grid cell (row, col), at least `margin` from the cell's edges.
    The side is drawn from [usable/2, usable], so two objects in neighbouring cells are >= 2*margin
    apart and, on a shared row or column, the centre offset along it always exceeds the one across
    it (relation_holds is true by construction)."""
    g, m = _grid(size), _margin(size)
    cell = size // g
    usable = cell - 2 * m
    side = rng.randint((usable + 1) // 2, usable)
    x0 = col * cell + m + rng.randint(0, usable - side)
    y0 = row * cell + m + rng.randint(0, usable - side)
    return (x0, y0, x0 + side, y0 + side)


def make_scene(index: int, config: WorldConfig = WorldConfig()) -> Scene:
    """Scene `index` of the world: deterministic in (config, index), independent of other scenes."""
    # A str seed is hashed with SHA-512 by `random`, so it is stable across processes and Python
    # runs (unlike hash()), and distinct worlds never share a stream.
    rng = random.Random(f"minit2i-world:{config.seed}:{config.size}:{index}")
    g = _grid(config.size)
    colours = list(PALETTE)
    if rng.random() < config.relation_fraction:
        relation = rng.choice(list(RELATIONS))
        c1, c2 = rng.sample(colours, 2)
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        line = rng.randrange(g)                 # the shared row (left/right) or column (above/below)
        first, second = sorted(rng.sample(range(g), 2))
        # `first` is the left/upper cell; the subject goes there for "left of"/"above".
        subject, reference = (first, second) if relation in ("left of", "above") else (second, first)
        if relation in ("left of", "right of"):
            ba, bb = _place(rng, config.size, line, subject), _place(rng, config.size, line, reference)
        else:
            ba, bb = _place(rng, config.size, subject, line), _place(rng, config.size, reference, line)
        assert relation_holds(ba, bb, relation), (index, relation, ba, bb)
        objects = (Obj(c1, s1, ba), Obj(c2, s2, bb))
        return Scene("relation", objects, relation, config.size, config.seed, index)
    count = rng.randint(1, config.max_count)
    colour, shape = rng.choice(colours), rng.choice(SHAPES)
    cells = sorted(rng.sample(range(g * g), count))
    objects = tuple(Obj(colour, shape, _place(rng, config.size, c // g, c % g)) for c in cells)
    return Scene("count", objects, None, config.size, config.seed, index)


PROMPT_KINDS = ("single", "counting", "relation")   # what held_out_captions balances


def prompt_kind(scene: Scene) -> str:
    """single (one object), counting (2..4 of one kind) or relation (two objects placed)."""
    return "relation" if scene.kind == "relation" else "single" if len(scene.objects) == 1 else "counting"


def held_out_captions(n: int, config: WorldConfig) -> list[str]:
    """n captions of `config`'s world (give it another seed than the training world's), cycling
    single, counting, relation, so that every prefix of the list is balanced across the three.
    Each kind keeps the world's own distribution of colours, shapes, counts and relations."""
    config = dataclasses.replace(config, relation_fraction=0.5).validate()   # draws every kind often
    pools: dict[str, list[str]] = {k: [] for k in PROMPT_KINDS}
    need = {k: len(range(i, n, len(PROMPT_KINDS))) for i, k in enumerate(PROMPT_KINDS)}
    index = 0
    while any(len(pools[k]) < need[k] for k in PROMPT_KINDS):
        scene = make_scene(index, config)
        pools[prompt_kind(scene)].append(scene.caption)
        index += 1
    return [pools[PROMPT_KINDS[i % len(PROMPT_KINDS)]][i // len(PROMPT_KINDS)] for i in range(n)]


def render(scene: Scene) -> Image.Image:
    """RGB image of a scene: solid shapes on the grey background, no anti-aliasing."""
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        box = (x0, y0, x1 - 1, y1 - 1)  # PIL's boxes include their last row and column
        fill = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "triangle":  # apex up, base on the bbox's bottom row
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}: use one of {', '.join(SHAPES)}")
    return image


def encode(image: Image.Image, image_format: str = "png") -> bytes:
    fmt = _FORMATS[image_format][0]
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def image_bytes(index: int, config: WorldConfig = WorldConfig()) -> bytes:
    """Encoded image of scene `index`: the same bytes in every process for the same Pillow."""
    return encode(render(make_scene(index, config)), config.image_format)


_COUNT_RE = re.compile(r"^(a|an|two|three|four) (\w+) (circle|square|triangle)s?$")
_RELATION_RE = re.compile(
    r"^an? (\w+) (circle|square|triangle) (to the left of|to the right of|above|below) an? (\w+) (circle|square|triangle)$"
)


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (objects without bboxes): the inverse of Scene.caption, so a
    prompt drawn from the world can be checked against what was generated for it."""
    text = text.strip()
    if m := _RELATION_RE.match(text):
        c1, s1, phrase, c2, s2 = m.groups()
        relation = {v: k for k, v in RELATIONS.items()}[phrase]
        scene = Scene("relation", (Obj(c1, s1), Obj(c2, s2)), relation)
    elif m := _COUNT_RE.match(text):
        word, colour, shape = m.groups()
        n = 1 if word in ("a", "an") else {v: k for k, v in COUNT_WORDS.items()}[word]
        scene = Scene("count", tuple(Obj(colour, shape) for _ in range(n)))
    else:
        raise ValueError(f"caption {text!r} is not a synthetic-world caption")
    if any(o.colour not in PALETTE for o in scene.objects) or scene.caption != text:
        raise ValueError(f"caption {text!r} is not a synthetic-world caption")
    return scene


# --- files -----------------------------------------------------------------------------------------

def vocabulary() -> list[str]:
    """Every word a world caption can hold: articles and count words, colours, shapes (one and
    many), and the relation phrases' words."""
    words = {"a", "an", *COUNT_WORDS.values(), *PALETTE, *SHAPES, *(s + "s" for s in SHAPES)}
    words.update(w for phrase in RELATIONS.values() for w in phrase.split())
    return sorted(words)


# The text encoder spec that names the world's own encoder (`text_encoder_dir`).
WORLD_TEXT_ENCODER = "world"


def text_encoder_dir() -> str:
    """The world's own text encoder: the embedded default's tiny seeded T5 with a word-level
    tokenizer over `vocabulary()` (one token per word: the longest caption is 11 tokens with its
    end token, against 53 for ByT5's bytes), built once into the cache (model.text_encoder,
    MINIT2I_CACHE) under a name that changes with the vocabulary. Returns the folder."""
    import hashlib

    from model.text_encoder import cached_tiny_t5

    words = vocabulary()
    digest = hashlib.sha256(" ".join(words).encode()).hexdigest()[:10]
    return str(cached_tiny_t5(f"world-t5-{digest}", words=words))


def resolve_text_encoder(spec: str) -> str:
    """`WORLD_TEXT_ENCODER` -> the world's encoder folder; any other spec as it is."""
    return text_encoder_dir() if spec == WORLD_TEXT_ENCODER else spec


URLS_NAME, SPECS_NAME = "world.tsv", "specs.jsonl"


def scene_path(index: int, config: WorldConfig) -> str:
    return f"/scene/{index:07d}.{_FORMATS[config.image_format][1]}"


def write_world(out: str, config: WorldConfig, n: int, base_url: str) -> str:
    """Write the URL list, the specs and the manifest (last) of scenes 0..n-1 into folder `out`
    (local or s3://). Returns the manifest URI."""
    from pipelines import manifest as manifest_lib
    from pipelines import storage

    config.validate()
    if n < 1:
        raise ValueError(f"world n={n}: need at least one scene")
    base_url = base_url.rstrip("/")
    tsv, jsonl = [], []
    stats = {"kinds": collections.Counter(), "colours": collections.Counter(),
             "shapes": collections.Counter(), "counts": collections.Counter(), "relations": collections.Counter()}
    for i in range(n):
        scene = make_scene(i, config)
        url = base_url + scene_path(i, config)
        tsv.append(f"{url}\t{scene.caption}\n")
        jsonl.append(json.dumps({"url": url, **scene.to_dict()}, sort_keys=True) + "\n")
        stats["kinds"][scene.kind] += 1
        stats["colours"].update(o.colour for o in scene.objects)
        stats["shapes"].update(o.shape for o in scene.objects)
        if scene.kind == "count":
            stats["counts"][str(len(scene.objects))] += 1
        else:
            stats["relations"][scene.relation] += 1
    shards = []
    for name, lines in ((URLS_NAME, tsv), (SPECS_NAME, jsonl)):
        uri = storage.join(out, name)
        storage.write_bytes(uri, "".join(lines).encode())
        shards.append(manifest_lib.shard_entry(out, uri, rows=n))
    manifest = manifest_lib.Manifest(
        kind="world",
        config={**dataclasses.asdict(config), "n": n, "base_url": base_url, "palette": {k: list(v) for k, v in PALETTE.items()},
                "background": list(BACKGROUND)},
        shards=shards,
        stats={k: dict(sorted(v.items())) for k, v in stats.items()},
    )
    return manifest_lib.write(out, manifest)


def read_specs(out: str) -> dict[str, Scene]:
    """url -> Scene from a world folder's specs.jsonl (the truth for evaluation)."""
    from pipelines import storage

    uri = storage.join(out, SPECS_NAME)
    scenes = {}
    for n, line in enumerate(storage.read_bytes(uri).decode().splitlines(), 1):
        row = json.loads(line)
        scenes[row["url"]] = Scene.from_dict(row, where=f"{uri} line {n}")
    return scenes


# --- HTTP server -----------------------------------------------------------------------------------


class WorldServer:
    """Serves scenes 0..n-1 of a world at http://HOST:PORT/scene/NNNNNNN.png, rendered on request.

    Stdlib ThreadingHTTPServer on an ephemeral port by default. Use as a context manager:

        with WorldServer(WorldConfig(seed=0), n=1000) as server:
            server.url(3)   # 'http://127.0.0.1:PORT/scene/0000003.png'
    """

    def __init__(self, config: WorldConfig, n: int, host: str = "127.0.0.1", port: int = 0):
        self.config, self.n = config.validate(), n
        self._path_re = re.compile(r"^/scene/(\d{7})\." + _FORMATS[config.image_format][1] + "$")
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, index: int) -> str:
        return self.base_url + scene_path(index, self.config)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: downloaders reuse connections
            # Headers and body go out as two writes; with Nagle on, the body waits for the client's
            # delayed ACK of the headers (~40 ms per image on a kept-alive connection).
            disable_nagle_algorithm = True

            def _respond(self, body_too: bool) -> None:
                m = server._path_re.match(self.path.split("?", 1)[0])
                if not m or int(m.group(1)) >= server.n:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = image_bytes(int(m.group(1)), server.config)
                self.send_response(200)
                self.send_header("Content-Type", _FORMATS[server.config.image_format][2])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body_too:
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self._respond(body_too=True)

            def do_HEAD(self) -> None:
                self._respond(body_too=False)

            def log_message(self, format: str, *args: Any) -> None:  # quiet: thousands of requests
                pass

        return Handler

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def start(self) -> "WorldServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="world-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "WorldServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
