"""ShareGPT-4o-Image reader: JSON metadata pointing into PNG tar archives (whole or byte-split)."""

from __future__ import annotations

import pytest

from pipelines.sources import read_unit, sharegpt4o
from tests.pipelines.sources.layouts import encode, smooth_image, write_sharegpt

RECORDS = [
    {"input_prompt": "a lighthouse at dusk", "output_image": "text_to_image/00001.png", "id": 1},
    {"input_prompt": "three green apples", "output_image": "text_to_image/00002.png", "id": 2},
    {"input_prompt": "no image for me", "output_image": "text_to_image/00003.png", "id": 3},
]


def _archives():
    a, b, c = (encode(smooth_image(i)) for i in range(3))
    return {
        "part-0.tar": [("./text_to_image/00001.png", a), ("text_to_image/unlisted.png", c)],
        "part-1.tar.gz": [("ShareGPT-4o-Image/text_to_image/00002.png", b)],
    }, a, b


@pytest.mark.parametrize("jsonl,split", [(False, 0), (True, 3)])
def test_metadata_joins_images_across_archives(tmp_path, jsonl, split):
    archives, a, b = _archives()
    meta, images = write_sharegpt(tmp_path, RECORDS, archives, jsonl=jsonl, split_parts=split)
    cfg = sharegpt4o.ShareGPT4oConfig(metadata=str(meta), images=[str(images)])
    units = sharegpt4o.units(cfg)
    assert [u.origin for u in units] == ["part-0.tar", "part-1.tar.gz"]
    if split:
        assert [len(u.uris) for u in units] == [3, 3]  # byte-split parts joined back into one stream
    for u in units:
        sharegpt4o.probe(u)
    rows = [r for u in units for r in read_unit(u)]
    assert [(r["origin"], r["key"], r["caption"]) for r in rows] == [
        ("part-0.tar", "text_to_image/00001.png", "a lighthouse at dusk"),
        ("part-1.tar.gz", "text_to_image/00002.png", "three green apples"),
    ]
    assert rows[0]["image"] == a and rows[1]["image"] == b
    missing = sharegpt4o.missing(str(meta), {r["key"] for r in rows})
    assert [(m["key"], m["image"], m["origin"]) for m in missing] == [("text_to_image/00003.png", None, meta.name)]


def test_unknown_metadata_layout_names_file_and_field(tmp_path):
    meta, images = write_sharegpt(tmp_path, [{"question": "x", "output_image": "a.png"}], {"p.tar": []})
    (unit,) = sharegpt4o.units(sharegpt4o.ShareGPT4oConfig(metadata=str(meta), images=[str(images)]))
    with pytest.raises(ValueError, match=r"text_to_image\.json: unknown sharegpt4o layout: no caption .*input_prompt.*found output_image, question"):
        sharegpt4o.probe(unit)
    meta.write_text('[{"input_prompt": "x", "output_image": "a.png"}, {"input_prompt": "y"}]')
    with pytest.raises(ValueError, match=r"text_to_image\.json: record 1 has no 'output_image' field"):
        sharegpt4o.probe(unit)


def test_parts_that_are_not_archives_and_half_configs_are_errors(tmp_path):
    meta, images = write_sharegpt(tmp_path, RECORDS, {"p.tar": []})
    (images / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt is neither a tar archive"):
        sharegpt4o.units(sharegpt4o.ShareGPT4oConfig(metadata=str(meta), images=[str(images)]))
    with pytest.raises(ValueError, match="sharegpt4o.images .* is empty"):
        sharegpt4o.units(sharegpt4o.ShareGPT4oConfig(metadata=str(meta)))
