"""The cc12m-wds reader on tars written by img2dataset's own WebDataset writer (the mirror's maker),
plus damaged tars: a sample without its image member, unreadable JSON, a truncated tar, a non-tar."""

from __future__ import annotations

import hashlib
import json
import tarfile

import pytest

from pipelines.sources import cc12m_wds
from tests.pipelines.sources.layouts import encode, smooth_image, wds_members, write_cc12m_wds, write_tar


def _samples(shard: int, n: int) -> list[dict]:
    return [{"url": f"https://img.example/{shard}/{i}.jpg", "caption": f"alt text {shard}.{i}",
             "image": encode(smooth_image(100 * shard + i, (96, 64)), "JPEG"), "original_size": (960, 640)}
            for i in range(n)]


def test_spec_forms_and_the_mirror_layout(tmp_path):
    shards = [_samples(0, 3), _samples(1, 2)]
    shards[1].insert(1, {**shards[1][0], "image": None, "url": "https://img.example/dead.jpg"})  # failed download
    tars = write_cc12m_wds(tmp_path / "cc12m-wds", shards)
    names = tarfile.open(tars[0]).getnames()
    assert names[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]  # sorted members, 9-digit keys

    brace = cc12m_wds.list_tars(str(tmp_path / "cc12m-wds" / "cc12m-train-{0000..0001}.tar"))
    folder = cc12m_wds.list_tars(str(tmp_path / "cc12m-wds"))  # README.md and _info.json are not tars
    assert [t.name for t in brace] == [t.name for t in folder] == ["cc12m-train-0000.tar", "cc12m-train-0001.tar"]
    assert [t.size for t in folder] == [p.stat().st_size for p in tars]
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 tars .* do not exist \(first: .*cc12m-train-0002\.tar\)"):
        cc12m_wds.list_tars(str(tmp_path / "cc12m-wds" / "cc12m-train-{0000..0002}.tar"))
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        cc12m_wds.list_tars(str(tmp_path / "nowhere"))

    outcome = cc12m_wds.TarRead()
    got = list(cc12m_wds.read_tar(str(tars[1]), outcome))
    assert [s.key for s in got] == ["000100000", "000100002"]  # the failed download left a gap, no member
    assert got[0].image == shards[1][0]["image"] and got[0].text == "alt text 1.0" and got[0].problem is None
    assert got[0].meta == {"caption": "alt text 1.0", "url": "https://img.example/1/0.jpg", "key": "000100000",
                           "status": "success", "error_message": None, "width": 96, "height": 64,
                           "original_width": 960, "original_height": 640, "exif": "{}"}
    assert outcome.error is None and outcome.sha256 == hashlib.sha256(tars[1].read_bytes()).hexdigest()


def test_damaged_members_and_tars(tmp_path):
    good = encode(smooth_image(7, (96, 64)), "JPEG")
    meta = lambda k: json.dumps({"url": f"https://img.example/{k}.jpg", "key": k}, indent=4)  # noqa: E731
    members = wds_members([
        ("000000000", {"jpg": good, "json": meta("000000000"), "txt": "fine"}),
        ("000000001", {"json": meta("000000001"), "txt": "the image member is gone"}),
        ("000000002", {"jpg": good, "json": "{not json", "txt": "bad metadata"}),
        ("000000003", {"jpg": good * 4, "json": meta("000000003"), "txt": "cut off"}),
    ])
    tar = write_tar(tmp_path / "cc12m-train-0000.tar", members)
    outcome = cc12m_wds.TarRead()
    got = list(cc12m_wds.read_tar(str(tar), outcome))
    assert [(s.key, s.image is not None) for s in got] == [("000000000", True), ("000000001", False), ("000000002", True),
                                                           ("000000003", True)]
    assert got[1].problem == ("cc12m-train-0000.tar: sample 000000001 has no image member (000000001.jpg); "
                              "members: 000000001.json, 000000001.txt")
    assert got[2].meta is None and got[2].problem.startswith("cc12m-train-0000.tar: 000000002.json unreadable")

    data = tar.read_bytes()
    cut = data.index(good * 4) + 100  # inside the last sample's image data
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    outcome = cc12m_wds.TarRead()
    got = list(cc12m_wds.read_tar(str(tmp_path / "cut.tar"), outcome))
    assert [s.key for s in got] == ["000000000", "000000001", "000000002"]
    assert outcome.broken_key == "000000003"
    assert outcome.error == "cut.tar: ReadError: unexpected end of data @ cut.tar"
    assert outcome.bytes == cut and outcome.sha256 == hashlib.sha256(data[:cut]).hexdigest()

    (tmp_path / "junk.tar").write_bytes(b"not a tar at all " * 100)
    outcome = cc12m_wds.TarRead()
    assert list(cc12m_wds.read_tar(str(tmp_path / "junk.tar"), outcome)) == []
    assert outcome.error.startswith("junk.tar: ReadError") and outcome.broken_key is None
