"""The published caption files, streamed: CaptionEmporium's train.jsonl.gz and the reference's parquet."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from pipelines.sources import captions
from tests.pipelines.sources.layouts import write_llava_captions, write_reference_metadata

ROWS = [
    {"caption_llava": "Two loaves of golden brown bread on a white surface.", "caption_llava_short": "Bread loaves.",
     "caption": "This is the best recipe I have ever tried", "url": "https://a.example/1.jpg", "key": "000000001",
     "status": "success"},
    {"caption_llava": "", "caption_llava_short": "", "caption": "dead link", "url": "https://a.example/2.jpg",
     "key": "000000002", "status": "failed_to_download"},
]


def test_which_column_is_the_training_caption(tmp_path):
    jsonl = write_llava_captions(tmp_path / "train.jsonl.gz", ROWS)
    ref = write_reference_metadata(tmp_path / "cc12m_llava.parquet", ROWS)
    assert captions.fields(str(jsonl)) == ["caption_llava", "caption_llava_short", "caption", "url", "key", "status"]
    assert captions.fields(str(ref)) == ["url", "caption", "caption_llava_short", "key"]
    for for_url_list in (True, False):
        assert captions.training_caption_column(captions.fields(str(jsonl)), for_url_list) == "caption_llava"
        assert captions.training_caption_column(captions.fields(str(ref)), for_url_list) == "caption"
    # The CC12M TSV's `caption` is alt text: a URL list never trains on it; a caption file to join does.
    assert captions.training_caption_column(["url", "caption"], for_url_list=True) is None
    assert captions.training_caption_column(["url", "caption"], for_url_list=False) == "caption"


def test_blocks_keep_line_numbers_and_only_the_wanted_columns(tmp_path):
    lines = ['{"url": "u1", "caption_llava": "one", "extra": [1, 2]}', "", '{"url": "u2", "caption_llava": "two"}',
             "   ", '{"caption_llava": "no url here"}', '{"url": "u4", "key": 4, "caption_llava": "numeric key"}']
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    for block_bytes in (24, 1 << 20):  # a line per block (lines longer than a block) and one block
        blocks = list(captions.iter_blocks(str(path), ["url", "caption_llava", "key"], block_bytes=block_bytes))
        rows = [r for b in blocks for r in b.table.to_pylist()]
        numbers = np.concatenate([b.lines(np.arange(b.table.num_rows)) for b in blocks]).tolist()
        assert rows == [{"url": "u1", "caption_llava": "one", "key": None}, {"url": "u2", "caption_llava": "two", "key": None},
                        {"url": None, "caption_llava": "no url here", "key": None},
                        {"url": "u4", "caption_llava": "numeric key", "key": "4"}]
        assert numbers == [1, 3, 5, 6]
    parquet = write_reference_metadata(tmp_path / "ref.parquet", ROWS)
    (block,) = captions.iter_blocks(str(parquet), ["url", "caption", "status"])
    assert block.table.to_pylist() == [{"url": "https://a.example/1.jpg", "caption": ROWS[0]["caption_llava"], "status": None}]


def test_bad_lines_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"url": "u1"}\n{"url": "u2"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        list(captions.iter_blocks(str(path), ["url"]))
    path.write_text('\n["a list"]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: a JSON list, not an object"):
        captions.fields(str(path))
    with pytest.raises(FileNotFoundError, match="missing.jsonl.gz does not exist"):
        captions.fields(str(tmp_path / "missing.jsonl.gz"))
