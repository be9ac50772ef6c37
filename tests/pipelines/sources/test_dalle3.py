"""DALL-E 3 reader on Parquet in the release layouts (HF image struct, plain binary, URL-only)."""

from __future__ import annotations

import pytest

from pipelines.sources import dalle3, read_unit
from tests.pipelines.sources.layouts import encode, smooth_image, write_dalle3_release, write_parquet


def _rows(path):
    (unit,) = dalle3.units(dalle3.Dalle3Config(paths=[str(path)]))
    dalle3.probe(unit)
    return list(read_unit(unit))


def test_hf_image_struct_and_caption(tmp_path):
    a, b = encode(smooth_image(0)), encode(smooth_image(1), "JPEG")
    path = write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet",
                         {"caption": ["a red car", "", "a blue cat"], "image": [a, None, b], "link": ["u0", "u1", "u2"]},
                         image_as_struct="image")
    rows = _rows(path)
    assert [(r["key"], r["pos"], r["origin"]) for r in rows] == [
        ("000000000", 0, "train-00000-of-00001.parquet"), ("000000001", 1, "train-00000-of-00001.parquet"),
        ("000000002", 2, "train-00000-of-00001.parquet")]
    assert [r["image"] for r in rows] == [a, None, b]
    assert [r["caption"] for r in rows] == ["a red car", "", "a blue cat"]


def test_other_release_names_binary_jpg_and_prompt(tmp_path):
    a = encode(smooth_image(2), "JPEG")
    rows = _rows(write_parquet(tmp_path / "part.parquet", {"prompt": ["p"], "jpg": [a], "text": ["ignored"]}))
    assert rows[0]["image"] == a and rows[0]["caption"] == "p" and rows[0]["url"] is None


def test_url_only_release_gives_rows_without_bytes(tmp_path):
    rows = _rows(write_parquet(tmp_path / "urls.parquet", {"text": ["p"], "link": ["http://127.0.0.1:9/x.png"]}))
    assert rows[0]["image"] is None and rows[0]["url"] == "http://127.0.0.1:9/x.png"


def test_unknown_layout_names_file_and_missing_column(tmp_path):
    path = write_parquet(tmp_path / "weird.parquet", {"description": ["x"], "image": [b"\x89PNG"]})
    (unit,) = dalle3.units(dalle3.Dalle3Config(paths=[str(path)]))
    with pytest.raises(ValueError, match=r"weird\.parquet: unknown dalle3 layout: no caption .*caption, prompt, text.*found description, image"):
        dalle3.probe(unit)
    path = write_parquet(tmp_path / "noimg.parquet", {"caption": ["x"], "meta": ["y"]})
    (unit,) = dalle3.units(dalle3.Dalle3Config(paths=[str(path)]))
    with pytest.raises(ValueError, match=r"noimg\.parquet: unknown dalle3 layout: no image"):
        dalle3.probe(unit)
    path = write_parquet(tmp_path / "strimg.parquet", {"caption": ["x"], "image": ["not bytes"]})
    (unit,) = dalle3.units(dalle3.Dalle3Config(paths=[str(path)]))
    with pytest.raises(ValueError, match=r"strimg\.parquet: image column 'image' has type string"):
        dalle3.probe(unit)


def test_release_layout_falls_back_to_synthetic_caption_per_row(tmp_path):
    a, b, c = (encode(smooth_image(i), "PNG") for i in range(3))
    root = write_dalle3_release(tmp_path / "dalle-3-dataset", [
        {"image": a, "caption": "a red fox in snow", "synthetic_caption": "a fox"},
        {"image": b, "caption": "", "synthetic_caption": "a lighthouse at dusk, oil painting"},
        {"image": c, "caption": "   ", "synthetic_caption": None},
    ])
    (unit,) = dalle3.units(dalle3.Dalle3Config(paths=[str(root)]))  # the README beside data/ is not read
    assert unit.origin == "data/train-00000-of-00063-6ccf42e2874ccd92.parquet"
    dalle3.probe(unit)
    rows = list(read_unit(unit))
    assert [(r["caption"], r["caption_from"]) for r in rows] == [
        ("a red fox in snow", None), ("a lighthouse at dusk, oil painting", "synthetic_caption"), ("   ", None)]
    assert [r["image"] for r in rows] == [a, b, c]
