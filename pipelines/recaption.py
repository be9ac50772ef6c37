"""Re-caption a fetched dataset with a VLM (Ray Data actor pool), or join published recaptions.

    fetched shards --read_parquet--> map_batches(Captioner, actor pool) --> (key, caption) stream
                                                              driver --> Ray task per finished shard:
                                              input shard + captions + T5 token counts --> out shard + marker
                                                                                       ... --> manifest (last)

MiniT2I pretrains on CC12M re-captioned by a VLM (PixArt-alpha: dense VLM captions raise concept
density); the published LLaVA-NeXT captions (CaptionEmporium/conceptual-captions-cc12m-llavanext)
came from llama3-llava-next-8b, the default here. `from_jsonl` joins such a file instead of
generating (pipelines/caption_join.py): streamed in passes, never loaded whole, by `url` by default
(fetched shards key rows by position, the publisher by its own img2dataset run, so keys agree only
for the cc12m-wds mirror the captions were made from: `join_on=key` says so, and is refused when
too few rows match with agreeing urls). `caption_llava` becomes `caption`, the column training
reads; rows the file has no caption for are marked status "failed"/"no_caption" so training skips
them rather than learning an empty caption (`unmatched=keep` leaves them as they were).

Only (key, caption) pairs flow back to the driver; image bytes stay in the object store and the
shard-writing tasks. Ray Data runs with `preserve_order`, so when the first row of shard i+1 arrives,
shard i is complete and can be written: a killed run loses at most the shards in flight.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import caption_join
from pipelines import manifest as manifest_lib
from pipelines import retry, storage
from pipelines.caption_join import JoinedShard

COMMIT_DIR = manifest_lib.COMMIT_DIR
# Config keys that say where or how, not what: not recorded in the manifest.
NOT_RECORDED = ("out", "data", "join_rows_per_pass")
CAPTION_FIELDS = (
    pa.field("caption", pa.string()),
    pa.field("captioner", pa.string()),               # model id/path, or "jsonl:<file>"
    pa.field("caption_prompt_sha256", pa.string()),   # sha256 of the prompt text (null when joined)
    pa.field("caption_settings", pa.string()),        # JSON of the generation settings
    pa.field("caption_t5_tokens", pa.int32()),        # caption length in T5 tokens (with EOS)
)


@dataclass
class RecaptionConfig:
    data: str = ""                      # fetched dataset folder (local or s3://), must have its manifest
    out: str = ""                       # output dataset folder
    model: str = "llava-hf/llama3-llava-next-8b-hf"  # any image-text-to-text model: local dir or hub id
    prompt: str = "Describe this image in detail in one paragraph: the main subjects, their colours, positions and any text."
    max_new_tokens: int = 160
    batch_size: int = 8                 # images per generate() call
    cache: str = "dynamic"              # generate()'s KV cache: dynamic (grows per token) or static (preallocated;
                                        # on a GPU transformers then compiles the decode step). Same captions.
    dtype: str = "auto"                 # auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16
    concurrency: int = 1                # captioning actors
    num_gpus: float = 0.0               # per actor; 0 = CPU
    num_cpus: float = 1.0               # per actor
    t5_tokenizer: str = "google/flan-t5-large"  # for caption_t5_tokens; local dir or hub id
    prompt_length: int = 256            # T5 prompt length in training; the share of longer captions is reported
    from_jsonl: str = ""                # published captions to join instead of generating: CaptionEmporium's
                                        # train.jsonl(.gz), or the reference's metadata parquet
    join_on: str = "url"                # url, or key when the file's keys are the shards' (the cc12m-wds mirror's)
    jsonl_caption_col: str = "auto"     # file column that becomes `caption`; auto = caption_llava, else caption
    keep_status: str = "success"        # with a `status` field, only these lines are joined; "" = every line
    duplicates: str = "first"           # a url/key on several lines: first (first line wins, counted) or error
    min_match_rate: float = 0.9         # join_on=key: refused when fewer rows than this match with agreeing urls
    unmatched: str = "skip"             # rows without a joined caption: skip (status failed/no_caption) or keep
    join_rows_per_pass: int = 2_000_000 # shard rows joined per streaming pass over the file (~1.5 KB of memory a row)

    def __post_init__(self):
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"recaption cache must be dynamic or static, got {self.cache!r}")


def _settings(config: RecaptionConfig) -> dict[str, Any]:
    if config.from_jsonl:
        return {"source": "jsonl", "column": config.jsonl_caption_col, "join_on": config.join_on,
                "keep_status": config.keep_status, "duplicates": config.duplicates, "unmatched": config.unmatched}
    return {"source": "generate", "max_new_tokens": config.max_new_tokens, "do_sample": False, "num_beams": 1,
            "dtype": config.dtype}


def _captioner_id(config: RecaptionConfig) -> str:
    return f"jsonl:{config.from_jsonl}" if config.from_jsonl else config.model


def _prompt_sha(config: RecaptionConfig) -> str | None:
    return None if config.from_jsonl else hashlib.sha256(config.prompt.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The stage: one VLM per actor


class Captioner:
    """Ray Data stage: loads the VLM once per actor; `__call__` captions a batch of image bytes.

    Any checkpoint `AutoModelForImageTextToText` knows (LLaVA, LLaVA-NeXT, ...) with its processor.
    Greedy decoding, so a shard captioned twice gets the same captions on the same hardware.
    """

    def __init__(self, model: str, prompt: str, max_new_tokens: int, t5_tokenizer: str, dtype: str = "auto",
                 cache: str = "dynamic"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from model.text_encoder import load_tokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if self.device == "cuda" else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"recaption dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        # transformers' name for it (RecaptionConfig checks the value); None keeps generate()'s default.
        self.cache_implementation = "static" if cache == "static" else None
        self.processor = AutoProcessor.from_pretrained(model)
        # Decoder-only generation over a padded batch needs the padding on the left.
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.t5_tokenizer = load_tokenizer(t5_tokenizer)  # caption length as the T5 text encoder sees it
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if getattr(self.processor, "chat_template", None):
            self.text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        else:  # a processor without a chat template: the bare LLaVA form
            self.text = f"{getattr(self.processor, 'image_token', '<image>')}\n{prompt}"

    def caption(self, images: list) -> list[str]:
        import torch

        inputs = self.processor(images=images, text=[self.text] * len(images), return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                      cache_implementation=self.cache_implementation)
        new = out[:, inputs["input_ids"].shape[1]:]                      # [B, new tokens]: drop the prompt
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        from model.text_encoder import count_tokens

        captions: list[str | None] = [None] * len(batch["key"])
        todo, images = [], []
        for i, data in enumerate(batch["image"]):
            if data is None:  # a failed fetch: nothing to caption
                continue
            try:
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                todo.append(i)
            except Exception:  # noqa: BLE001 - an undecodable image keeps a null caption
                continue
        tokens: list[int | None] = [None] * len(captions)
        if images:
            texts = self.caption(images)
            for i, text, n in zip(todo, texts, count_tokens(self.t5_tokenizer, texts)):
                captions[i], tokens[i] = text, n
        return {"path": batch["path"], "key": batch["key"], "caption": np.array(captions, dtype=object),
                "caption_t5_tokens": np.array(tokens, dtype=object)}


# ---------------------------------------------------------------------------------------------
# Writing one output shard


def _with_captions(table: pa.Table, captions: list[str | None], tokens: list[int | None],
                   config: RecaptionConfig) -> pa.Table:
    has = [c is not None for c in captions]
    values = {
        "caption": captions,
        "captioner": [_captioner_id(config) if h else None for h in has],
        "caption_prompt_sha256": [_prompt_sha(config) if h else None for h in has],
        "caption_settings": [json.dumps(_settings(config), sort_keys=True) if h else None for h in has],
        "caption_t5_tokens": tokens,
    }
    for f in CAPTION_FIELDS:  # a re-recaptioned dataset: the new caption replaces the old one
        if f.name in table.column_names:
            table = table.drop_columns([f.name])
    for f in CAPTION_FIELDS:
        table = table.append_column(f, pa.array(values[f.name], f.type))
    return table


@retry.in_stage("recaption")
def write_shard(config: RecaptionConfig, name: str, generated: dict[str, tuple[str | None, int | None]] | None,
                joined: JoinedShard | None, fingerprint: str) -> dict[str, Any]:
    """Input shard + captions -> output shard, then its marker. Captions come either generated
    (key -> (caption, T5 tokens)) or joined from a published file (T5 tokens counted here)."""
    fs, path = storage.resolve(storage.join(config.data, name))
    table = pq.read_table(path, filesystem=fs)
    extra: dict[str, int] = {}
    if joined is not None:
        from model.text_encoder import count_tokens, load_tokenizer

        if len(joined.captions) != table.num_rows:
            raise ValueError(f"{config.data}/{name} changed since its captions were joined; run again")
        captions = joined.captions.to_pylist()
        texts = [c for c in captions if c is not None]
        counts = iter(count_tokens(load_tokenizer(config.t5_tokenizer), texts) if texts else ())
        tokens = [next(counts) if c is not None else None for c in captions]
        extra = dict(joined.stats)
        if config.unmatched == "skip" and "status" in table.column_names:
            table, extra["unmatched_skipped"] = _skip_unmatched(table, captions, config)
    else:
        keys = table.column("key").to_pylist()
        captions = [generated.get(k, (None, None))[0] for k in keys]
        tokens = [generated.get(k, (None, None))[1] for k in keys]
    table = _with_captions(table, captions, tokens, config)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=256)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(storage.join(config.out, name), data)
    tokens = [t for t in table.column("caption_t5_tokens").to_pylist() if t is not None]
    marker = {
        "shard": name, "rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
        "fingerprint": fingerprint,
        "stats": {"captioned": len(tokens), "over_prompt_length": sum(t > config.prompt_length for t in tokens),
                  "t5_tokens_sum": sum(tokens), **extra},
    }
    if joined is not None:
        marker["caption_file"] = joined.file
    stem = name.rsplit(".", 1)[0]
    storage.write_bytes(storage.join(config.out, COMMIT_DIR, f"{stem}.json"), (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode())
    return marker


def _skip_unmatched(table: pa.Table, captions: list[str | None], config: RecaptionConfig) -> tuple[pa.Table, int]:
    """Mark usable rows without a joined caption status failed / no_caption, so training skips them."""
    status = table.column("status").to_pylist()
    hit = [i for i, (s, c) in enumerate(zip(status, captions)) if s == "success" and c is None]
    if not hit:
        return table, 0
    why = f"no caption for this {config.join_on} in {config.from_jsonl.rsplit('/', 1)[-1]}"
    columns = {"status": "failed", "status_class": "no_caption", "error": why}
    for name, value in columns.items():
        if name in table.column_names:
            values = table.column(name).to_pylist()
            for i in hit:
                values[i] = value
            index = table.schema.get_field_index(name)
            table = table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))
    return table, len(hit)


# ---------------------------------------------------------------------------------------------
# The job


def fingerprint_of(config: RecaptionConfig, input_manifest_sha: str) -> str:
    settings = {"captioner": _captioner_id(config), "prompt": _prompt_sha(config), "settings": _settings(config),
                "t5_tokenizer": config.t5_tokenizer, "input": input_manifest_sha}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _generate(config: RecaptionConfig, todo: list[str], fingerprint: str, progress) -> list[dict[str, Any]]:
    """Caption the shards in `todo` with the actor pool; write each as soon as its rows are all back."""
    import ray

    fs, _ = storage.resolve(config.data)
    uris = [storage.resolve(storage.join(config.data, name))[1] for name in todo]
    ctx = ray.data.DataContext.get_current()
    old_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # shard i is complete once shard i+1 starts
    try:
        # Ray Data pushes the selection down into the Parquet read: only these columns are read.
        ds = ray.data.read_parquet(uris, filesystem=fs, include_paths=True).select_columns(["key", "image", "path"])
        ds = ds.map_batches(
            Captioner,
            fn_constructor_kwargs={"model": config.model, "prompt": config.prompt, "max_new_tokens": config.max_new_tokens,
                                   "t5_tokenizer": config.t5_tokenizer, "dtype": config.dtype, "cache": config.cache},
            batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=config.concurrency),
            num_gpus=config.num_gpus or None, num_cpus=config.num_cpus,
        )
        writer = ray.remote(write_shard).options(num_cpus=min(1.0, config.num_cpus), max_retries=2)
        by_path = {u.rsplit("/", 1)[-1]: name for u, name in zip(uris, todo)}
        order = {name: i for i, name in enumerate(todo)}
        pending: dict[str, dict[str, tuple]] = {name: {} for name in todo}
        refs, running, next_to_flush = [], [], 0

        def flush_until(index: int) -> None:  # shards before `index` in order are complete
            nonlocal next_to_flush, running
            while next_to_flush < index:
                name = todo[next_to_flush]
                ref = writer.remote(config, name, pending.pop(name), None, fingerprint)
                refs.append(ref)
                running.append(ref)
                next_to_flush += 1
            if running:
                done, running = ray.wait(running, num_returns=len(running), timeout=0)
                progress.update(len(done))

        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            columns = [batch.column(c).to_pylist() for c in ("path", "key", "caption", "caption_t5_tokens")]
            for path, key, caption, tokens in zip(*columns):
                name = by_path[path.rsplit("/", 1)[-1]]
                flush_until(order[name])
                pending[name][key] = (caption, tokens)
        flush_until(len(todo))
        markers = ray.get(refs)
        progress.update(len(running))
        return markers
    finally:
        ctx.execution_options.preserve_order = old_order


def _join(config: RecaptionConfig, todo: list[str], rows: dict[str, int], fingerprint: str,
          progress) -> list[dict[str, Any]]:
    """Join the published file in passes over groups of shards; each pass's shards are written by
    Ray tasks before the next pass starts, so memory holds one group's captions at most."""
    import ray

    if config.unmatched not in ("skip", "keep"):
        raise ValueError(f"unmatched must be skip or keep, got {config.unmatched!r}")
    spec = caption_join.resolve(config.from_jsonl, config.join_on, config.jsonl_caption_col, config.keep_status,
                                config.duplicates)
    writer = ray.remote(write_shard).options(num_cpus=min(1.0, config.num_cpus), max_retries=2)
    markers = []
    columns = [config.join_on] + (["url"] if config.join_on == "key" else [])
    for group in caption_join.passes(todo, rows, config.join_rows_per_pass):
        tables = {}
        for name in group:
            fs, path = storage.resolve(storage.join(config.data, name))
            have = pq.read_schema(path, filesystem=fs).names
            if config.join_on not in have:
                raise ValueError(f"join_on column {config.join_on!r} is not in {config.data}/{name} (columns: {', '.join(have)})")
            tables[name] = pq.read_table(path, columns=[c for c in columns if c in have], filesystem=fs)
        joined, counts = caption_join.join_pass(spec, tables)
        n = sum(j.stats["rows"] for j in joined.values())
        hits = sum(j.stats["joined"] for j in joined.values())
        if config.join_on == "key" and n and hits / n < config.min_match_rate:
            conflicts = sum(j.stats["url_conflicts"] for j in joined.values())
            raise ValueError(
                f"join_on=key matched {hits} of {n} rows ({100 * hits / n:.1f}%, {conflicts} more matched a key whose url "
                f"differs) below min_match_rate={config.min_match_rate}: the keys of {config.from_jsonl} and "
                f"{config.data} are not one namespace; join by url (join_on=url)")
        for j in joined.values():
            j.file = {"caption_column": spec.caption, **counts.to_dict()}
        refs = [writer.remote(config, name, None, joined[name], fingerprint) for name in group]
        for ref in refs:
            markers.append(ray.get(ref))
            progress.update(1)
    return markers


@retry.in_stage("recaption")
def run(config: RecaptionConfig) -> manifest_lib.StageResult:
    """Recaption `config.data` into `config.out` (resuming committed shards). Ray must be initialised."""
    from tqdm import tqdm

    if not config.data or not config.out:
        raise ValueError("recaption needs both data (a fetched dataset folder) and out (the output folder)")
    if storage.join(config.data, "") == storage.join(config.out, ""):
        raise ValueError(f"recaption out must differ from data ({config.data}): shards are never rewritten in place")
    start = time.perf_counter()
    source = manifest_lib.read(config.data)  # a dataset without its manifest is incomplete: refuse
    input_entry = manifest_lib.input_entry(storage.join(config.data, manifest_lib.MANIFEST_NAME))
    inputs = [input_entry] + ([manifest_lib.input_entry(config.from_jsonl)] if config.from_jsonl else [])
    fingerprint = fingerprint_of(config, "+".join(i.sha256 for i in inputs))
    names = [s.path for s in source.shards]

    manifest_uri = storage.join(config.out, manifest_lib.MANIFEST_NAME)
    markers = manifest_lib.committed_markers(config.out, fingerprint, "captioned from other inputs or settings")
    todo = [n for n in names if n not in markers]
    if todo:
        storage.delete(manifest_uri)  # not complete until the new manifest is written
    with tqdm(total=len(names), initial=len(names) - len(todo), desc="recaption", unit="shard",
              file=sys.stderr, dynamic_ncols=True, mininterval=0.5) as progress:
        if not todo:
            new = []
        elif config.from_jsonl:
            new = _join(config, todo, {e.path: e.rows or 0 for e in source.shards}, fingerprint, progress)
        else:
            new = _generate(config, todo, fingerprint, progress)
    for m in new:
        markers[m["shard"]] = m
    ordered = [markers[n] for n in names]
    captioned = sum(m["stats"]["captioned"] for m in ordered)
    over = sum(m["stats"]["over_prompt_length"] for m in ordered)
    stats = {
        "rows": sum(m["rows"] for m in ordered), "captioned": captioned,
        "over_prompt_length": over, "share_over_prompt_length": round(over / captioned, 6) if captioned else 0.0,
        "mean_t5_tokens": round(sum(m["stats"]["t5_tokens_sum"] for m in ordered) / captioned, 3) if captioned else 0.0,
        "prompt_length": config.prompt_length, "captioner": _captioner_id(config),
    }
    if config.from_jsonl:
        stats["join"] = _join_stats(config, ordered)
    from pipelines.config import to_dict

    manifest = manifest_lib.Manifest(
        kind="recaption", config={k: v for k, v in to_dict(config).items() if k not in NOT_RECORDED},
        inputs=inputs,
        shards=[manifest_lib.FileEntry(path=m["shard"], sha256=m["sha256"], bytes=m["bytes"], rows=m["rows"]) for m in ordered],
        stats={**source.stats, "recaption": stats},
    )
    uri = manifest_lib.write(config.out, manifest)
    return manifest_lib.StageResult(stats=stats, shards_run=len(new), shards_skipped=len(names) - len(todo),
                           rows_this_run=sum(m["stats"]["captioned"] for m in new),
                           seconds=time.perf_counter() - start, manifest_uri=uri)


def _join_stats(config: RecaptionConfig, ordered: list[dict[str, Any]]) -> dict[str, Any]:
    """The join over the whole dataset, from the shards' markers (so a resumed run records the same)."""
    rows = sum(m["rows"] for m in ordered)
    total = {k: sum(m["stats"].get(k, 0) for m in ordered) for k in ("joined", "url_conflicts", "duplicate_keys", "unmatched_skipped")}
    return {"on": config.join_on, **ordered[0].get("caption_file", {}), "rows": rows, **total,
            "match_rate": round(total["joined"] / rows, 6) if rows else 0.0}


def _named(join: dict[str, Any], what: str) -> str:
    """A skip count with the first lines it names: `2 (lines 4, 9)`, `7 (lines 4, 9, ...)`."""
    n, lines = join.get(what, 0), join.get(f"{what}_lines", [])
    if not lines:
        return str(n)
    more = ", ..." if n > len(lines) else ""
    return f"{n} (line{'s' if n > 1 else ''} {', '.join(map(str, lines))}{more})"


def summary(result: manifest_lib.StageResult) -> str:
    s = result.stats
    speed = result.rows_this_run / result.seconds if result.seconds > 0 else 0.0
    text = (
        f"recaption: {s['captioned']}/{s['rows']} rows captioned by {s['captioner']}\n"
        f"  T5 tokens: mean {s['mean_t5_tokens']}, over {s['prompt_length']}: {s['over_prompt_length']} "
        f"({100 * s['share_over_prompt_length']:.1f}%)\n"
        f"  shards run {result.shards_run}, skipped (committed) {result.shards_skipped}; "
        f"{result.rows_this_run} images in {result.seconds:.1f}s = {speed:.2f} images/s\n"
    )
    j = s.get("join")
    if j:
        text += (
            f"  joined by {j['on']}: {j['joined']}/{j['rows']} rows ({100 * j['match_rate']:.2f}%) took "
            f"{j.get('caption_column')}; url conflicts {j['url_conflicts']}; rows whose {j['on']} repeats in the file "
            f"{j['duplicate_keys']} (first line wins); marked no_caption {j['unmatched_skipped']}\n"
            f"  caption file: {j.get('lines', 0)} lines; skipped: status not kept {j.get('status_skipped', 0)}, "
            f"no {j['on']} {_named(j, 'no_key')}, empty caption {_named(j, 'no_caption')}\n"
        )
    return text
