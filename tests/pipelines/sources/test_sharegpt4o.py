"""ShareGPT-4o-Image reader: JSON metadata pointing into PNG tar archives (whole or byte-split)."""

from __future__ import annotations

import pytest

from pipelines.sources import read_unit, sharegpt4o
from tests.pipelines.sources.layouts import encode, smooth_image, write_sharegpt, write_sharegpt_release

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
    missing = sharegpt4o.missing(cfg, {r["key"] for r in rows})
    assert [(m["key"], m["image"], m["origin"], m["note"]) for m in missing] == [
        ("text_to_image/00003.png", None, meta.name, "text_to_image/00003.png: in no archive of sources.sharegpt4o.images")]


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


def test_the_download_folder_as_is(tmp_path):
    pngs = {n: encode(smooth_image(n)) for n in range(4)}
    root = write_sharegpt_release(tmp_path / "ShareGPT-4o-Image", [
        (0, "a lighthouse at dusk", pngs[0]), (1, "three green apples", pngs[1]), (2, "lost image", None),
        (3, "a robot reading", pngs[3])])
    cfg = sharegpt4o.ShareGPT4oConfig(folder=str(root))
    units = sharegpt4o.units(cfg)  # README.md, .gitattributes and the editing subset are left alone
    assert [u.origin for u in units] == ["text_to_image_part_0.tar", "text_to_image_part_1.tar"]
    rows = [r for u in units for r in read_unit(u)]
    assert sorted((r["key"], r["caption"], r["image"] == pngs[int(r["key"][6:-4])]) for r in rows) == [
        ("image/0.png", "a lighthouse at dusk", True), ("image/1.png", "three green apples", True),
        ("image/3.png", "a robot reading", True)]
    missing = sharegpt4o.missing(cfg, {r["key"] for r in rows})
    assert [(m["key"], m["note"]) for m in missing] == [("image/2.png", "image/2.png: in no archive of text_to_image_part_*.tar")]
    with pytest.raises(ValueError, match="give folder, or metadata \\+ images, not both"):
        sharegpt4o.units(sharegpt4o.ShareGPT4oConfig(folder=str(root), metadata=str(root / "text_to_image.json")))
    with pytest.raises(FileNotFoundError, match="has no text_to_image.json"):
        sharegpt4o.units(sharegpt4o.ShareGPT4oConfig(folder=str(tmp_path)))
