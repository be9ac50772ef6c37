"""The synthetic world: deterministic scenes, exact captions and renders, the loopback server, the files."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import manifest as manifest_lib
from pipelines import world
from tests.conftest import ROOT, run_cli

SIZES = (32, 64, 128)


def components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1 exclusive) of the 8-connected components of a boolean mask.
    Written out (a BFS) so the test does not lean on the code it checks or on scipy."""
    seen = np.zeros_like(mask)
    boxes = []
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, ys, xs = [(y, x)], [], []
        while queue:
            cy, cx = queue.pop()
            ys.append(cy)
            xs.append(cx)
            for ny in (cy - 1, cy, cy + 1):
                for nx in (cx - 1, cx, cx + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        boxes.append((min(xs), min(ys), max(xs) + 1, max(ys) + 1))
    return boxes


def test_scenes_and_bytes_are_deterministic_across_processes():
    config = world.WorldConfig(seed=7, size=64)
    here = [hashlib.sha256(world.image_bytes(i, config)).hexdigest() for i in range(20)]
    assert here == [hashlib.sha256(world.image_bytes(i, config)).hexdigest() for i in range(20)]
    code = ("import hashlib; from pipelines import world; c = world.WorldConfig(seed=7, size=64); "
            "print(' '.join(hashlib.sha256(world.image_bytes(i, c)).hexdigest() for i in range(20)))")
    there = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    assert there.stdout.split() == here
    # Another seed, or another size, is another world.
    other = [world.make_scene(i, world.WorldConfig(seed=8)).caption for i in range(20)]
    assert other != [world.make_scene(i, config).caption for i in range(20)]


@pytest.mark.parametrize("size", SIZES)
def test_renders_match_their_specs_exactly(size):
    """What an evaluator checks on a clean render holds exactly: every pixel is the background or a
    palette colour; per colour, connected components are the objects, with the spec's bboxes; the
    relation holds between the components."""
    config = world.WorldConfig(seed=1, size=size)
    colours = {rgb: name for name, rgb in world.PALETTE.items()}
    kinds = collections.Counter()
    for i in range(60):
        scene = world.make_scene(i, config)
        kinds[scene.kind] += 1
        pixels = np.asarray(world.render(scene))
        assert pixels.shape == (size, size, 3)
        used = {tuple(p) for p in np.unique(pixels.reshape(-1, 3), axis=0)}
        assert used <= set(colours) | {world.BACKGROUND}, f"scene {i}: stray colours {used - set(colours)}"
        found = {}
        for rgb in used - {world.BACKGROUND}:
            found[colours[rgb]] = sorted(components(np.all(pixels == rgb, axis=-1)))
        want = collections.defaultdict(list)
        for obj in scene.objects:
            want[obj.colour].append(obj.bbox)
        assert set(found) == set(want), f"scene {i} {scene.caption!r}"
        for colour, boxes in found.items():
            assert len(boxes) == len(want[colour]), f"scene {i} {scene.caption!r}: {colour} count"
            for box, spec_box in zip(boxes, sorted(want[colour])):
                # A shape fills its bbox's extent (circles and triangles may leave a corner pixel).
                assert spec_box[0] <= box[0] and spec_box[1] <= box[1] and box[2] <= spec_box[2] and box[3] <= spec_box[3]
                assert box[2] - box[0] >= spec_box[2] - spec_box[0] - 1 and box[3] - box[1] >= spec_box[3] - spec_box[1] - 1
        if scene.kind == "relation":
            a, b = scene.objects
            assert world.relation_holds(found[a.colour][0], found[b.colour][0], scene.relation), scene.caption
    assert kinds["count"] and kinds["relation"]


def test_captions_match_specs():
    config = world.WorldConfig(seed=3, size=64)
    seen = collections.Counter()
    for i in range(400):
        scene = world.make_scene(i, config)
        caption = scene.caption
        seen[scene.kind] += 1
        parsed = world.parse_caption(caption)
        assert parsed.kind == scene.kind and parsed.relation == scene.relation
        assert [(o.colour, o.shape) for o in parsed.objects] == [(o.colour, o.shape) for o in scene.objects]
        if scene.kind == "count":
            assert len({(o.colour, o.shape) for o in scene.objects}) == 1
            assert 1 <= len(scene.objects) <= 4
        else:
            assert scene.objects[0].colour != scene.objects[1].colour
        # The spec is JSON and comes back whole.
        assert world.Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert world.make_scene(0, world.WorldConfig(seed=0)).caption == "two white triangles"
    assert world.parse_caption("an orange square above a red circle").relation == "above"
    assert len(world.parse_caption("three blue circles").objects) == 3
    assert seen["relation"] > 100 and seen["count"] > 200


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        world.WorldConfig(size=16).validate()
    with pytest.raises(ValueError, match="image_format"):
        world.WorldConfig(image_format="gif").validate()
    for caption in ("a dog", "two red circle", "a pink square", "a red circle to the left of"):
        with pytest.raises(ValueError, match="not a synthetic-world caption"):
            world.parse_caption(caption)
    spec = world.make_scene(2).to_dict()
    spec["caption"] = "a red circle"
    with pytest.raises(ValueError, match="does not match its spec"):
        world.Scene.from_dict(spec, where="specs.jsonl line 3")


def get(url: str, method: str = "GET") -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as resp:
            return resp.status, resp.read(), resp.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        return err.code, b"", ""


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_server_serves_the_same_bytes_as_a_direct_render(image_format):
    config = world.WorldConfig(seed=5, size=32, image_format=image_format)
    with world.WorldServer(config, n=50) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        results = {}

        def fetch(i: int) -> None:
            results[i] = get(server.url(i))

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(0, 50, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (status, body, ctype) in results.items():
            assert status == 200 and body == world.image_bytes(i, config)
            assert ctype == ("image/png" if image_format == "png" else "image/jpeg")
            assert Image.open(io.BytesIO(body)).size == (32, 32)
        assert get(server.url(3), method="HEAD")[0] == 200
        assert get(server.url(50))[0] == 404                  # past the end of the world
        assert get(server.base_url + "/scene/12.png")[0] == 404
        assert get(server.base_url + "/etc/passwd")[0] == 404


def read_tsv(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text().splitlines()
    rows = [tuple(line.split("\t")) for line in lines]
    assert all(len(r) == 2 for r in rows), "each line must be url<TAB>caption"
    return rows


def test_cli_writes_a_cc12m_style_url_list_with_specs(tmp_path, cli):
    out = tmp_path / "w"
    args = ("world", out, "n=25", "size=32", "seed=4", "port=9999")
    run_cli(*args)
    rows = read_tsv(out / "world.tsv")
    assert len(rows) == 25
    config = world.WorldConfig(seed=4, size=32)
    for i, (url, caption) in enumerate(rows):
        assert url == f"http://127.0.0.1:9999/scene/{i:07d}.png"
        assert caption == world.make_scene(i, config).caption
    specs = world.read_specs(str(out))
    assert list(specs) == [url for url, _ in rows]
    assert [s.caption for s in specs.values()] == [c for _, c in rows]
    assert specs[rows[3][0]] == world.make_scene(3, config)
    manifest = manifest_lib.read(str(out))
    assert manifest.kind == "world" and manifest.rows == 50 and manifest_lib.verify(str(out)) == []
    assert manifest.config["palette"]["red"] == list(world.PALETTE["red"])
    assert sum(manifest.stats["kinds"].values()) == 25
    # A rebuild is byte-identical.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run_cli(*args)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, _, error = cli("world", out, "n=0")
    assert code == 2 and "need at least one scene" in error


def test_cli_serve_answers_the_urls_it_wrote(tmp_path):
    out = tmp_path / "served"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "world", str(out), "n=6", "size=32", "port=0", "serve=true"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Started with SIGINT ignored, as a script's background job (or an xdist worker's child) is:
        # the Ctrl-C below must still stop it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[1].startswith("serving http://127.0.0.1:"), lines
        rows = read_tsv(out / "world.tsv")
        config = world.WorldConfig(seed=0, size=32)
        for i, (url, _) in enumerate(rows):
            status, body, _ = get(url)
            assert status == 200 and body == world.image_bytes(i, config)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0


def test_every_caption_is_whole_words_of_the_world_encoder(tmp_path, monkeypatch):
    """The world's own text encoder knows every word a caption can hold (no unknown token), gives
    one token per word, and is built once into the cache, under a name tied to its vocabulary."""
    import itertools

    from model.text_encoder import count_tokens, load_tokenizer

    monkeypatch.setenv("MINIT2I_CACHE", str(tmp_path / "cache"))
    folder = world.resolve_text_encoder(world.WORLD_TEXT_ENCODER)
    assert Path(folder).parent == tmp_path / "cache" and (Path(folder) / "config.json").is_file()
    assert world.resolve_text_encoder("tiny-t5") == "tiny-t5"
    tok = load_tokenizer(folder)
    captions = [world.Scene("count", (world.Obj(c, s),) * n).caption
                for c, s, n in itertools.product(world.PALETTE, world.SHAPES, world.COUNT_WORDS)]
    captions += [world.Scene("relation", (world.Obj(c1, s1), world.Obj(c2, s2)), rel).caption
                 for (c1, c2), s1, s2, rel in itertools.product(itertools.permutations(world.PALETTE, 2), world.SHAPES,
                                                                 world.SHAPES, world.RELATIONS)]
    ids = tok(captions)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert count_tokens(tok, captions) == [len(c.split()) + 1 for c in captions]
    assert max(len(c.split()) for c in captions) + 1 == 11
    mtime = (Path(folder) / "config.json").stat().st_mtime_ns
    assert world.text_encoder_dir() == folder and (Path(folder) / "config.json").stat().st_mtime_ns == mtime

