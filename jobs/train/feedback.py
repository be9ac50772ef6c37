"""Data feedback in the training order (D-JEPA·T2I): statistical-analysis and critic-model sampling.

The plain order (jobs/train/data.py) lays each epoch out as P streams of rows. With feedback, each
stream is re-drawn from a candidate sequence (the plain stream, then reserve orders of the same
seed) by a filter that walks the candidates in order:

- statistics: running per-attribute counts of what the stream has emitted so far in the epoch.
  A candidate carrying a non-transformable attribute value (a colour, count, spatial or style word
  that `minit2i curate` records, or the same words found in the caption) whose running share in
  its category is above (1 + tolerance) / (values the category has in the data), after `warmup`
  emitted values of that category, is dropped with probability `drop_probability` (0.5 in the
  paper). Transformable attributes (aspect, resolution) are never dropped: the crop is transformed
  instead, its side drawn from a truncated normal around the target (`crop_*`).
- critic: a score per row (the critic's predicted chance that the model already gets that row's
  caption right, jobs/train/critic.py); a row scored >= `easy` is skipped with probability
  `skip_easy`, a row scored <= `hard` is emitted twice in a row with probability `repeat_hard`.

Every candidate consumes exactly three uniform draws from a generator seeded by (seed, epoch,
stream), whatever is decided, so the decisions are a pure function of (seed, epoch, data, settings,
critic scores): every worker recomputes the same streams, the positions a step uses do not depend
on the number of workers, and a resumed run makes the same choices. The critic's scores and
version are saved with each checkpoint (train_state.json records their hash) for that reason.

Hand-written: no library implements this sampler. Its cost is one Python pass over an epoch's
positions per (epoch, critic version), cached per process (see `filter_stream` for its speed).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

CATEGORIES = ("color", "count", "spatial", "style")    # the caption attributes curate records


@dataclass
class StatsFeedback:
    enabled: bool = False
    drop_probability: float = 0.5        # chance an over-represented candidate is dropped (D-JEPA·T2I: 0.5)
    tolerance: float = 0.0               # over-represented: running share > (1 + tolerance) / values in its category
    warmup: int = 8                      # values of a category a stream emits before its shares count
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))   # non-transformable attributes tracked
    crop_std: float = 0.0                # transformable: crop side / shorter side ~ N(crop_mean, crop_std) truncated; 0 = full crop
    crop_mean: float = 1.0               # the target crop scale
    crop_min: float = 0.75               # truncation bounds [crop_min, 1]


@dataclass
class CriticFeedback:
    enabled: bool = False
    every: int = 100                     # steps between critic versions (a Ray job samples the EMA and retrains it)
    checker: str | None = None           # labeller of the samples: "world" (the synthetic world's exact checks) or
                                         # "geneval" (GenEval's rules on clauses read from each caption, real data)
    detector: str | None = None          # geneval: the Mask2Former folder or official mmdetection .pth (metrics.geneval_detector)
    clip_model: str | None = None        # geneval: CLIP folder for colour clauses (captions with a colour need it)
    label_rows: int = 128                # training captions sampled and checked per version
    sample_steps: int = 10               # sampler steps for those samples
    cfg_scale: float = 2.0               # guidance for those samples
    image_size: int = 32                 # critic input side (training images resized to it)
    train_steps: int = 60                # ResNet-18 optimiser steps per version
    train_batch: int = 32
    lr: float = 1.0e-3
    score_rows: int = 0                  # rows scored per version (0 = all; else a seeded subset, the rest unscored)
    easy: float = 0.8                    # score >= easy: skipped with probability skip_easy
    skip_easy: float = 0.5
    hard: float = 0.2                    # score <= hard: repeated with probability repeat_hard
    repeat_hard: float = 0.5
    num_cpus: float = 0.5                # CPUs the critic job reserves


@dataclass
class FeedbackConfig:
    stats: StatsFeedback = field(default_factory=StatsFeedback)
    critic: CriticFeedback = field(default_factory=CriticFeedback)

    @property
    def active(self) -> bool:
        return self.stats.enabled or self.critic.enabled


CHECKERS = ("world", "geneval")


def check(cfg: FeedbackConfig) -> None:
    """Bad settings as one-line ValueErrors naming the key."""
    s, c = cfg.stats, cfg.critic
    for key, v in (("stats.drop_probability", s.drop_probability), ("critic.skip_easy", c.skip_easy),
                   ("critic.repeat_hard", c.repeat_hard), ("critic.easy", c.easy), ("critic.hard", c.hard)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"data.feedback.{key} is {v}: a probability must be in [0, 1]")
    if not (0 < s.crop_min <= s.crop_mean <= 1 and s.crop_std >= 0):
        raise ValueError(f"data.feedback.stats: need 0 < crop_min <= crop_mean <= 1 and crop_std >= 0, got "
                         f"{s.crop_min}, {s.crop_mean}, {s.crop_std}")
    unknown = sorted(set(s.categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"data.feedback.stats.categories: unknown {unknown}; known: {', '.join(CATEGORIES)}")
    if c.enabled:
        if c.checker is None:
            raise ValueError("data.feedback.critic is enabled without a checker: set data.feedback.critic.checker "
                             f"to one of {', '.join(CHECKERS)} (the labeller of the model's samples)")
        if c.checker not in CHECKERS:
            raise ValueError(f"data.feedback.critic.checker {c.checker!r}: known checkers are {', '.join(CHECKERS)}")
        if c.checker == "geneval" and not c.detector:
            raise ValueError("data.feedback.critic.checker geneval needs data.feedback.critic.detector (a Mask2Former "
                             "folder or the official mmdetection .pth; clip_model too for colour words)")
        if c.every < 1 or c.label_rows < 2 or c.train_steps < 1 or c.sample_steps < 1 or c.image_size < 8:
            raise ValueError("data.feedback.critic: every, train_steps, sample_steps >= 1, label_rows >= 2, image_size >= 8")


def settings(cfg: FeedbackConfig) -> dict:
    """What of the feedback fixes the order (recorded in and checked against checkpoints)."""
    from pipelines import config as config_lib

    out = {}
    if cfg.stats.enabled:
        out["stats"] = config_lib.to_dict(cfg.stats)
    if cfg.critic.enabled:
        c = cfg.critic
        out["critic"] = {"every": c.every, "easy": c.easy, "skip_easy": c.skip_easy, "hard": c.hard, "repeat_hard": c.repeat_hard}
    return out


# --------------------------------------------------------------------------------------------
# Attributes of every row
# --------------------------------------------------------------------------------------------

@dataclass
class Attributes:
    """Per-row attribute values as CSR: row r has values[offsets[r]:offsets[r+1]] (ids into vocab,
    "category=word"). Read from curate's attr_* columns, or found in the caption with curate's own
    word lists when a dataset has none (the same function, so both agree)."""
    vocab: list[str]
    offsets: np.ndarray      # [R + 1] int64
    values: np.ndarray       # [nnz] int32

    def category_of(self) -> np.ndarray:
        """[V] category id (index into CATEGORIES) of each vocab value."""
        return np.array([CATEGORIES.index(v.split("=", 1)[0]) for v in self.vocab], dtype=np.int64)

    def tracked_lists(self, categories: tuple[str, ...]) -> list[tuple[int, ...]]:
        """Per row, its value ids in `categories`, as Python tuples (made once per Attributes:
        about 100 bytes a row, so ~1 GB for CC12M's 10M rows; fine for finetune-sized sets)."""
        cached = getattr(self, "_tracked", None)
        if cached is None or cached[0] != categories:
            keep = np.array([v.split("=", 1)[0] in categories for v in self.vocab] or [False])
            vals, offs = self.values.tolist(), self.offsets.tolist()
            lists = [tuple(v for v in vals[a:b] if keep[v]) for a, b in zip(offs[:-1], offs[1:])]
            self._tracked = cached = (categories, lists)
        return cached[1]

    def of(self, rows: np.ndarray) -> list[str]:
        """The attribute values of `rows`, one entry per (row, value)."""
        return [self.vocab[v] for r in rows for v in self.values[self.offsets[r]:self.offsets[r + 1]]]


def read_attributes(shard_rows: list[tuple[str, np.ndarray]], caption_column: str) -> Attributes:
    """The attributes of the usable rows of each shard (uri, usable row numbers), in index order."""
    import pyarrow.parquet as pq

    from pipelines import storage
    from pipelines.curate import caption_attributes

    vocab: dict[str, int] = {}
    offsets, values = [0], []
    for uri, usable in shard_rows:
        fs, path = storage.resolve(uri)
        pf = pq.ParquetFile(fs.open_input_file(path))
        cols = [f"attr_{c}" for c in CATEGORIES]
        if all(c in pf.schema_arrow.names for c in cols):
            table = pf.read(columns=cols).to_pydict()
            rows = [{c: table[c][i] or [] for c in cols} for i in usable]
        elif caption_column in pf.schema_arrow.names:
            captions = pf.read(columns=[caption_column]).column(caption_column).to_pylist()
            rows = [caption_attributes(captions[i] or "") for i in usable]
        else:
            raise ValueError(f"training shard {uri}: data.feedback.stats needs attr_* columns (minit2i curate) or a "
                             f"{caption_column!r} column to find them in")
        for r in rows:
            for c in CATEGORIES:
                for word in r[f"attr_{c}"]:
                    values.append(vocab.setdefault(f"{c}={word}", len(vocab)))
            offsets.append(len(values))
    return Attributes(list(vocab), np.array(offsets, dtype=np.int64), np.array(values, dtype=np.int32))


# --------------------------------------------------------------------------------------------
# The filter
# --------------------------------------------------------------------------------------------

@dataclass
class Decisions:
    """What the filter decided for one epoch (recorded in checkpoints)."""
    candidates: int = 0
    dropped: int = 0          # statistics: over-represented, dropped
    skipped: int = 0          # critic: easy, skipped
    repeated: int = 0         # critic: hard, emitted twice

    def add(self, other: "Decisions") -> None:
        for k in ("candidates", "dropped", "skipped", "repeated"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def over_represented(counts: list[int], totals: list[int], values, cat_of: list[int], per_cat: list[int],
                     tolerance: float, warmup: int) -> bool:
    """Is any of `values` over its fair share: counts[v] / totals[cat] > (1 + tolerance) / per_cat[cat]?"""
    for v in values:
        c = cat_of[v]
        if totals[c] >= warmup and counts[v] * per_cat[c] > (1.0 + tolerance) * totals[c]:
            return True
    return False


def filter_stream(candidates, n: int, cfg: FeedbackConfig, attrs: Attributes | None, scores: np.ndarray | None,
                  rng: np.random.Generator, log: list | None = None) -> tuple[np.ndarray, Decisions]:
    """n row ids from the `candidates` iterator (of int arrays) by the statistics and critic rules.

    Per candidate three uniform draws (u_drop, u_skip, u_repeat), always consumed. `log`, when
    given, receives (row, over-represented, u_drop, dropped) per candidate (the tests check the
    formula on it). The walk is sequential (each decision depends on the counts so far), so it
    runs on plain Python lists: numpy's per-element indexing is several times slower."""
    s, c = cfg.stats, cfg.critic
    use_stats = s.enabled and attrs is not None and len(attrs.vocab) > 0
    if use_stats:
        cat_of = attrs.category_of().tolist()
        row_values = attrs.tracked_lists(tuple(s.categories))
        per_cat = np.bincount(cat_of, minlength=len(CATEGORIES)).tolist()
        counts, totals = [0] * len(attrs.vocab), [0] * len(CATEGORIES)
        drop_p, tol, warmup = s.drop_probability, s.tolerance, s.warmup
    use_critic = c.enabled and scores is not None
    score_of = scores.tolist() if use_critic else None
    out = [0] * n
    got, dec = 0, Decisions()
    for chunk in candidates:
        draws = rng.random((len(chunk), 3)).tolist()
        for row, (u_drop, u_skip, u_rep) in zip(chunk.tolist(), draws):
            dec.candidates += 1
            if use_stats:
                vals = row_values[row]
                over = over_represented(counts, totals, vals, cat_of, per_cat, tol, warmup)
                drop = over and u_drop < drop_p
                if log is not None:
                    log.append((row, over, u_drop, drop))
                if drop:
                    dec.dropped += 1
                    continue
            times = 1
            if use_critic:
                score = score_of[row]
                if score >= c.easy and u_skip < c.skip_easy:
                    dec.skipped += 1
                    continue
                if score <= c.hard and u_rep < c.repeat_hard:
                    times = 2
            for k in range(times):
                if got == n:
                    break
                dec.repeated += k          # counted when the second copy is emitted (a stream's last slot may cut it)
                out[got] = row
                got += 1
                if use_stats:
                    for v in vals:
                        counts[v] += 1
                        totals[cat_of[v]] += 1
            if got == n:
                return np.array(out, dtype=np.int64), dec
    raise RuntimeError("feedback: the candidate sequence ended before the stream was full")


def crop_scales(cfg: StatsFeedback, rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] crop side / shorter image side, from N(crop_mean, crop_std) truncated to [crop_min, 1]."""
    if not cfg.enabled or cfg.crop_std == 0:
        return np.ones(n, dtype=np.float32)
    from scipy.stats import truncnorm

    a, b = (cfg.crop_min - cfg.crop_mean) / cfg.crop_std, (1.0 - cfg.crop_mean) / cfg.crop_std
    return truncnorm.rvs(a, b, loc=cfg.crop_mean, scale=cfg.crop_std, size=n, random_state=rng).astype(np.float32)


def scores_digest(scores: np.ndarray | None) -> str | None:
    """A short hash of the critic's scores: checkpoints record it, resume checks it."""
    if scores is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(scores, dtype=np.float32).tobytes()).hexdigest()[:16]
