"""pipelines/recaption.py with a tiny random LLaVA built here and loaded by the real loading code,
on real Ray Data; plus the S3 round trip (fetch -> recaption -> manifest) through the CLI against
a real S3 server on loopback."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.text_encoder import build_tiny_t5, count_tokens, load_tokenizer
from pipelines import fetch, manifest, recaption, storage
from tests.conftest import OUTAGE, ROOT, run_cli, stderr_with
from tests.pipelines.sources.layouts import write_llava_captions

WORDS = "a an the photo picture of red green blue cat dog car tree house sky person on in with and small large image describe this".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_llava(out_dir: Path) -> Path:
    """A random LLaVA (tiny Llama text model + tiny CLIP vision tower) with an offline word-level
    tokenizer and a CLIP image processor, saved with save_pretrained like a hub checkpoint."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    vocab = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.image_token_id, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return build_tiny_llava(root / "llava"), build_tiny_t5(root / "t5")


@pytest.fixture(scope="module")
def fetched(ray_session, image_server, tmp_path_factory):
    """A small fetched dataset: 2 shards, 5 images and one 404."""
    root = tmp_path_factory.mktemp("fetched")
    b = image_server.base
    urls = root / "urls.tsv"
    urls.write_text("".join(f"{u}\talt {i}\n" for i, u in enumerate(
        [f"{b}/img/{i}.jpg" for i in range(3)] + [f"{b}/status/404", f"{b}/img/3.jpg", f"{b}/img/4.png"])))
    out = str(root / "ds")
    fetch.run(fetch.FetchConfig(urls=str(urls), out=out, shard_size=3, allow_hosts=["127.0.0.1"]))
    return out


def _table(root: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(storage.resolve(storage.join(root, s.path))[1],
                                          filesystem=storage.resolve(root)[0]) for s in manifest.read(root).shards)


def test_recaption_generates_and_resumes(ray_session, models, fetched, tmp_path):
    llava, t5 = models
    out = str(tmp_path / "rc")
    cfg = recaption.RecaptionConfig(data=fetched, out=out, model=str(llava), prompt="describe this image",
                                    max_new_tokens=6, batch_size=4, t5_tokenizer=str(t5))
    result = recaption.run(cfg)
    assert (result.shards_run, result.rows_this_run) == (2, 5)

    src, table = _table(fetched), _table(out)
    assert table.column_names == src.column_names + ["caption", "captioner", "caption_prompt_sha256",
                                                     "caption_settings", "caption_t5_tokens"]
    assert table.select(src.column_names).equals(src)  # the fetched rows pass through untouched
    has_image = [img is not None for img in table.column("image").to_pylist()]
    captions = table.column("caption").to_pylist()
    assert [c is not None for c in captions] == has_image == [True, True, True, False, True, True]
    tok = load_tokenizer(str(t5))
    rows = [r for r in table.to_pylist() if r["caption"] is not None]
    assert all(r["caption"] and set(r["caption"].split()) <= set(WORDS) for r in rows)
    assert [r["caption_t5_tokens"] for r in rows] == count_tokens(tok, [r["caption"] for r in rows])
    assert {r["captioner"] for r in rows} == {str(llava)}
    assert {r["caption_prompt_sha256"] for r in rows} == {recaption._prompt_sha(cfg)}
    assert json.loads(rows[0]["caption_settings"]) == {"source": "generate", "max_new_tokens": 6, "do_sample": False,
                                                       "num_beams": 1, "dtype": "auto"}
    m = manifest.read(out)
    assert m.kind == "recaption" and m.stats["recaption"]["captioned"] == 5 and "fetch" in m.stats
    assert m.stats["recaption"]["share_over_prompt_length"] == 0.0
    assert manifest.verify(out) == []
    assert "images/s" in recaption.summary(result)

    # Resume: lose one output shard and its marker; only that shard is captioned again, identically,
    # here with the static KV cache (a speed setting: the same greedy captions, the same run).
    before = {s.path: s.sha256 for s in m.shards}
    storage.delete(storage.join(out, "shard-00001.parquet"))
    storage.delete(storage.join(out, recaption.COMMIT_DIR, "shard-00001.json"))
    again = recaption.run(dataclasses.replace(cfg, cache="static"))
    assert (again.shards_run, again.shards_skipped) == (1, 1)
    assert {s.path: s.sha256 for s in manifest.read(out).shards} == before
    assert recaption.run(cfg).shards_run == 0


def test_recaption_joins_published_captions_by_url(ray_session, models, fetched, image_server, tmp_path):
    """CaptionEmporium's layout onto a URL fetch: its keys are positions of this fetch, so by url."""
    _, t5 = models
    b = image_server.base
    line = lambda n, **kw: {"caption_llava": f"llava {n}", "caption_llava_short": f"short {n}", "caption": f"alt {n}",  # noqa: E731
                            "url": f"{b}/img/{n}.jpg", "key": f"{n:06d}", "status": "success", **kw}
    lines = [line(0, caption_llava="a red cat"), line(0, caption_llava="a later duplicate"),
             line(1, status="failed_to_download", caption_llava=""), {k: v for k, v in line(9).items() if k != "url"},
             line(3, caption_llava="a blue car on the road")]
    jsonl = write_llava_captions(tmp_path / "train.jsonl.gz", lines)
    out = str(tmp_path / "joined")
    cfg = recaption.RecaptionConfig(data=fetched, out=out, from_jsonl=str(jsonl), t5_tokenizer=str(t5), join_rows_per_pass=3)
    result = recaption.run(cfg)
    table = _table(out)
    assert table.column("caption").to_pylist() == ["a red cat", None, None, None, "a blue car on the road", None]
    assert table.column("caption_t5_tokens").to_pylist()[0] == len("a red cat") + 1  # ByT5: bytes + EOS
    # Rows with an image but no caption are skipped by training instead of learning an empty caption.
    assert list(zip(table.column("status").to_pylist(), table.column("status_class").to_pylist())) == [
        ("success", "ok"), ("failed", "no_caption"), ("failed", "no_caption"), ("failed", "http_404"),
        ("success", "ok"), ("failed", "no_caption")]
    assert table.column("captioner")[0].as_py() == f"jsonl:{jsonl}"
    assert table.column("caption_prompt_sha256")[0].as_py() is None
    m = manifest.read(out)
    assert m.inputs[1].path == str(jsonl)  # the joined file is an input, with its hash
    assert m.stats["recaption"]["join"] == {
        "on": "url", "caption_column": "caption_llava", "rows": 6, "joined": 2, "match_rate": 0.333333,
        "url_conflicts": 0, "duplicate_keys": 1, "unmatched_skipped": 3, "lines": 5, "status_skipped": 1,
        "no_key": 1, "no_key_lines": [4], "no_caption": 0, "no_caption_lines": []}
    text = recaption.summary(result)
    assert "joined by url: 2/6 rows (33.33%)" in text and "no url 1 (line 4)" in text

    # The publisher's keys are not this fetch's: joining by key is refused, not silently wrong.
    lines = [line(n, key=f"{n:06d}", url=f"https://elsewhere.example/{n}.jpg") for n in range(6)]
    jsonl = write_llava_captions(tmp_path / "other.jsonl.gz", lines)
    cfg = recaption.RecaptionConfig(data=fetched, out=str(tmp_path / "by-key"), from_jsonl=str(jsonl), join_on="key",
                                    t5_tokenizer=str(t5))
    with pytest.raises(ValueError, match=r"join_on=key matched 0 of 6 rows \(0\.0%, 3 more matched a key whose url differs\)"):
        recaption.run(cfg)
    assert not storage.exists(str(tmp_path / "by-key" / "shard-00000.parquet"))


def test_mirror_joined_by_key_is_what_the_pretrain_config_reads(ray_session, models, cc12m_mirror, tmp_path):
    """cc12m-wds -> fetch wds= -> LLaVA captions joined by the mirror's key -> the b16_pretrain data
    config, unchanged but for its dataset path, reads the LLaVA caption of every usable row."""
    from jobs.train.config import TrainConfig
    from jobs.train.data import ReadRows, build_index
    from pipelines import config as config_lib

    _, t5 = models
    data, out = str(tmp_path / "cc12m"), str(tmp_path / "cc12m-llava")
    fetch.run(fetch.FetchConfig(wds=str(cc12m_mirror["root"]), out=data, max_in_flight=2))
    result = recaption.run(recaption.RecaptionConfig(data=data, out=out, from_jsonl=str(cc12m_mirror["captions"]),
                                                     join_on="key", t5_tokenizer=str(t5)))
    assert "joined by key: 10/10 rows (100.00%)" in recaption.summary(result)

    cfg = config_lib.load(TrainConfig, ROOT / "jobs" / "configs" / "b16_pretrain.yaml", [f"data.datasets=[{out}]"])
    index = build_index(cfg.data)
    rows = ReadRows(index, cfg.data)({"data": np.arange(index.num_rows)})
    usable = ["000000000", "000000001", "000000002", "000100000", "000100002", "000200000", "000200003"]
    assert rows["key"].tolist() == usable
    assert rows["caption"].tolist() == [f"LLaVA caption of {k}" for k in usable]


def test_s3_wds_import_and_join(ray_session, models, cc12m_mirror, s3_server, s3_faults, tmp_path, capfd):
    """The mirror's tars on S3 -> `minit2i fetch wds=...` (the command, joining the test's Ray cluster
    as a job on a cluster would) -> S3 -> the LLaVA captions joined by key -> S3, through the tests'
    outage of SlowDown (OUTAGE, within the retry budget) from the second joined shard's upload on."""
    import boto3

    _, t5 = models
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for tar in sorted(cc12m_mirror["root"].glob("cc12m-train-*.tar")):
        s3.upload_file(str(tar), "test-bucket", f"cc12m-wds/{tar.name}")
    from pipelines.sources import cc12m_wds

    tars = [f"s3://test-bucket/cc12m-wds/cc12m-train-000{i}.tar" for i in range(3)]
    assert [t.uri for t in cc12m_wds.list_tars("s3://test-bucket/cc12m-wds")] == tars  # the prefix form
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    data, out = "s3://test-bucket/cc12m-mirror", "s3://test-bucket/cc12m-mirror-llava"
    proc = run_cli("fetch", "wds=s3://test-bucket/cc12m-wds/cc12m-train-{0000..0002}.tar", f"out={data}",
                   "max_in_flight=2", env=env, timeout=300)
    assert "fetch: 7/10 images" in proc.stdout and f"manifest: {data}/manifest.json" in proc.stdout
    assert [e.path for e in manifest.read(data).inputs] == tars
    s3_faults.outage_on("cc12m-mirror-llava/shard-00001.parquet", OUTAGE)
    try:
        result = recaption.run(recaption.RecaptionConfig(data=data, out=out, from_jsonl=str(cc12m_mirror["captions"]),
                                                         join_on="key", t5_tokenizer=str(t5)))
        recovered = s3_faults.recovery("recaption")
    finally:
        s3_faults.clear()
    line = f"recaption: PUT {out}/shard-00001.parquet"
    assert line in stderr_with(capfd, line)     # the retry line names it
    print(recovered)
    assert "joined by key: 10/10 rows (100.00%)" in recaption.summary(result)
    assert manifest.strays(out) == [] and storage.open_uploads(out) == []
    table = _table(out)
    assert table.column("caption").to_pylist() == [f"LLaVA caption of {k}" for k in table.column("key").to_pylist()]
    assert manifest.verify(out) == [] and manifest.verify(data) == []


def test_recaption_refuses_incomplete_dataset(ray_session, tmp_path):
    (tmp_path / "partial").mkdir()
    cfg = recaption.RecaptionConfig(data=str(tmp_path / "partial"), out=str(tmp_path / "rc"))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        recaption.run(cfg)


def test_s3_fetch_recaption_manifest_roundtrip(ray_session, s3_server, image_server, models, tmp_path, cli):
    """fetch -> recaption -> manifest on S3 (moto server on loopback), every step through the CLI.

    fetch and recaption run as commands that join the session's Ray (RAY_ADDRESS), as jobs on a
    cluster do: its workers started after the S3 server, with its endpoint. The manifest commands
    need no cluster and run in this process. A watcher lists the bucket throughout: the fetched
    dataset must never show a manifest before all its shards exist.
    """
    import boto3

    llava, t5 = models
    b = image_server.base
    rows = [{"url": f"{b}/img/{i}.jpg", "caption": f"alt {i}", "caption_llava": f"llava {i}", "caption_llava_short": f"s{i}"}
            for i in range(4)]
    rows[3]["url"] = f"{b}/slow/3.jpg?s=1.5"  # the last shard finishes late
    urls = tmp_path / "llava.jsonl"
    urls.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, out = "s3://test-bucket/cc12m", "s3://test-bucket/cc12m-llava"
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    s3 = boto3.client("s3", endpoint_url=s3_server)
    snapshots, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            snapshots.append({o["Key"] for o in s3.list_objects_v2(Bucket="test-bucket", Prefix="cc12m/").get("Contents", [])})
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = run_cli("fetch", urls, data, "shard_size=2", "allow_hosts=[127.0.0.1]",
                       "timeout=5", "max_in_flight=1", env=env, timeout=300)
    finally:
        stop.set()
        watcher.join()
    assert f"manifest: {data}/manifest.json" in proc.stdout
    shards = {"cc12m/shard-00000.parquet", "cc12m/shard-00001.parquet"}
    assert any(snap & shards and "cc12m/manifest.json" not in snap for snap in snapshots)  # seen mid-run
    assert all(shards <= snap for snap in snapshots if "cc12m/manifest.json" in snap)
    fetched = _table(data)  # the LLaVA caption is the training caption; the other caption column rides along
    assert fetched.column_names[:5] == ["key", "url", "alt_text", "caption", "caption_llava_short"]
    assert fetched.column("caption").to_pylist() == [f"llava {i}" for i in range(4)]
    assert fetched.column("alt_text").to_pylist() == [f"alt {i}" for i in range(4)]
    assert fetched.column("status").to_pylist() == ["success"] * 4

    proc = run_cli("recaption", data, out, f"model={llava}", f"t5_tokenizer={t5}",
                   "max_new_tokens=4", "prompt=describe this image", "batch_size=2",
                   env=env, timeout=300)
    assert "4/4 rows captioned" in proc.stdout and "images/s" in proc.stdout
    assert all(_table(out).column("caption").to_pylist())

    assert "rows 4" in cli("manifest", "show", out)[1]
    for uri in (data, out):
        code, shown, error = cli("manifest", "verify", uri)
        assert code == 0 and "OK" in shown, (uri, error)
    code, diff, _ = cli("manifest", "diff", data, out)
    assert code == 1 and "kind: fetch -> recaption" in diff and "stats.recaption.captioned" in diff

    for uri in (data, out):  # credentials never reach a manifest
        assert "testing" not in storage.read_bytes(storage.join(uri, "manifest.json")).decode()
