"""Benchmark contamination: word n-gram overlap of training captions with evaluation prompts.

A caption *contains* an evaluation prompt when it holds at least `min_overlap` of the prompt's
distinct word n-grams (a prompt shorter than n words is one n-gram: itself). With the defaults
(n=3, min_overlap=1.0), "A photo of a red bench, on grass" contains GenEval's "a photo of a red
bench" but not "a photo of a red car". Word n-gram overlap is the usual test (GPT-3's report used
13-grams over documents); text-to-image prompts are 4-20 words, hence the small n.

GenEval ships its prompts as `evaluation_metadata.jsonl`, one JSON object per line with a
"prompt" field; plain text files with one prompt per line are read too.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field

from pipelines import storage

_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class ContaminationConfig:
    prompts: list[str] = field(default_factory=list)  # evaluation prompt files (.jsonl with "prompt", or .txt)
    ngram: int = 3                                    # words per n-gram
    min_overlap: float = 1.0                          # fraction of a prompt's n-grams a caption must hold
    drop: bool = False                                # drop matching rows (reason eval_contamination)
    top: int = 20                                     # most-matched prompts listed in the report

    def __post_init__(self):
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts] if self.prompts else []
        if int(self.ngram) < 1:
            raise ValueError(f"contamination.ngram must be >= 1, got {self.ngram}")
        if not 0.0 < float(self.min_overlap) <= 1.0:
            raise ValueError(f"contamination.min_overlap must be in (0, 1], got {self.min_overlap}")


def load_prompts(uris: list[str]) -> list[str]:
    """Prompts from GenEval-style JSONL (a "prompt" per line) or text files (a prompt per line)."""
    prompts: list[str] = []
    for uri in uris:
        lines = storage.read_bytes(uri).decode("utf-8").splitlines()
        for i, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            if uri.endswith((".jsonl", ".json")):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{uri}:{i}: not a JSON object: {err}") from err
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{uri}:{i}: no string \"prompt\" field (GenEval metadata layout)")
                line = record["prompt"]
            prompts.append(line)
    return prompts


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    if len(tokens) <= n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


class PromptIndex:
    """n-gram -> prompts holding it, so a caption is checked against all prompts in one pass."""

    def __init__(self, prompts: list[str], n: int):
        self.n = n
        self.prompts: list[str] = []
        self.sizes: list[int] = []
        self.index: dict[tuple[str, ...], list[int]] = defaultdict(list)
        seen = set()
        for prompt in prompts:
            tokens = tuple(words(prompt))
            if not tokens or tokens in seen:  # GenEval repeats some prompts; count each once
                continue
            seen.add(tokens)
            grams = ngrams(list(tokens), n)
            for gram in grams:
                self.index[gram].append(len(self.prompts))
            self.prompts.append(prompt)
            self.sizes.append(len(grams))

    def best(self, caption: str) -> tuple[float, int]:
        """(overlap in [0, 1], prompt id or -1) of the prompt the caption covers most; ties -> lower id."""
        tokens = words(caption)
        # A short prompt is a single n-gram shorter than n: look those up with every length up to n.
        grams = set()
        for m in range(1, self.n + 1):
            grams |= {tuple(tokens[i:i + m]) for i in range(len(tokens) - m + 1)}
        hits: dict[int, int] = defaultdict(int)
        for gram in grams:
            for pid in self.index.get(gram, ()):
                hits[pid] += 1
        best_overlap, best_id = 0.0, -1
        for pid in sorted(hits):
            overlap = hits[pid] / self.sizes[pid]
            if overlap > best_overlap:
                best_overlap, best_id = overlap, pid
        return best_overlap, best_id
