"""The curate job end to end on real Ray, over tiny fixtures in each release's real layout.

Every planted defect must land in its own reason bucket, every valid row must survive, two builds
with different parallelism must be byte-identical, and a changed config must show up row by row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import from_dict
from model.text_encoder import build_tiny_t5
from pipelines import manifest, storage
from pipelines.curate import CurateConfig, HammingIndex, aspect_bucket, caption_attributes, curate
from tests.conftest import OUTAGE, run_cli
from tests.pipelines.sources.layouts import (BLIP3O_TARS, encode, smooth_image, wds_members, write_dalle3_release,
                                             write_geneval_prompts, write_parquet, write_sharegpt, write_sharegpt_release,
                                             write_tar)

PLANTED_PROMPT = "a photo of a purple bench"

# (row id, reason, duplicate_of) for every row the fixture plants a defect in.
EXPECTED_DROPPED = {
    ("blip3o/geneval_train.tar/g2", "decode_error", None),
    ("blip3o/geneval_train.tar/g3", "decode_error", None),
    ("blip3o/geneval_train.tar/g4", "caption_empty", None),
    ("blip3o/geneval_train.tar/g5", "caption_empty", None),
    ("blip3o/geneval_train.tar/g6", "caption_too_long", None),
    ("blip3o/geneval_train.tar/g7", "too_small", None),
    ("blip3o/geneval_train.tar/g8", "bad_aspect", None),
    ("blip3o/geneval_train.tar/g9", "decompression_bomb", None),
    ("blip3o/journeydb/shards-00000.tar/j1", "duplicate_exact", "blip3o/geneval_train.tar/g0"),
    ("dalle3/train-0.parquet/000000001", "duplicate_near", "blip3o/journeydb/shards-00000.tar/j2"),
    ("dalle3/train-0.parquet/000000002", "image_missing", None),
    ("dalle3/train-0.parquet/000000003", "duplicate_exact", "blip3o/geneval_train.tar/g1"),
    ("dalle3/urls.parquet/000000000", "image_not_fetched", None),
    ("sharegpt4o/text_to_image.json/text_to_image/00003.png", "image_missing", None),
}
EXPECTED_KEPT = [
    "blip3o/geneval_train.tar/g0", "blip3o/geneval_train.tar/g1",
    "blip3o/journeydb/shards-00000.tar/j0", "blip3o/journeydb/shards-00000.tar/j2",
    "dalle3/train-0.parquet/000000000", "dalle3/train-0.parquet/000000004",
    "sharegpt4o/part-0.tar/text_to_image/00001.png", "sharegpt4o/part-1.tar/text_to_image/00002.png",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The three releases in their layouts, with every defect planted once, and the expected bytes."""
    root = tmp_path_factory.mktemp("world")
    img = {s: smooth_image(s) for s in range(10, 19)}
    g0, g1 = encode(img[10]), encode(img[11], "JPEG", quality=90)
    good_jpeg = encode(img[11], "JPEG")
    bomb = encode(Image.new("1", (2000, 2000)))  # 4M pixels in a ~1 KB PNG
    write_tar(root / "blip3o" / "geneval_train.tar", wds_members([
        ("g0", {"png": g0, "txt": f"{PLANTED_PROMPT.capitalize()} on the grass."}),
        ("g1", {"jpg": g1, "txt": "two red apples left of a blue cup, oil painting"}),
        ("g2", {"png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "txt": "corrupt bytes"}),
        ("g3", {"jpg": good_jpeg[: len(good_jpeg) // 2], "txt": "a truncated jpeg"}),
        ("g4", {"png": encode(smooth_image(30)), "txt": "  \n "}),
        ("g5", {"png": encode(smooth_image(31))}),
        ("g6", {"png": encode(smooth_image(32)), "txt": "a very long caption " * 15}),
        ("g7", {"png": encode(smooth_image(33, (32, 32))), "txt": "too small"}),
        ("g8", {"png": encode(smooth_image(34, (200, 48))), "txt": "a banner"}),
        ("g9", {"png": bomb, "txt": "a decompression bomb"}),
    ]))
    j0 = encode(smooth_image(12, (120, 90)))
    j2 = encode(img[13])
    write_tar(root / "blip3o" / "journeydb" / "shards-00000.tar", wds_members([
        ("j0", {"png": j0, "txt": "a cinematic photo of a lighthouse"}),
        ("j1", {"png": encode(img[10], compress_level=1), "txt": "same pixels as g0, other bytes"}),
        ("j2", {"png": j2, "txt": "a watercolor of three boats"}),
    ]))
    d0 = encode(img[14], "JPEG")
    d4 = encode(smooth_image(15, (64, 112)))
    write_parquet(root / "dalle3" / "train-0.parquet", {
        "caption": ["a dog", "boats again, re-encoded", "no image", "g1's bytes again", "a cozy cabin, digital art"],
        "image": [d0, encode(img[13].resize((90, 90)), "JPEG", quality=85), None, g1, d4],
    }, image_as_struct="image")
    write_parquet(root / "dalle3" / "urls.parquet", {"text": ["only a url"], "link": ["http://127.0.0.1:9/x.png"]})
    s1, s2 = encode(img[16]), encode(img[17])
    meta, images = write_sharegpt(root / "sharegpt4o", [
        {"input_prompt": "a robot reading a book", "output_image": "text_to_image/00001.png"},
        {"input_prompt": "five yellow balloons above a house", "output_image": "text_to_image/00002.png"},
        {"input_prompt": "lost image", "output_image": "text_to_image/00003.png"},
    ], {"part-0.tar": [("text_to_image/00001.png", s1), ("text_to_image/edit_input.png", encode(img[18]))],
        "part-1.tar": [("text_to_image/00002.png", s2)]})
    prompts = write_geneval_prompts(root / "geneval" / "evaluation_metadata.jsonl",
                                    [PLANTED_PROMPT, "a photo of two dogs", "a photo of a red car left of a tree"])
    return {
        "root": root, "meta": meta, "images": images, "prompts": prompts,
        "tokenizer": build_tiny_t5(root / "tiny_t5"),
        "bytes": {
            "blip3o/geneval_train.tar/g0": g0, "blip3o/geneval_train.tar/g1": g1,
            "blip3o/journeydb/shards-00000.tar/j0": j0, "blip3o/journeydb/shards-00000.tar/j2": j2,
            "dalle3/train-0.parquet/000000000": d0, "dalle3/train-0.parquet/000000004": d4,
            "sharegpt4o/part-0.tar/text_to_image/00001.png": s1, "sharegpt4o/part-1.tar/text_to_image/00002.png": s2,
        },
    }


def _config(world, output: Path, **parallelism) -> dict:
    r = world["root"]
    return {
        "output": str(output),
        "sources": {
            "blip3o": {"paths": [str(r / "blip3o")]},
            "dalle3": {"paths": [str(r / "dalle3")]},
            "sharegpt4o": {"metadata": str(world["meta"]), "images": [str(world["images"])]},
        },
        "filters": {"tokenizer": str(world["tokenizer"]), "min_side": 48, "max_aspect": 2.0, "max_pixels": 1_000_000},
        "contamination": {"prompts": [str(world["prompts"])]},
        "shard_rows": 1,
        "parallelism": parallelism,
    }


def _rows(root: Path) -> list[dict]:
    m = manifest.read(str(root))
    return [r for s in m.shards for r in pq.read_table(root / s.path).to_pylist()]


def _row_id(r: dict) -> str:
    return f"{r['source']}/{r['origin']}/{r['key']}"


@pytest.fixture(scope="module")
def builds(world, ray_session, s3_server, s3_faults, tmp_path_factory):
    """The same inputs and config built twice: serially in one block on local disk, and spread over
    workers into S3 through the tests' outage of SlowDown (OUTAGE, within the retry budget) from its third
    shard's upload on with a quarter of the writes' answers cut."""
    out = tmp_path_factory.mktemp("builds")
    logs = []
    for output, par in ((out / "a", dict(blocks=1, concurrency=1, batch_size=2, read_rows=2)),
                        ("s3://test-bucket/curate/b", dict(blocks=0, concurrency=2, batch_size=5, read_rows=3))):
        cfg = from_dict(CurateConfig, _config(world, output, **par))
        answered = s3_faults.counters.outage_answers
        if storage.is_s3(output):
            s3_faults.outage_on("curate/b/shard-00002.parquet", OUTAGE)
            s3_faults.drop_writes(0.25, seed=2)
        try:
            curate(cfg, log=logs.append)
            if storage.is_s3(output):
                print(s3_faults.recovery("curate"))
        finally:
            s3_faults.clear()
        assert storage.is_s3(output) == (s3_faults.counters.outage_answers > answered)   # the outage did land
    return out / "a", "s3://test-bucket/curate/b", "\n".join(logs)


def test_every_defect_in_its_bucket_and_every_valid_row_kept(world, builds):
    a, _, log = builds
    rows = _rows(a)
    assert [_row_id(r) for r in rows] == EXPECTED_KEPT
    for r in rows:  # the stored image is the release's own bytes, untouched
        assert r["image"] == world["bytes"][_row_id(r)]
        assert r["caption_t5_tokens"] == len(r["caption"].encode()) + 1  # ByT5: one token per byte + </s>
    dropped = pq.read_table(a / manifest.DROPPED_NAME).to_pylist()
    assert {(_row_id(r), r["reason"], r["duplicate_of"]) for r in dropped} == EXPECTED_DROPPED
    stats = manifest.read(str(a)).stats
    assert stats["rows"] == {"read": 22, "kept": 8, "dropped": 14}
    assert stats["dropped"]["decode_error"] == {"blip3o": 2, "total": 2}
    assert stats["dropped"]["image_missing"] == {"dalle3": 1, "sharegpt4o": 1, "total": 2}
    assert "caption_too_long" in log and "decompression_bomb" in log  # the reasons table is printed
    assert manifest.verify(str(a)) == []


def test_mix_weights_aspect_buckets_and_attributes(builds):
    a, _, _ = builds
    rows = {_row_id(r): r for r in _rows(a)}
    assert {r["source"]: r["mix_weight"] for r in rows.values()} == {"blip3o": 0.06, "dalle3": 0.016, "sharegpt4o": 0.04}
    assert rows["blip3o/journeydb/shards-00000.tar/j0"]["aspect_bucket"] == "4:3"
    assert rows["dalle3/train-0.parquet/000000004"]["aspect_bucket"] == "9:16"
    g1 = rows["blip3o/geneval_train.tar/g1"]
    assert (g1["attr_color"], g1["attr_count"], g1["attr_spatial"], g1["attr_style"]) == (
        ["blue", "red"], ["two"], ["left"], ["oil painting"])
    stats = manifest.read(str(a)).stats
    assert stats["aspect_buckets"] == {"9:16": 1, "1:1": 6, "4:3": 1}
    assert stats["attributes"]["color"]["terms"] == {"blue": 1, "purple": 1, "red": 1, "yellow": 1}
    assert stats["attributes"]["count"]["rows_with"] == 3  # two, three, five
    assert stats["sources"]["dalle3"] == {"read": 6, "kept": 2, "weight": 0.016, "share": pytest.approx(0.016 / 0.116)}


def test_rebuild_with_other_parallelism_is_byte_identical(builds):
    a, b, _ = builds
    ma, mb = manifest.read(str(a)), manifest.read(b)
    assert [(s.path, s.sha256) for s in ma.shards] == [(s.path, s.sha256) for s in mb.shards]
    assert len(ma.shards) == 8  # shard_rows=1
    for name in [s.path for s in ma.shards] + [manifest.DROPPED_NAME, manifest.MANIFEST_NAME]:
        assert (a / name).read_bytes() == storage.read_bytes(storage.join(b, name))
    assert "parallelism" not in ma.config and "output" not in ma.config
    # The S3 build rode out its outage and cut writes: intact, no debris, no multipart upload left open.
    assert manifest.verify(b) == [] and manifest.strays(b) == [] and storage.open_uploads(b) == []


def test_planted_geneval_prompt_is_reported(builds):
    a, _, log = builds
    report = manifest.read(str(a)).stats["contamination"]
    assert report["rows_matched"] == 1 and report["prompts"] == 3 and not report["dropped"]
    assert report["top"] == [{"prompt": PLANTED_PROMPT, "rows": 1}]
    assert report["by_source"] == {"blip3o": 1}
    assert f"contamination: 1 of 8 captions contain one of 3 eval prompts" in log


def test_cli_drop_contamination_and_changed_threshold_show_in_row_diff(world, builds, ray_session, tmp_path, capsys):
    """A third build through the `minit2i curate` entry point with two settings changed.

    Called in-process (the test's Ray is already up, so the command joins it and reuses its warm
    workers); the subprocess path of the CLI is covered by the next test and `curate-diff` below.
    """
    from jobs.cli import main

    a, _, _ = builds
    cfg_file = tmp_path / "curate.yaml"
    cfg = _config(world, tmp_path / "c", concurrency=2)
    cfg["contamination"]["drop"] = True
    cfg_file.write_text(json.dumps(cfg))  # JSON is YAML
    assert main(["curate", "--config", str(cfg_file), "dedup.near_threshold=-1"]) == 0
    stdout = capsys.readouterr().out
    assert "eval_contamination" in stdout and "curate: wrote 8 rows in 8 shards" in stdout

    diff = manifest.diff_rows(str(a), str(tmp_path / "c"))
    assert diff["removed"] == [{"row": "blip3o/geneval_train.tar/g0", "reason": "eval_contamination", "duplicate_of": None}]
    assert diff["added"] == [{"row": "dalle3/train-0.parquet/000000001", "reason": "duplicate_near",
                              "duplicate_of": "blip3o/journeydb/shards-00000.tar/j2"}]
    assert diff["config"]["dedup.near_threshold"] == (4, -1)
    assert diff["config"]["contamination.drop"] == (False, True)

    out = run_cli("curate-diff", a, tmp_path / "c").stdout
    assert "rows: 8 -> 8: +1 -1 (7 unchanged)" in out
    assert "- blip3o/geneval_train.tar/g0  eval_contamination" in out
    assert "+ dalle3/train-0.parquet/000000001  duplicate_near (duplicate of blip3o/journeydb/shards-00000.tar/j2)" in out


def test_cli_refuses_existing_output_and_unknown_layout_before_starting_ray(world, builds, tmp_path):
    a, _, _ = builds
    cfg_file = tmp_path / "curate.yaml"
    cfg_file.write_text(json.dumps(_config(world, a)))
    proc = run_cli("curate", "--config", cfg_file, check=False, timeout=120)
    assert proc.returncode == 2 and f"output {a} already holds a dataset" in proc.stderr

    odd = write_parquet(tmp_path / "odd" / "x.parquet", {"description": ["x"], "image": [b"\x89PNG"]})
    proc = run_cli("curate", "--config", cfg_file, f"output={tmp_path / 'new'}", f"sources.dalle3.paths={odd.parent}",
                   check=False, timeout=120)
    assert proc.returncode == 2
    assert f"{odd}: unknown dalle3 layout: no caption column/field" in proc.stderr
    assert not (tmp_path / "new").exists()


def test_a_file_broken_mid_scan_fails_the_build_and_leaves_no_manifest(world, ray_session, tmp_path):
    members = wds_members([(f"{i:03d}", {"png": encode(smooth_image(i)), "txt": "x"}) for i in range(80)])
    tar = write_tar(tmp_path / "blip3o" / "cut.tar", members)
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size * 3 // 4])  # the first members still probe fine
    cfg = _config(world, tmp_path / "out", concurrency=1)
    cfg["sources"] = {"blip3o": {"paths": [str(tar)]}}
    with pytest.raises(ValueError, match=r"cut\.tar: not a readable tar archive: unexpected end of data"):
        curate(from_dict(CurateConfig, cfg), log=lambda m: None)
    assert not (tmp_path / "out" / manifest.MANIFEST_NAME).exists()


def test_near_duplicate_index_matches_brute_force():
    import random

    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(300)]
    hashes += [h ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for h in hashes[:50]]  # <= 2 bits away
    index = HammingIndex(4)
    for i, h in enumerate(hashes):
        expected = next((str(j) for j in range(i) if (hashes[j] ^ h).bit_count() <= 4 and index.ids.count(str(j))), None)
        assert index.find(h) == expected
        if expected is None:
            index.add(h, str(i))


def test_small_helpers():
    assert aspect_bucket(1024, 1024) == "1:1" and aspect_bucket(1792, 1024) == "16:9" and aspect_bucket(1024, 1536) == "2:3"
    assert caption_attributes("A Grey cat in front of two dogs, pixel art") == {
        "attr_color": ["grey"], "attr_count": ["two"], "attr_spatial": ["in front of"], "attr_style": ["pixel art"]}


def test_the_releases_as_downloaded(world, ray_session, tmp_path):
    """The three download folders exactly as published, with their quirks: BLIP3o-60K's eleven named
    tars (geneval_train.tar flagged, a sample without its image), the DALL-E 3 parquet with empty
    captions, ShareGPT-4o-Image's folder with a record whose image is in no part."""
    from pipelines.sources.blip3o import FLAGGED

    blip = tmp_path / "BLIP3o-60k"
    for i, name in enumerate(BLIP3O_TARS):
        write_tar(blip / name, wds_members([(f"{i:06d}", {"jpg": encode(smooth_image(40 + i), "JPEG"), "txt": f"a scene from {name}"})]))
    write_tar(blip / "geneval_train.tar", wds_members([
        ("000001", {"jpg": encode(smooth_image(60), "JPEG"), "txt": "a photo of a bench"}),
        ("000002", {"txt": "a photo of two cats"}),
    ]))
    dalle = write_dalle3_release(tmp_path / "dalle-3-dataset", [
        {"image": encode(smooth_image(61)), "caption": "a red fox in snow", "synthetic_caption": "a fox"},
        {"image": encode(smooth_image(62)), "caption": "", "synthetic_caption": "a lighthouse at dusk"},
        {"image": encode(smooth_image(63)), "caption": "", "synthetic_caption": ""},
    ])
    share = write_sharegpt_release(tmp_path / "ShareGPT-4o-Image", [
        (0, "a robot reading a book", encode(smooth_image(64))), (1, "x" * 300, encode(smooth_image(65))),
        (2, "lost image", None), (3, "five yellow balloons", encode(smooth_image(66)))])
    cfg = _config(world, tmp_path / "out", concurrency=2)
    cfg["sources"] = {"blip3o": {"paths": [str(blip)]}, "dalle3": {"paths": [str(dalle)]},
                      "sharegpt4o": {"folder": str(share)}}
    cfg["shard_rows"] = 100
    logs = []
    curate(from_dict(CurateConfig, cfg), log=logs.append)
    log = "\n".join(logs)

    stats = manifest.read(str(tmp_path / "out")).stats
    assert stats["contamination"]["flagged_files"] == [
        {"file": "blip3o/geneval_train.tar", "rows_read": 2, "rows_kept": 1, "why": FLAGGED["geneval_train.tar"]}]
    assert stats["caption_fallback"] == {"dalle3.synthetic_caption": {"read": 1, "kept": 1}}
    assert stats["releases"] == {"blip3o_tars": {"missing": [], "other": []}}
    dropped = {(r["source"], r["key"]): (r["reason"], r["detail"])
               for r in pq.read_table(tmp_path / "out" / manifest.DROPPED_NAME).to_pylist()}
    assert dropped == {
        ("blip3o", "000002"): ("image_missing", "geneval_train.tar: sample 000002 has no image member (000002.jpg); members: 000002.txt"),
        ("dalle3", "000000002"): ("caption_empty", None),
        ("sharegpt4o", "image/1.png"): ("caption_too_long", "301 tokens"),
        ("sharegpt4o", "image/2.png"): ("image_missing", "image/2.png: in no archive of text_to_image_part_*.tar"),
    }
    kept = {(r["source"], r["key"]): r["caption"] for r in _rows(tmp_path / "out")}
    assert len(kept) == 11 + 2 + 2 and kept[("dalle3", "000000001")] == "a lighthouse at dusk"
    assert "flagged: blip3o/geneval_train.tar (2 rows read, 1 kept)" in log
    assert "caption fallback: 1 dalle3 rows with an empty caption took synthetic_caption (1 kept)" in log


def test_curate_survives_losing_a_node_mid_run(world, builds, two_nodes, tmp_path):
    """`minit2i curate` on a 2-node cluster whose worker node's raylet is killed once the first shard
    is written: Ray Data reruns the lost work on the surviving node and the build is byte-identical
    to the local one (shards are a pure function of the inputs and config, so a rewritten shard is
    the same bytes), with nothing missing and nothing stray."""
    import yaml

    from tests.conftest import kill_node_mid_run

    a, _, _ = builds
    out = tmp_path / "c"
    cfg = _config(world, out, blocks=0, concurrency=2, batch_size=1, read_rows=1)
    (tmp_path / "curate.yaml").write_text(yaml.safe_dump(cfg))
    out.mkdir()
    done, seen = kill_node_mid_run(two_nodes, ["curate", "--config", str(tmp_path / "curate.yaml")], out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len([n for n in seen if n.startswith("shard-")]) < 8, "every shard was written before the kill; the test proved nothing"
    ma, mc = manifest.read(str(a)), manifest.read(str(out))
    assert [(s.path, s.sha256) for s in mc.shards] == [(s.path, s.sha256) for s in ma.shards]
    for name in [s.path for s in ma.shards] + [manifest.DROPPED_NAME]:
        assert (out / name).read_bytes() == (a / name).read_bytes(), name
    assert manifest.verify(str(out)) == [] and manifest.strays(str(out)) == []
