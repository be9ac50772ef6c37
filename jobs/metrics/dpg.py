"""DPG-Bench runner: dense prompts + their questions -> a VQA model from a user path -> scores.

DPG-Bench (Hu et al. 2024, ELLA) ships `dpg_bench.csv`: one row per question with item_id, text
(the prompt), proposition_id, dependency (comma-separated parent proposition ids, "0" for none),
category_broad and question_natural_language. The official judge is mPLUG-large; here any
transformers `AutoModelForVisualQuestionAnswering` folder works: classifier heads (ViLT) answer by
their top label, generative ones (BLIP) by `generate`. A question scores 1 when answered "yes";
a question whose parent scored 0 scores 0 (the benchmark's dependency rule); an image scores the
mean over its questions, the benchmark the mean over images; categories average their questions.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REQUIRED = ("item_id", "text", "proposition_id", "dependency", "category_broad", "question_natural_language")


@dataclass
class Question:
    id: str
    text: str
    parents: list[str]
    category: str


def load_benchmark(path: str | Path) -> tuple[dict[str, str], dict[str, list[Question]]]:
    """(prompt per item_id, questions per item_id) from dpg_bench.csv."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DPG-Bench csv {path} does not exist")
    prompts: dict[str, str] = {}
    questions: dict[str, list[Question]] = defaultdict(list)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks DPG-Bench column(s) {', '.join(missing)}")
        for row in reader:
            item = row["item_id"].strip()
            prompts.setdefault(item, row["text"].strip())
            parents = [p.strip() for p in str(row["dependency"]).split(",") if p.strip() not in ("", "0")]
            questions[item].append(Question(str(row["proposition_id"]).strip(), row["question_natural_language"].strip(),
                                            parents, row["category_broad"].strip()))
    return prompts, dict(questions)


class VQA:
    """(uint8 image [H, W, 3], questions) -> lower-cased answers, from a transformers VQA folder."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoImageProcessor, AutoModelForVisualQuestionAnswering, AutoTokenizer

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"VQA model folder {path} does not exist or has no config.json")
        self.device = torch.device(device)
        self.model = AutoModelForVisualQuestionAnswering.from_pretrained(str(path)).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.processor = AutoImageProcessor.from_pretrained(str(path))

    @torch.no_grad()
    def __call__(self, image: np.ndarray, questions: list[str]) -> list[str]:
        pixels = self.processor(images=[image] * len(questions), return_tensors="pt").to(self.device)
        tokens = self.tokenizer(list(questions), padding=True, truncation=True, return_tensors="pt").to(self.device)
        if self.model.can_generate():
            ids = self.model.generate(**tokens, **pixels, max_new_tokens=8)
            return [a.strip().lower() for a in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        logits = self.model(**tokens, **pixels).logits                       # [Q, answers]
        return [self.model.config.id2label[int(i)].strip().lower() for i in logits.argmax(-1)]


def score_answers(questions: list[Question], answers: list[str]) -> dict[str, float]:
    """Per-question scores with the dependency rule -> {"score": mean, "<category>": mean, ...}."""
    raw = {q.id: float(a.startswith("yes")) for q, a in zip(questions, answers)}
    final = {q.id: (0.0 if any(raw.get(p, 1.0) == 0.0 for p in q.parents) else raw[q.id]) for q in questions}
    out = {"score": float(np.mean(list(final.values())))}
    cats = defaultdict(list)
    for q in questions:
        cats[q.category].append(final[q.id])
    out.update({f"cat_{c}": float(np.mean(v)) for c, v in cats.items()})
    return out


def summarize(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Benchmark score (mean over images) and per-category means over images that have the category."""
    if not per_image:
        return {}
    keys = sorted({k for d in per_image for k in d})
    return {k: float(np.mean([d[k] for d in per_image if k in d])) for k in keys}
