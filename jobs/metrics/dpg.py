"""DPG-Bench (Hu et al. 2024, ELLA): dense prompts, yes/no questions with dependencies, a VQA judge.

Two published layouts are read:
  CSV      ELLA's `dpg_bench.csv`, one row per question: item_id, text (the prompt), keywords,
           proposition_id, dependency ("0" = none, else comma-separated parent ids),
           category_broad, category_detailed, tuple ("entity - whole (cat)"),
           question_natural_language;
  Parquet  one row per prompt: item_id, prompt, questions (list of structs proposition_id,
           dependency, category_broad, category_detailed, question).
Scoring follows ELLA's `dpg_bench/compute_dpg_bench.py`:
  - an answer counts when it is exactly "yes" (answers are stripped, lower-cased and lose a final
    "." first, since judges other than mPLUG may add them);
  - in question order, a question with a parent already at 0 is set to 0 (parents updated
    earlier in the pass count: a chain of dependents falls with its root); a parent id that the
    item does not have makes the official script fail on that image, which it then leaves out:
    here it is left out too and counted (`excluded_images`; PeppaKing8/minit2i-jax's port instead
    counts the missing parent as failed and keeps the image);
  - an image scores the mean over its questions, a prompt the mean over its images, the
    benchmark the mean over prompts;
  - category scores pool the answers before the dependency rule, by the tuple's prefix
    ("entity - whole", level 2) and its part before "-" ("entity", level 1). The official script
    takes them from the last of a prompt's images only; here every image counts (the same
    quantity, less noise);
  - the official script skips the CSV's first data row (`if i == 0: continue` after pandas has
    read the header); so does this reader for the CSV, so scores match it. The Parquet is read whole.
The official judge is mPLUG-large (ModelScope `damo/mplug_visual-question-answering_coco_large_en`),
which transformers does not provide; any transformers `AutoModelForVisualQuestionAnswering` folder
(BLIP-VQA, ViLT, ...) judges here, so scores rank models under that judge but are not the
published numbers.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines import storage

CSV_COLUMNS = ("item_id", "text", "proposition_id", "dependency", "tuple", "question_natural_language")
PARQUET_COLUMNS = ("item_id", "prompt", "questions")


@dataclass
class Question:
    id: int
    text: str
    parents: list[int]       # proposition ids answered "yes" first; empty = no parent
    category: str            # level-2 category, e.g. "entity - whole"


@dataclass
class Item:
    prompt: str
    questions: list[Question]


def _ids(value, where: str) -> list[int]:
    """A dependency cell ("0", "1,2", 3, [1, 2]) -> parent ids without the 0 meaning "none"."""
    parts = value if isinstance(value, (list, tuple, np.ndarray)) else str(value).split(",")
    try:
        ids = [int(str(p).strip()) for p in parts]
    except ValueError:
        raise ValueError(f"{where}: dependency {value!r} is not a comma-separated list of proposition ids") from None
    return [i for i in ids if i != 0]


def _add(items: dict[str, Item], item_id: str, prompt: str, qid, dependency, text: str, category: str, where: str) -> None:
    try:
        qid = int(str(qid).strip())
    except ValueError:
        raise ValueError(f"{where}: proposition_id {qid!r} is not an integer") from None
    item = items.setdefault(item_id, Item(prompt, []))
    if any(q.id == qid for q in item.questions):
        raise ValueError(f"{where}: item {item_id} repeats proposition {qid}")
    if not str(text or "").strip():
        raise ValueError(f"{where}: item {item_id} proposition {qid} has no question")
    item.questions.append(Question(qid, str(text).strip(), _ids(dependency, where), category))


def _category(row: dict) -> str:
    if row.get("tuple"):
        return str(row["tuple"]).split("(")[0].strip()
    return " - ".join(str(row[k]).strip() for k in ("category_broad", "category_detailed") if row.get(k))


def _read_csv(uri: str, data: bytes) -> dict[str, Item]:
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{uri} lacks DPG-Bench column(s) {', '.join(missing)}")
    items: dict[str, Item] = {}
    for n, row in enumerate(reader):
        if n == 0:
            continue     # compute_dpg_bench.py prepare_dpg_data skips the first data row
        where = f"{uri}: data row {n + 1}"
        _add(items, str(row["item_id"]).strip(), str(row["text"] or "").strip(), row["proposition_id"],
             row["dependency"], row["question_natural_language"], _category(row), where)
    return items


def _read_parquet(uri: str) -> dict[str, Item]:
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    table = pq.read_table(path, filesystem=fs)
    missing = [c for c in PARQUET_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{uri} lacks DPG-Bench column(s) {', '.join(missing)}")
    items: dict[str, Item] = {}
    for n, row in enumerate(table.select(list(PARQUET_COLUMNS)).to_pylist()):
        for k, q in enumerate(row["questions"] or []):
            where = f"{uri}: row {n} question {k}"
            if not isinstance(q, dict) or "proposition_id" not in q or "dependency" not in q:
                raise ValueError(f"{where}: a question needs proposition_id, dependency and question")
            text = q.get("question", q.get("question_natural_language"))
            _add(items, str(row["item_id"]).strip(), str(row["prompt"] or "").strip(), q["proposition_id"],
                 q["dependency"], text, _category(q), where)
    return items


def load_benchmark(uri: str | Path) -> dict[str, Item]:
    """{item_id: Item} from ELLA's dpg_bench.csv or the nested Parquet (local or s3://), in file order."""
    uri = str(uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"DPG-Bench file {uri} does not exist")
    items = _read_parquet(uri) if uri.lower().endswith(".parquet") else _read_csv(uri, storage.read_bytes(uri))
    if not items:
        raise ValueError(f"DPG-Bench file {uri} holds no questions")
    empty = [i for i, item in items.items() if not item.prompt]
    if empty:
        raise ValueError(f"DPG-Bench file {uri}: item {empty[0]} has no prompt")
    return items


def normalise(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def score_image(questions: list[Question], answers: list[str]) -> dict | None:
    """One image's answers -> {"score", "raw": {qid: 0/1}}, or None when a dependency names a
    proposition the item lacks (the official script fails on, and leaves out, such an image)."""
    raw = {q.id: float(normalise(a) == "yes") for q, a in zip(questions, answers)}
    final = dict(raw)
    for q in questions:
        for parent in q.parents:
            if parent not in final:
                return None
            if final[parent] == 0:
                final[q.id] = 0.0
                break
    return {"score": float(np.mean(list(final.values()))), "raw": raw}


def summarize(items: dict[str, Item], results: list[tuple[str, dict | None]]) -> dict[str, float]:
    """(item_id, score_image result) per image -> score (mean over prompts of their images' mean),
    prompts, excluded_images, and pooled pre-dependency category means l1/<name>, l2/<name>."""
    per_item: dict[str, list[float]] = defaultdict(list)
    l1: dict[str, list[float]] = defaultdict(list)
    l2: dict[str, list[float]] = defaultdict(list)
    excluded = 0
    for item_id, res in results:
        if res is None:
            excluded += 1
            continue
        per_item[item_id].append(res["score"])
        for q in items[item_id].questions:
            l2[q.category].append(res["raw"][q.id])
            l1[q.category.split("-")[0].strip()].append(res["raw"][q.id])
    out = {"excluded_images": float(excluded), "prompts": float(len(per_item))}
    if per_item:
        out["score"] = float(np.mean([np.mean(v) for v in per_item.values()]))
    out.update({f"l1/{k}": float(np.mean(v)) for k, v in sorted(l1.items())})
    out.update({f"l2/{k}": float(np.mean(v)) for k, v in sorted(l2.items())})
    return out


class VQA:
    """(uint8 image [H, W, 3], questions) -> answers, from a transformers VQA folder (BLIP, ViLT, ...)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import AutoImageProcessor, AutoModelForVisualQuestionAnswering, AutoTokenizer

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"VQA model folder {path} does not exist or has no config.json")
        self.device, self.batch_size = torch.device(device), batch_size
        self.model = AutoModelForVisualQuestionAnswering.from_pretrained(str(path)).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.processor = AutoImageProcessor.from_pretrained(str(path))

    @torch.no_grad()
    def __call__(self, image: np.ndarray, questions: list[str]) -> list[str]:
        answers = []
        pixels = self.processor(images=[image], return_tensors="pt").to(self.device)   # one image, its questions batched
        for s in range(0, len(questions), self.batch_size):
            chunk = list(questions[s:s + self.batch_size])
            tokens = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            # token_type_ids: all zeros for one sentence, and BLIP's generate refuses them
            tokens = {k: tokens[k].to(self.device) for k in ("input_ids", "attention_mask")}
            batch = {k: v.expand(len(chunk), *v.shape[1:]) for k, v in pixels.items()}
            if self.model.can_generate():
                ids = self.model.generate(**tokens, **batch, max_new_tokens=8)
                answers += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            else:
                logits = self.model(**tokens, **batch).logits                          # [Q, answers]
                answers += [self.model.config.id2label[int(i)] for i in logits.argmax(-1)]
        return answers
