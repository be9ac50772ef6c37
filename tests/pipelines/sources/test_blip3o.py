"""BLIP3o-60K reader on WebDataset tars in the release layout (named tars, category folders)."""

from __future__ import annotations

import pytest

from pipelines.sources import blip3o, read_unit
from tests.pipelines.sources.layouts import BLIP3O_TARS, encode, smooth_image, wds_members, write_tar


def test_reads_named_and_foldered_tars_with_origin(tmp_path):
    png, jpg = encode(smooth_image(0)), encode(smooth_image(1), "JPEG")
    write_tar(tmp_path / "blip3o" / "geneval_train.tar", wds_members([
        ("00000", {"png": png, "txt": "a photo of a red bench"}),
        ("00001", {"jpg": jpg, "txt": "two cats on a sofa"}),
        ("00002", {"jpg": jpg}),                                  # caption missing
    ]))
    write_tar(tmp_path / "blip3o" / "journeydb" / "shards-00000.tar", wds_members([
        ("sub/000", {"txt": "text first, then the image", "png": png}),
    ]))
    units = blip3o.units(blip3o.Blip3oConfig(paths=[str(tmp_path / "blip3o")]))
    assert [u.origin for u in units] == ["geneval_train.tar", "journeydb/shards-00000.tar"]
    for u in units:
        blip3o.probe(u)
    rows = [r for u in units for r in read_unit(u)]
    assert [(r["origin"], r["key"], r["pos"]) for r in rows] == [
        ("geneval_train.tar", "00000", 0), ("geneval_train.tar", "00001", 1), ("geneval_train.tar", "00002", 2),
        ("journeydb/shards-00000.tar", "sub/000", 0),
    ]
    assert rows[0]["image"] == png and rows[1]["image"] == jpg and rows[3]["image"] == png
    assert [r["caption"] for r in rows] == ["a photo of a red bench", "two cats on a sofa", None, "text first, then the image"]
    assert {r["source"] for r in rows} == {"blip3o"}


def test_a_single_tar_path_is_its_own_origin(tmp_path):
    tar = write_tar(tmp_path / "x" / "geneval_train.tar", wds_members([("k", {"png": encode(smooth_image(2)), "txt": "hi"})]))
    (unit,) = blip3o.units(blip3o.Blip3oConfig(paths=[str(tar)]))
    assert unit.origin == "geneval_train.tar"


def test_unknown_layout_names_the_file_and_what_is_missing(tmp_path):
    tar = write_tar(tmp_path / "odd.tar", wds_members([("00000", {"json": "{}", "mp4": b"\x00"})]))
    (unit,) = blip3o.units(blip3o.Blip3oConfig(paths=[str(tar)]))
    with pytest.raises(ValueError, match=r"odd\.tar.*unknown blip3o layout: no image .*jpg, jpeg, png.*found json, mp4"):
        blip3o.probe(unit)


def test_missing_path_and_not_a_tar_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sources.blip3o.paths.*nope"):
        blip3o.units(blip3o.Blip3oConfig(paths=[str(tmp_path / "nope")]))
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive at all" * 40)
    (unit,) = blip3o.units(blip3o.Blip3oConfig(paths=[str(bad)]))
    with pytest.raises(ValueError, match=r"bad\.tar: not a readable tar"):
        blip3o.probe(unit)


def test_the_eleven_release_tars_and_a_sample_without_its_image(tmp_path):
    png = encode(smooth_image(3))
    root = tmp_path / "BLIP3o-60k"
    for name in BLIP3O_TARS:
        write_tar(root / name, wds_members([(f"{name[:-4]}_0", {"jpg": png, "txt": f"a prompt from {name}"})]))
    write_tar(root / "geneval_train.tar", wds_members([
        ("000001", {"jpg": png, "txt": "a photo of a bench"}),
        ("000002", {"txt": "a photo of two cats"}),                      # the image member is missing
    ]))
    (root / "README.md").write_text("# BLIP3o-60k\n")
    units = blip3o.units(blip3o.Blip3oConfig(paths=[str(root)]))
    assert sorted(u.origin for u in units) == sorted(BLIP3O_TARS) == sorted(blip3o.RELEASE_TARS)
    assert blip3o.release_report(units) == {"missing": [], "other": []}
    assert blip3o.release_report(units[:-2]) == {"missing": ["text_1.tar", "text_2.tar"], "other": []}
    rows = list(read_unit(next(u for u in units if u.origin == "geneval_train.tar")))
    assert rows[1]["image"] is None and rows[1]["caption"] == "a photo of two cats"
    assert rows[1]["note"] == "geneval_train.tar: sample 000002 has no image member (000002.jpg); members: 000002.txt"
    assert "geneval_train.tar" in blip3o.FLAGGED
