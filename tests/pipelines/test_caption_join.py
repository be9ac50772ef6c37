"""pipelines/caption_join.py on CaptionEmporium-layout files: the join policy, line by line."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines import caption_join
from tests.pipelines.sources.layouts import write_llava_captions, write_reference_metadata


def line(n: int, **kw) -> dict:
    row = {"caption_llava": f"llava {n}", "caption_llava_short": f"short {n}", "caption": f"alt {n}",
           "url": f"https://img.example/{n}.jpg", "key": f"{n:09d}", "status": "success"}
    return {**row, **kw}


LINES = [
    line(0),
    line(1, status="failed_to_download", caption_llava=""),   # 2: not a success line
    line(2),
    {k: v for k, v in line(3).items() if k != "url"},          # 4: no url
    line(2, caption_llava="a later duplicate of line 3"),      # 5: repeats line 3's url
    line(4, caption_llava="  "),                              # 6: empty caption
    line(5),
]


def _shards(rows_by_shard: dict[str, list[int]], key_of=lambda n: f"{n:09d}") -> dict[str, pa.Table]:
    return {name: pa.table({"key": [key_of(n) for n in ns], "url": [f"https://img.example/{n}.jpg" for n in ns]})
            for name, ns in rows_by_shard.items()}


def test_join_by_url_first_line_wins_and_skips_are_counted(tmp_path):
    path = write_llava_captions(tmp_path / "train.jsonl.gz", LINES)
    spec = caption_join.resolve(str(path), "url", "auto", "success", "first")
    assert spec.caption == "caption_llava"
    joined, counts = caption_join.join_pass(spec, _shards({"a": [0, 1, 2], "b": [3, 9, 5, 2, 4]}))
    assert joined["a"].captions.to_pylist() == ["llava 0", None, "llava 2"]
    assert joined["b"].captions.to_pylist() == [None, None, "llava 5", "llava 2", None]
    assert joined["a"].stats == {"rows": 3, "joined": 2, "url_conflicts": 0, "duplicate_keys": 1}
    assert joined["b"].stats == {"rows": 5, "joined": 2, "url_conflicts": 0, "duplicate_keys": 1}
    assert counts.to_dict() == {"lines": 7, "status_skipped": 1, "no_key": 1, "no_key_lines": [4],
                                "no_caption": 1, "no_caption_lines": [6]}

    with pytest.raises(ValueError, match=r"train\.jsonl\.gz:5: url 'https://img.example/2.jpg' repeats line 3"):
        caption_join.join_pass(caption_join.resolve(str(path), "url", "auto", "success", "error"), _shards({"a": [2]}))


def test_join_by_key_refuses_matches_whose_urls_differ(tmp_path):
    path = write_llava_captions(tmp_path / "train.jsonl.gz", LINES)
    spec = caption_join.resolve(str(path), "key", "caption_llava_short", "success", "first")
    same, _ = caption_join.join_pass(spec, _shards({"a": [0, 5]}))
    assert same["a"].captions.to_pylist() == ["short 0", "short 5"]
    # Positional keys of another run: the keys exist in the file but name other images.
    other, _ = caption_join.join_pass(spec, _shards({"a": [0, 5]}, key_of=lambda n: f"{5 - n:09d}"))
    assert other["a"].captions.to_pylist() == [None, None]
    assert other["a"].stats["url_conflicts"] == 2 and other["a"].stats["joined"] == 0


def test_reference_parquet_joins_its_caption_and_bad_settings_are_named(tmp_path):
    ref = write_reference_metadata(tmp_path / "cc12m_llava.parquet", LINES)
    spec = caption_join.resolve(str(ref), "url", "auto", "success", "first")
    assert spec.caption == "caption" and not spec.has_status
    joined, counts = caption_join.join_pass(spec, _shards({"a": [0, 2]}))
    assert joined["a"].captions.to_pylist() == ["llava 0", "llava 2"] and counts.lines == 6
    with pytest.raises(ValueError, match=r"has no caption column 'caption_llava' \(fields: url, caption, caption_llava_short, key\)"):
        caption_join.resolve(str(ref), "url", "caption_llava", "success", "first")
    with pytest.raises(ValueError, match="join_on must be url or key"):
        caption_join.resolve(str(ref), "id", "auto", "success", "first")


def test_passes_group_consecutive_shards():
    rows = {"s0": 3, "s1": 3, "s2": 5, "s3": 1}
    assert caption_join.passes(list(rows), rows, 6) == [["s0", "s1"], ["s2", "s3"]]
    assert caption_join.passes(list(rows), rows, 1) == [["s0"], ["s1"], ["s2"], ["s3"]]
