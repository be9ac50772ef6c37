"""pipelines/fetch.py and pipelines/url_safety.py against a real HTTP server on 127.0.0.1 and real Ray.
No packet goes anywhere but 127.0.0.0/8. Fetching to S3 is tested end to end in test_recaption.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import fetch, manifest, storage
from pipelines.url_safety import AllowList, address_refusal
from tests.conftest import OUTAGE, ROOT, run_cli, stderr_with
from tests.pipelines.conftest import ImageServer
from tests.pipelines.sources.layouts import (encode, smooth_image, wds_members, write_cc12m_wds, write_llava_captions,
                                             write_reference_metadata, write_tar)

# --- the address policy, checked on the function: nothing is ever sent to these addresses ---------


@pytest.mark.parametrize("address, reason", [
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.20", "private"),
    ("169.254.169.254", "metadata"),
    ("169.254.170.2", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("100.100.100.200", "metadata"),
    ("169.254.1.1", "link_local"),
    ("fe80::1", "link_local"),
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("fd00::1", "private"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("100.64.0.1", "reserved"),
    ("::ffff:10.0.0.1", "private (via ::ffff:a00:1)"),
    ("2002:a9fe:a9fe::", "metadata (via 2002:a9fe:a9fe::)"),
    ("64:ff9b::7f00:1", "loopback (via 64:ff9b::7f00:1)"),
    ("8.8.8.8", None),
    ("2606:4700::1111", None),
])
def test_address_refusal(address, reason):
    assert address_refusal(address) == reason


def test_allow_list_names_and_cidrs():
    allow = AllowList.parse(["127.0.0.1", "10.1.0.0/16", "Images.Example.org", ".cdn.example"])
    assert address_refusal("127.0.0.1", allow) is None
    assert address_refusal("127.0.0.2", allow) == "loopback"        # allowing one address allows only it
    assert address_refusal("10.1.2.3", allow) is None
    assert address_refusal("10.2.0.1", allow) == "private"
    assert address_refusal("::ffff:127.0.0.1", allow) is None        # the same host written as IPv6
    assert allow.allows_name("images.example.org.") and allow.allows_name("a.cdn.example")
    assert not allow.allows_name("example.org")
    with pytest.raises(ValueError, match="neither a host name nor a CIDR"):
        AllowList.parse(["10.0.0.0/99"])


# --- input layouts -----------------------------------------------------------------------------


def test_input_layouts(tmp_path):
    cfg = fetch.FetchConfig()
    # The published CC12M list: TSV, no header, url<TAB>caption, bare quotes in captions; no training caption.
    (tmp_path / "cc12m.tsv").write_text('http://a/1.jpg\ta "quoted" <PERSON> caption\nhttp://a/2.jpg\tsecond\n')
    lst = fetch.read_url_list(str(tmp_path / "cc12m.tsv"), cfg)
    assert (lst.url_col, lst.alt_col, lst.caption_col, lst.carry, lst.table.num_rows) == ("url", "caption", None, [], 2)
    assert lst.table.column("caption")[0].as_py() == 'a "quoted" <PERSON> caption'
    # CaptionEmporium's LLaVA-NeXT file: caption_llava is the training caption, `caption` the alt text,
    # only "success" lines are kept, caption_llava_short is carried.
    rows = [{"url": f"http://a/{i}.jpg", "key": f"{i:09d}", "caption": f"alt {i}", "caption_llava": f"long {i}",
             "caption_llava_short": f"short {i}", "status": "success" if i != 1 else "failed_to_download"} for i in range(3)]
    llava = write_llava_captions(tmp_path / "train.jsonl.gz", rows)
    lst = fetch.read_url_list(str(llava), cfg)
    assert (lst.url_col, lst.alt_col, lst.caption_col, lst.carry) == ("url", "caption", "caption_llava", ["caption_llava_short"])
    assert lst.table.column("url").to_pylist() == ["http://a/0.jpg", "http://a/2.jpg"]
    assert lst.skipped == {"status_not_success": 1}
    assert set(lst.table.column_names) == {"url", "caption", "caption_llava", "caption_llava_short", "status"}  # not `key`
    # The reference's parquet of it: its `caption` is the LLaVA caption and there is no alt text.
    ref = write_reference_metadata(tmp_path / "cc12m_llava.parquet", rows)
    lst = fetch.read_url_list(str(ref), cfg)
    assert (lst.alt_col, lst.caption_col, lst.carry) == (None, "caption", ["caption_llava_short"])
    assert lst.table.column("caption").to_pylist() == ["long 0", "long 2"]
    # CSV with a header and quoting.
    (tmp_path / "list.csv").write_text('image_url,caption,other\nhttp://a/1.jpg,"a, b",x\n')
    lst = fetch.read_url_list(str(tmp_path / "list.csv"), cfg)
    assert (lst.url_col, lst.alt_col, lst.carry, lst.table.column("caption")[0].as_py()) == ("image_url", "caption", [], "a, b")
    # Bad input names what and where.
    (tmp_path / "nourl.csv").write_text("link,caption\nhttp://a/1.jpg,x\n")
    with pytest.raises(ValueError, match="nourl.csv has no url column"):
        fetch.read_url_list(str(tmp_path / "nourl.csv"), cfg)
    with pytest.raises(ValueError, match="reserves"):
        fetch.read_url_list(str(llava), fetch.FetchConfig(carry=["url"]))
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        fetch.read_url_list(str(tmp_path / "missing.tsv"), cfg)


# --- hostile server: every row gets the right status, and no forbidden request is made ---------


def _hostile_rows(server, canary) -> list[tuple[str, str, str]]:
    """(url, expected status, expected status_class)."""
    b = server.base
    return [
        (f"{b}/img/1.jpg", "success", "ok"),
        (f"{b}/img/2.png", "success", "ok"),
        (f"{b}/redirect/3.jpg", "success", "ok"),
        (f"{b}/status/404", "failed", "http_404"),
        (f"{b}/status/410", "failed", "http_410"),
        (f"{b}/status/500", "failed", "http_5xx"),
        (f"{b}/status/429", "failed", "http_429"),
        (f"{b}/slow/4.jpg?s=6", "failed", "timeout"),
        (f"{b}/loop/a", "failed", "redirect_loop"),
        (f"{b}/redirect-forbidden", "refused", "forbidden_address"),
        (f"{canary.base}/direct.jpg", "refused", "forbidden_address"),
        (f"{b}/text", "failed", "not_image"),
        (f"{b}/truncated.jpg", "failed", "decode_error"),
        (f"{b}/bomb.png", "refused", "too_many_pixels"),
        (f"{b}/big", "refused", "too_large"),
        (f"{b}/big-declared", "refused", "too_large"),
        (f"{b}/noai.jpg", "refused", "robots_optout"),
        ("file:///etc/passwd", "refused", "forbidden_scheme"),
        ("ftp://127.0.0.1/x.jpg", "refused", "forbidden_scheme"),
        ("", "failed", "bad_url"),
    ]


def _read_dataset(out: str) -> pa.Table:
    m = manifest.read(out)
    tables = []
    for s in m.shards:
        fs, path = storage.resolve(storage.join(out, s.path))
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables)


def test_fetch_hostile_server(ray_session, image_server, canary, tmp_path):
    rows = _hostile_rows(image_server, canary)
    urls = tmp_path / "urls.tsv"
    # Headerless like CC12M (row 0 starts with a URL); the empty-url row is an empty field.
    urls.write_text("".join(f"{u}\tcaption {i}\n" for i, (u, _, _) in enumerate(rows)))
    out = str(tmp_path / "ds")
    cfg = fetch.FetchConfig(urls=str(urls), out=out, shard_size=8, timeout=2.5, max_bytes=200_000,
                            allow_hosts=["127.0.0.1"], threads=8)
    result = fetch.run(cfg)

    table = _read_dataset(out)
    assert table.num_rows == len(rows)
    got = list(zip(table.column("url").to_pylist(), table.column("status").to_pylist(), table.column("status_class").to_pylist()))
    for (url, status, cls), (got_url, got_status, got_cls), err in zip(rows, got, table.column("error").to_pylist()):
        assert (got_url, got_status, got_cls) == (url, status, cls), f"{url}: {err}"
    # Nothing reached the forbidden address, directly or by redirect.
    assert canary.requests == []
    # Success rows: stored image bytes decode to the recorded size, sha256 is of those bytes.
    for r in table.filter(pa.compute.equal(table.column("status"), "success")).to_pylist():
        im = Image.open(io.BytesIO(r["image"]))
        assert im.size == (r["width"], r["height"]) == (96, 64) == (r["original_width"], r["original_height"])
        assert r["sha256"] == hashlib.sha256(r["image"]).hexdigest()
    for r in table.filter(pa.compute.not_equal(table.column("status"), "success")).to_pylist():
        assert r["image"] is None and r["error"]
    # The data contract: column names and types, keys deterministic and zero-padded.
    assert table.schema.names == ["key", "url", "alt_text", "image", "width", "height", "original_width",
                                  "original_height", "sha256", "status", "status_class", "error"]
    assert table.schema.field("width").type == pa.int32() and table.schema.field("image").type == pa.binary()
    assert table.column("key").to_pylist()[:3] == ["000000", "000001", "000002"]
    assert table.column("key")[8].as_py() == "000010"  # shard 1, row 0 (img2dataset's key layout)
    assert table.column("alt_text")[1].as_py() == "caption 1"
    # Every refusal is counted by reason, in the manifest and the printed table.
    stats = manifest.read(out).stats["fetch"]
    assert stats["refusals"] == {"forbidden_address": 2, "forbidden_scheme": 2, "robots_optout": 1,
                                 "too_large": 2, "too_many_pixels": 1}
    assert stats["success"] == 3 and result.images_this_run == 3
    text = fetch.stats_table(result)
    assert "http_404" in text and "images/s" in text and "forbidden_address 2" in text
    assert manifest.verify(out) == []
    # Re-running the finished job fetches nothing and leaves the manifest byte-identical.
    before = storage.read_bytes(storage.join(out, "manifest.json"))
    hits = sum(image_server.hits.values())
    again = fetch.run(cfg)
    assert again.shards_run == 0 and sum(image_server.hits.values()) == hits
    assert storage.read_bytes(storage.join(out, "manifest.json")) == before


def test_fetch_synthetic_world(ray_session, tmp_path):
    """The embedded default's world list (CC12M layout) served on loopback fetches in full."""
    from pipelines.world import URLS_NAME, WorldConfig, WorldServer, write_world

    with WorldServer(WorldConfig(seed=0), n=5) as server:
        write_world(str(tmp_path / "world"), WorldConfig(seed=0), 5, server.base_url)
        cfg = fetch.FetchConfig(urls=str(tmp_path / "world" / URLS_NAME), out=str(tmp_path / "ds"), shard_size=3,
                                allow_hosts=["127.0.0.1"])
        fetch.run(cfg)
    table = _read_dataset(cfg.out)
    captions = [line.split("\t")[1] for line in (tmp_path / "world" / URLS_NAME).read_text().splitlines()]
    assert table.column("status").to_pylist() == ["success"] * 5
    assert table.column("alt_text").to_pylist() == captions


def test_pixel_limit_below_pil_guard(ray_session, image_server, tmp_path):
    """Our own header check, not PIL's bomb guard, refuses an image over max_pixels."""
    urls = tmp_path / "urls.tsv"
    urls.write_text(f"{image_server.base}/img/5.jpg\tok\n")
    cfg = fetch.FetchConfig(urls=str(urls), out=str(tmp_path / "ds"), max_pixels=96 * 64 - 1, allow_hosts=["127.0.0.1"])
    fetch.run(cfg)
    row = _read_dataset(cfg.out).to_pylist()[0]
    assert (row["status"], row["status_class"]) == ("refused", "too_many_pixels")
    assert "96x64 pixels over the limit" in row["error"]


def test_refuses_foreign_folder(ray_session, image_server, tmp_path):
    urls = tmp_path / "urls.tsv"
    urls.write_text(f"{image_server.base}/img/6.jpg\tok\n")
    cfg = fetch.FetchConfig(urls=str(urls), out=str(tmp_path / "ds"), allow_hosts=["127.0.0.1"])
    fetch.run(cfg)
    cfg.image_size = 256  # other settings, same folder: refusing beats mixing shards
    with pytest.raises(ValueError, match="fetched from another URL list or with other settings"):
        fetch.run(cfg)


# --- retry_failed ------------------------------------------------------------------------------


def test_retry_failed_by_status_class(ray_session, canary, tmp_path):
    server = ImageServer(canary.base)  # its own server: "healing" the flaky endpoint is global
    try:
        b = server.base
        lines = [f"{b}/img/{i}.jpg" for i in range(4)]
        lines += [f"{b}/flaky/20.jpg", f"{b}/status/404", f"{b}/countdown/21.jpg?fail=3", f"{b}/status/410"]
        urls = tmp_path / "urls.tsv"
        urls.write_text("".join(f"{u}\tc\n" for u in lines))
        out = str(tmp_path / "ds")
        cfg = fetch.FetchConfig(urls=str(urls), out=out, shard_size=4, allow_hosts=["127.0.0.1"], backoff=0.2,
                                retry_attempts=3)
        fetch.run(cfg)
        first = manifest.read(out)
        assert first.stats["fetch"]["status_class"] == {"http_404": 1, "http_410": 1, "http_5xx": 2, "ok": 4}

        server.heal()
        hits_404 = server.hits["/status/404"]
        t0 = time.monotonic()
        result = fetch.run(cfg, retry_failed=True)
        # The countdown URL failed once in the first pass, then twice more with backoff 0.2s and 0.4s.
        assert server.hits["/countdown/21.jpg"] == 4 and time.monotonic() - t0 >= 0.6
        second = manifest.read(out)
        assert result.shards_run == 1 and result.images_this_run == 2
        assert second.stats["fetch"]["status_class"] == {"http_404": 1, "http_410": 1, "ok": 6}
        assert server.hits["/status/404"] == hits_404            # 404/410 are final: not asked again
        assert first.shards[0] == second.shards[0]               # a shard with nothing to retry is untouched
        assert first.shards[1].sha256 != second.shards[1].sha256
        assert manifest.verify(out) == []
        table = _read_dataset(out)
        assert table.column("status").to_pylist()[4:] == ["success", "failed", "success", "failed"]
    finally:
        server.close()


# --- shard tasks: retried under our control when a worker dies or a task raises ------------------


def _crash_once(flag: str, name: str) -> dict:
    if not os.path.exists(flag):
        open(flag, "w").close()
        os._exit(1)  # the worker process dies mid-task, as in an out-of-memory kill
    return {"shard": name, "fetched_ok": 0}


def _always_fails(name: str) -> dict:
    raise OSError(f"disk full writing {name}")


def _built_but_not_stored(out: str, name: str) -> dict:
    marker = {"shard": name, "rows": 0, "sha256": hashlib.sha256(b"built").hexdigest(), "bytes": 5}
    raise fetch.ShardNotStored(f"fetch: PUT {out}/{name} still failing", (out, name, b"built", marker, {"fetched_ok": 0}))


def test_shard_tasks_are_resubmitted(ray_session, tmp_path, capfd):
    from ray import cloudpickle
    from tqdm import tqdm

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # pytest imports this file as a top-level module

    cfg = fetch.FetchConfig(max_shard_attempts=2, num_cpus=0.5)
    shards = fetch.plan_shards(2, 1)
    with tqdm(disable=True) as bar:
        done, failed = fetch.run_shard_tasks(cfg, [(s, (str(tmp_path / s.name), s.name)) for s in shards], _crash_once, bar)
    assert failed == [] and sorted(m["shard"] for m in done) == ["shard-00000.parquet", "shard-00001.parquet"]
    with tqdm(disable=True) as bar:
        done, failed = fetch.run_shard_tasks(cfg, [(shards[0], (shards[0].name,))], _always_fails, bar)
    assert done == [] and len(failed) == 1 and "disk full writing shard-00000.parquet" in failed[0]
    assert "storage: shard-00000.parquet attempt 1 failed (OSError: disk full writing shard-00000.parquet); resubmitting in" \
        in capfd.readouterr().err                                      # the task's own error, not RayTaskError
    # A shard built but not stored within the budget: the next attempt uploads its bytes, downloads nothing.
    with tqdm(disable=True) as bar:
        done, failed = fetch.run_shard_tasks(cfg, [(shards[0], (str(tmp_path / "up"), shards[0].name))], _built_but_not_stored, bar)
    assert failed == [] and done[0]["shard"] == shards[0].name and done[0]["fetched_ok"] == 0
    assert (tmp_path / "up" / shards[0].name).read_bytes() == b"built"
    assert json.loads((tmp_path / "up" / fetch.COMMIT_DIR / "shard-00000.json").read_text())["bytes"] == 5
    assert "uploading its built bytes in" in capfd.readouterr().err


# --- kill -9 mid-run, then resume: same shards as an uninterrupted run --------------------------


def test_killed_fetch_resumes_to_identical_shards(ray_session, image_server, tmp_path):
    b = image_server.base
    # Shard 0 is quick; shards 1 and 2 wait on slow responses, so the kill lands mid-run.
    lines = [f"{b}/img/{i}.jpg" for i in range(4)]
    lines += [f"{b}/slow/{i}.jpg?s=2" if i % 2 else f"{b}/img/{i}.jpg" for i in range(4, 12)]
    urls = tmp_path / "urls.tsv"
    urls.write_text("".join(f"{u}\tcaption {i}\n" for i, u in enumerate(lines)))
    # One shard task at a time: each CLI run is a new Ray job with fresh workers, and every worker
    # pays img2dataset's import once; one worker keeps the test short on a 2-core machine.
    args = ["shard_size=4", "allow_hosts=[127.0.0.1]", "timeout=5", "max_in_flight=1"]

    # The CLI joins the test's Ray instance (RAY_ADDRESS), as a job submitted to a cluster would.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "fetch", str(urls), killed, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        first_marker = os.path.join(killed, fetch.COMMIT_DIR, "shard-00000.json")
        while not os.path.exists(first_marker):
            assert proc.poll() is None, "fetch exited before its first shard committed"
            assert time.monotonic() < deadline, "no shard committed within 120s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not os.path.exists(os.path.join(killed, "manifest.json"))   # never looks complete
    committed = os.listdir(os.path.join(killed, fetch.COMMIT_DIR))
    assert len(committed) < 3, "the run finished before it was killed; the test proved nothing"

    # The resume names the cluster with --address instead: the same join.
    resumed = run_cli("fetch", urls, killed, "--address", env["RAY_ADDRESS"], *args, env={"RAY_ADDRESS": ""}, timeout=300)
    assert "skipped (committed) " in resumed.stdout

    clean = str(tmp_path / "clean")
    fetch.run(fetch.FetchConfig(urls=str(urls), out=clean, shard_size=4, allow_hosts=["127.0.0.1"], timeout=5, max_in_flight=1))
    a, b_ = manifest.read(killed), manifest.read(clean)
    assert [(s.path, s.sha256) for s in a.shards] == [(s.path, s.sha256) for s in b_.shards]
    assert storage.read_bytes(os.path.join(killed, "manifest.json")) == storage.read_bytes(os.path.join(clean, "manifest.json"))
    assert manifest.verify(killed) == []


def test_encoder_settings_are_checked_before_any_shard_runs(tmp_path):
    from pipelines.fetch import FetchConfig, check_encoding

    check_encoding(FetchConfig(encode_format="png", encode_quality=9))
    with pytest.raises(ValueError, match="encode_quality 95 out of range for png: it is the zlib compression level, 0..9"):
        check_encoding(FetchConfig(encode_format="png", encode_quality=95))
    with pytest.raises(ValueError, match="encode_format 'gif'"):
        check_encoding(FetchConfig(encode_format="gif"))


# --- the cc12m-wds mirror: imported into the same shards, no download -----------------------------


def test_wds_import_keeps_the_mirror_and_counts_every_damaged_sample(ray_session, cc12m_mirror, tmp_path):
    import shutil

    mirror = tmp_path / "mirror"
    shutil.copytree(cc12m_mirror["root"], mirror)
    out = str(tmp_path / "ds")
    cfg = fetch.FetchConfig(wds=str(mirror / "cc12m-train-{0000..0002}.tar"), out=out, max_in_flight=2)
    result = fetch.run(cfg)

    table = _read_dataset(out)
    assert table.schema == fetch.shard_schema([])  # exactly a URL fetch's columns and types
    samples, keys = cc12m_mirror["samples"], table.column("key").to_pylist()
    assert keys == ["000000000", "000000001", "000000002", "000100000", "000100002",
                    "000200000", "000200001", "000200002", "000200003", "000200004"]
    got = {r["key"]: r for r in table.to_pylist()}
    assert {k: (r["status"], r["status_class"]) for k, r in got.items() if r["status"] != "success"} == {
        "000200001": ("failed", "image_missing"), "000200002": ("failed", "decode_error"),
        "000200004": ("failed", "tar_error")}
    for k in ("000000000", "000100002", "000200000"):  # the mirror's bytes, not a re-encode; its url, alt text, sizes
        r = got[k]
        assert r["image"] == samples[k]["image"] and r["sha256"] == hashlib.sha256(r["image"]).hexdigest()
        assert (r["url"], r["alt_text"]) == (samples[k]["url"], samples[k]["caption"])
        assert (r["width"], r["height"], r["original_width"], r["original_height"]) == (96, 64, 960, 640)
    assert got["000200001"]["error"] == ("cc12m-train-0002.tar: sample 000200001 has no image member (000200001.jpg); "
                                         "members: 000200001.json, 000200001.txt")
    assert got["000200003"]["url"] is None and got["000200003"]["alt_text"] == samples["000200003"]["caption"]
    assert got["000200003"]["error"].startswith("cc12m-train-0002.tar: 000200003.json unreadable")
    broken = "cc12m-train-0002.tar: ReadError: unexpected end of data @ cc12m-train-0002.tar"
    assert got["000200004"]["error"] == broken

    m = manifest.read(out)
    assert [(e.path, e.sha256) for e in m.inputs] == [
        (str(mirror / f"cc12m-train-000{i}.tar"), hashlib.sha256((mirror / f"cc12m-train-000{i}.tar").read_bytes()).hexdigest())
        for i in range(3)]
    assert m.stats["fetch"]["damaged_tars"] == [broken] and m.stats["fetch"]["success"] == 7
    assert f"damaged tar (rows before the damage kept): {broken}" in fetch.stats_table(result)
    assert manifest.verify(out) == []

    # Resumable and byte-identical: a lost shard is imported again to the same bytes.
    before = storage.read_bytes(storage.join(out, "manifest.json"))
    storage.delete(storage.join(out, "shard-00001.parquet"))
    storage.delete(storage.join(out, fetch.COMMIT_DIR, "shard-00001.json"))
    again = fetch.run(cfg)
    assert (again.shards_run, again.shards_skipped) == (1, 2)
    assert storage.read_bytes(storage.join(out, "manifest.json")) == before
    # The folder form names the same tars; the mirror's README.md and _info.json are not read.
    folder = fetch.run(fetch.FetchConfig(wds=str(mirror), out=str(tmp_path / "ds2"), max_in_flight=2))
    assert [s.sha256 for s in manifest.read(folder.manifest_uri.rsplit("/", 1)[0]).shards] == [s.sha256 for s in m.shards]

    with pytest.raises(ValueError, match="nothing to retry"):
        fetch.run(cfg, retry_failed=True)
    with (mirror / "cc12m-train-0000.tar").open("ab") as f:  # the tar changed after its shard was committed
        f.write(bytes(1024))
    with pytest.raises(ValueError, match=r"cc12m-train-0000\.tar changed since shard-00000\.parquet was imported from it"):
        fetch.run(cfg)


# --- cloud faults: an S3 outage mid-run, dropped writes, a reader watching, an outage past the budget


class _ManifestWatcher:
    """Polls the bucket straight from the server (not through the faults) while a job runs; records
    any moment a manifest was visible whose shards were missing or differed from it."""

    def __init__(self, endpoint: str, prefix: str):
        import threading

        self.s3 = boto3_client(endpoint)
        self.prefix, self.seen, self.bad = prefix, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(20_000):                       # bounded; stopped by the test long before
            if self.stop.wait(0.2):
                return
            self.look()

    def look(self) -> None:
        try:
            text = self.s3.get_object(Bucket="test-bucket", Key=f"{self.prefix}/manifest.json")["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return
        self.seen += 1
        for s in manifest.Manifest.from_json(text.decode()).shards:
            try:
                data = self.s3.get_object(Bucket="test-bucket", Key=f"{self.prefix}/{s.path}")["Body"].read()
            except self.s3.exceptions.NoSuchKey:
                self.bad.append(f"{s.path} missing")
                continue
            if hashlib.sha256(data).hexdigest() != s.sha256:
                self.bad.append(f"{s.path} differs")

    def __enter__(self) -> "_ManifestWatcher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.look()                                   # and once as the job left it: the manifest is written last


def boto3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def test_fetch_to_s3_rides_out_an_outage_and_resumes_past_the_budget(ray_session, image_server, s3_server, s3_faults,
                                                                       s3_moto, tmp_path, capfd, monkeypatch):
    from jobs.cli import main
    from pipelines.retry import EXIT_RESUMABLE

    urls = tmp_path / "urls.tsv"
    urls.write_text("".join(f"{image_server.base}/img/{i}.jpg\tcaption {i}\n" for i in range(6)))
    args = ["shard_size=2", "allow_hosts=[127.0.0.1]", "timeout=5", "max_in_flight=1", "threads=2"]
    out = "s3://test-bucket/faults/fetch"
    hits = sum(image_server.hits.values())
    try:
        # OUTAGE seconds of SlowDown from shard 1's upload on (within the session's budget), a quarter
        # of the writes cut after they landed; the fetch finishes, downloading each image once.
        s3_faults.outage_on("shard-00001.parquet", OUTAGE)
        s3_faults.drop_writes(0.25, seed=1)
        with _ManifestWatcher(s3_moto, "faults/fetch") as watcher:
            assert main(["fetch", str(urls), out, *args]) == 0
            recovered = s3_faults.recovery("fetch")
        err = stderr_with(capfd, f"fetch: PUT {out}/shard-00001.parquet")    # the workers' retry lines
        print(recovered)
        assert s3_faults.counters.outage_answers >= 3 and s3_faults.counters.dropped_writes >= 1
        assert f"fetch: PUT {out}/shard-00001.parquet" in err and "SlowDown: Please reduce your request rate." in err
        assert sum(image_server.hits.values()) - hits == 6                # nothing downloaded twice
        assert watcher.seen >= 1 and watcher.bad == []
        assert manifest.verify(out) == [] and manifest.strays(out) == [] and storage.open_uploads(out) == []

        # An outage from the manifest's upload on, longer than a 3 s budget: every shard is committed,
        # so the job fails with the resumable code and the sentence; the same command then finishes.
        s3_faults.clear()
        again = "s3://test-bucket/faults/fetch-again"
        monkeypatch.setenv("MINIT2I_RETRY", "budget=3,first_delay=0.2,max_delay=1")
        s3_faults.outage_on("fetch-again/manifest.json", 8)
        assert main(["fetch", str(urls), again, *args]) == EXIT_RESUMABLE
        err = capfd.readouterr().err
        assert f"minit2i fetch: failed, resumable: fetch: PUT {again}/manifest.json" in err
        assert "run the same command again to resume (exit 75)" in err
        deadline = time.monotonic() + 30
        while s3_faults.in_outage and time.monotonic() < deadline:
            time.sleep(0.2)
        hits = sum(image_server.hits.values())
        assert main(["fetch", str(urls), again, *args]) == 0
        assert sum(image_server.hits.values()) == hits                    # the re-run downloads nothing
        # `out` is not part of what a dataset is: both builds' manifests are byte-identical.
        assert storage.read_bytes(f"{again}/manifest.json") == storage.read_bytes(f"{out}/manifest.json")
        assert storage.open_uploads("s3://test-bucket/faults") == []
    finally:
        s3_faults.clear()


# --- preemption: the node running a shard task vanishes mid-shard ---------------------------------


def test_fetch_survives_losing_a_node_mid_run(two_nodes, image_server, tmp_path):
    """A fetch on a 2-node cluster whose worker node's raylet is killed while its shard downloads:
    the shard is resubmitted (after backoff) to the surviving node, every row lands once, and no shard
    committed before the loss is fetched again."""
    from tests.conftest import kill_node_mid_run

    b = image_server.base
    lines = [f"{b}/slow/{i}.jpg?s=1.5" for i in range(100, 108)]           # 4 shards of 2 slow images
    urls = tmp_path / "urls.tsv"
    urls.write_text("".join(f"{u}\tcaption {i}\n" for i, u in enumerate(lines)))
    out = tmp_path / "ds"
    paths = [u[len(b):].split("?")[0] for u in lines]
    before = {p: image_server.hits[p] for p in paths}
    done, seen = kill_node_mid_run(two_nodes, ["fetch", str(urls), str(out), "shard_size=2", "allow_hosts=[127.0.0.1]",
                                                "timeout=10", "threads=1", "max_in_flight=2"], out / fetch.COMMIT_DIR)
    stderr = done.stderr
    assert done.returncode == 0, stderr[-3000:]
    committed = {name.rsplit(".", 1)[0] for name in seen}
    # The lost shard runs again: Ray's own retry of a task whose node died, or, once those are spent,
    # the job's resubmission after backoff ("resubmitting in"); either way each row lands once below.
    table = _read_dataset(str(out))
    assert table.column("status").to_pylist() == ["success"] * 8                 # nothing lost
    assert manifest.verify(str(out)) == []
    hits = {p: image_server.hits[p] - before[p] for p in paths}
    assert all(n >= 1 for n in hits.values())
    for shard in committed:                                                      # nothing committed redone
        i = int(shard.split("-")[1])
        assert [hits[p] for p in paths[2 * i:2 * i + 2]] == [1, 1], (shard, hits)
