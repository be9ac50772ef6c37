"""Data feedback in the training order: statistics and critic sampling (jobs/train/feedback.py)."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import jobs.train.data as td
from jobs.train.data import DataConfig, build_index, epoch_order, feedback_epoch, worker_rows
from jobs.train.feedback import (Attributes, CriticFeedback, FeedbackConfig, StatsFeedback, check, filter_stream)


def feedback_cfg(data: str, **critic) -> DataConfig:
    critic = {"enabled": True, "checker": "world", "every": 2, "easy": 0.7, "hard": 0.3, **critic}
    return DataConfig(datasets=[data], batch_size=8, partitions=2, shuffle_rows=4, seed=5,
                      feedback=FeedbackConfig(stats=StatsFeedback(enabled=True, warmup=2), critic=CriticFeedback(**critic)))


def test_order_with_feedback_is_pure_resumable_and_world_size_independent(squares):
    cfg = feedback_cfg(squares)
    index = build_index(cfg)
    scores = np.random.default_rng(0).random(index.num_rows).astype(np.float32)
    whole = worker_rows(index, cfg, 0, 14, 0, 1, scores)                        # 3.5 epochs of 4 steps
    td._FEEDBACK_CACHE.clear()
    assert np.array_equal(whole, worker_rows(build_index(cfg), cfg, 0, 14, 0, 1, scores))    # bit-identical, recomputed
    two = np.stack([worker_rows(index, cfg, 0, 14, r, 2, scores).reshape(14, 4) for r in range(2)], axis=1)
    assert np.array_equal(two.reshape(-1), whole)                              # 1 vs 2 workers: the same positions
    for cut in (1, 4, 9):                                                      # resume: no repeat, no gap
        assert np.array_equal(np.concatenate([worker_rows(index, cfg, 0, cut, 0, 1, scores),
                                              worker_rows(index, cfg, cut, 14, 0, 1, scores)]), whole)
    plain = replace(cfg, feedback=FeedbackConfig())
    assert not np.array_equal(whole[:32], epoch_order(index, plain, 0))
    _, decided = feedback_epoch(index, cfg, 0, scores)
    assert decided.dropped > 0 and decided.skipped > 0 and decided.repeated > 0
    assert decided.candidates == 32 + decided.dropped + decided.skipped - decided.repeated
    other = np.ones_like(scores)                                               # every row easy: about half skipped
    assert not np.array_equal(epoch_order(index, cfg, 0, other), epoch_order(index, cfg, 0, scores))


def test_feedback_that_decides_nothing_keeps_the_plain_order(squares):
    cfg = feedback_cfg(squares, skip_easy=0.0, repeat_hard=0.0)
    cfg.feedback.stats.enabled = False
    index = build_index(cfg)
    scores = np.random.default_rng(1).random(index.num_rows).astype(np.float32)
    assert np.array_equal(epoch_order(index, cfg, 2, scores), epoch_order(index, replace(cfg, feedback=FeedbackConfig()), 2))


def test_drop_rule_matches_its_formula_on_a_constructed_distribution():
    """Colours red 70% / blue 20% / green 10%, counts two 50% / three 50%: every decision is
    re-derived from the running counts of what was emitted, and only over-represented rows drop."""
    R = 2000
    rng = np.random.default_rng(0)
    colour = rng.choice(3, R, p=[0.7, 0.2, 0.1])
    count = rng.choice(2, R)
    vocab = ["color=red", "color=blue", "color=green", "count=two", "count=three"]
    attrs = Attributes(vocab, np.arange(0, 2 * R + 1, 2, dtype=np.int64),
                       np.stack([colour, 3 + count], axis=1).reshape(-1).astype(np.int32))
    p, tol, warmup = 0.5, 0.1, 5
    cfg = FeedbackConfig(stats=StatsFeedback(enabled=True, drop_probability=p, tolerance=tol, warmup=warmup))
    log = []
    out, dec = filter_stream(iter([rng.permutation(R), rng.permutation(R)]), 1000, cfg, attrs, None,
                             np.random.default_rng(1), log)
    counts, totals = np.zeros(5), np.zeros(2)
    per_cat, emitted = np.array([3, 2]), []
    for row, over, u, dropped in log:
        vals = [colour[row], 3 + count[row]]
        cats = [0, 1]
        expect = any(totals[c] >= warmup and counts[v] / totals[c] > (1 + tol) / per_cat[c] for v, c in zip(vals, cats))
        assert over == expect and dropped == (expect and u < p)
        if not dropped:
            emitted.append(row)
            for v, c in zip(vals, cats):
                counts[v] += 1
                totals[c] += 1
    assert np.array_equal(out, emitted[:1000]) and dec.dropped == sum(d for *_, d in log)
    overs = [d for _, o, _, d in log if o]
    assert abs(np.mean(overs) - p) < 0.05                                   # drops ~ p among over-represented rows
    assert np.mean(colour[out] == 0) < np.mean(colour == 0) - 0.1          # red pushed toward its fair share


def test_critic_scores_skip_the_easy_and_repeat_the_hard(squares):
    cfg = feedback_cfg(squares, easy=0.5, skip_easy=1.0, hard=0.5, repeat_hard=1.0)
    cfg.feedback.stats.enabled = False
    index = build_index(cfg)
    scores = np.where(np.arange(index.num_rows) % 2 == 0, 0.9, 0.1).astype(np.float32)    # even rows easy, odd hard
    streams = epoch_order(index, cfg, 0, scores).reshape(4, 2, 4).transpose(1, 0, 2).reshape(2, -1)
    for s in streams:
        assert (s % 2 == 1).all()                                          # every easy row skipped
        assert np.array_equal(s[0::2], s[1::2])                            # every hard row twice in a row


def test_bad_feedback_settings_are_one_line_errors(squares, tmp_path, cli):
    from jobs.train.driver import check as check_train
    from tests.jobs.train.fixtures import tiny

    with pytest.raises(ValueError, match=r"data\.feedback\.stats\.drop_probability is 1\.5: a probability must be in \[0, 1\]"):
        check(FeedbackConfig(stats=StatsFeedback(enabled=True, drop_probability=1.5)))
    with pytest.raises(ValueError, match=r"data\.feedback\.critic\.repeat_hard is -0\.1"):
        check_train(tiny(tmp_path, squares, "bad", "data.feedback.critic.repeat_hard=-0.1"))
    with pytest.raises(ValueError, match="data.feedback.critic is enabled without a checker"):
        check(FeedbackConfig(critic=CriticFeedback(enabled=True)))
    code, _, err = cli("train", "--config", "jobs/configs/debug.yaml", f"data.datasets=[{squares}]",
                       "data.feedback.critic.enabled=true")
    assert code == 2 and "without a checker" in err and "\n" not in err
    with pytest.raises(ValueError, match="checker geneval needs data.feedback.critic.detector"):
        check(FeedbackConfig(critic=CriticFeedback(enabled=True, checker="geneval")))


def test_geneval_critic_labels_real_captions_by_the_official_rules(tmp_path):
    """On real data the critic labels a sample by GenEval's rules on the clauses read from its caption:
    a tiny Mask2Former whose every query says "clock" passes "a clock", fails "a bench"; a caption
    naming no COCO class, or a colour word without a CLIP, stays unlabelled (NaN)."""
    from jobs.metrics import geneval
    from jobs.metrics.mask2former import Mask2FormerDetector
    from jobs.train.critic import _label
    from tests.jobs.metrics.benchmark_fixtures import blank_images, build_tiny_mask2former

    folder = build_tiny_mask2former(tmp_path / "m2f", favour=geneval.CLASSES.index("clock"))
    captions = ["A clock on the wall.", "two benches in a park", "a sunset over the sea", "a red clock"]
    images = blank_images(len(captions))
    labels = _label(CriticFeedback(enabled=True, checker="geneval", detector=str(folder)), images, captions)
    direct = geneval.GenEvalJudge(Mask2FormerDetector(folder))(
        images[:2], [geneval.caption_metadata(c) for c in captions[:2]])
    assert labels[:2].tolist() == [float(r["correct"]) for r in direct] == [1.0, 0.0]
    assert np.isnan(labels[2:]).all()
    with pytest.raises(ValueError, match="labels captions naming a COCO class"):
        _label(CriticFeedback(enabled=True, checker="geneval", detector=str(folder)), images[2:3], captions[2:3])


FEEDBACK_RUN = ["data.partitions=2", "checkpoint.every=2", "logging.every=2",
                "data.feedback.stats.enabled=true", "data.feedback.stats.warmup=2", "data.feedback.stats.crop_std=0.1",
                "data.feedback.critic.enabled=true", "data.feedback.critic.checker=world", "data.feedback.critic.every=2",
                "data.feedback.critic.label_rows=8", "data.feedback.critic.sample_steps=2",
                "data.feedback.critic.image_size=16", "data.feedback.critic.train_steps=2", "data.feedback.critic.num_cpus=0.25",
                "data.feedback.critic.hard=0.5", "data.feedback.critic.repeat_hard=0.5"]


def test_train_with_feedback_records_its_order_and_resumes_on_another_worker_count(ray_session, world_data, runs):
    """`minit2i train` with both modes: 2 steps on 2 workers (the critic job, a real Ray task with
    torchvision's ResNet-18, runs at step 2), then the same run continued to 4 steps on 1 worker
    (critic again at 4). Every step's rows are what the order gives for the critic then in effect,
    read back from the checkpoints; no step twice or missing; the scores change the order as set."""
    import json

    import pyarrow.parquet as pq
    from safetensors.numpy import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jobs.train.driver import main
    from tests.jobs.train.fixtures import tiny, trace

    main(tiny(runs, world_data, "feedback", "scaling.num_workers=2", "optim.steps=2", *FEEDBACK_RUN))
    result = main(tiny(runs, world_data, "feedback", "scaling.num_workers=1", "optim.steps=4", *FEEDBACK_RUN))
    steps = trace(runs / "trace" / "feedback")
    assert sorted(steps) == list(range(4)) and [len(steps[s]) for s in range(4)] == [2, 2, 1, 1]

    cfg = tiny(runs, world_data, "feedback", *FEEDBACK_RUN).data
    index = build_index(cfg)
    keys = [pq.read_table(s, columns=["key"]).column("key").to_pylist() for s in index.shards]
    ckpts = {json.loads((p / "train_state.json").read_text())["step"]: p for p in (runs / "runs" / "feedback").glob("checkpoint_*") if p.is_dir()}
    assert sorted(ckpts) == [2, 4]
    scores = {0: None}
    for step, path in ckpts.items():
        state = json.loads((path / "train_state.json").read_text())["feedback"]
        assert state["critic_version"] == step // 2 and state["critic_step"] == step and state["decided"]["candidates"] > 0
        assert state["critic"]["critic_labelled"] == 8
        assert load_file(str(path / "critic.safetensors"))["fc.weight"].shape == (1, 512)    # ResNet-18, one logit
        scores[step] = load_file(str(path / "critic_scores.safetensors"))["scores"]
        assert scores[step].shape == (48,) and ((scores[step] >= 0) & (scores[step] <= 1)).all()
    for s in range(4):
        gids = worker_rows(index, cfg, s, s + 1, 0, 1, scores[s - s % 2])    # the critic made at the segment's start
        seen = sum((steps[s][r]["keys"] for r in sorted(steps[s])), [])
        assert seen == [keys[sid][row] for sid, row, _ in index.rows[gids]], f"step {s}"
    assert result.metrics["critic_version"] == 2.0

    hard = replace(cfg, feedback=FeedbackConfig(critic=replace(cfg.feedback.critic, hard=1.0, repeat_hard=1.0)))
    order = epoch_order(index, hard, 0, scores[2])
    assert np.array_equal(order[0::2], order[1::2])                          # every row scored <= 1 comes twice

    acc = EventAccumulator(str(runs / "logs" / "feedback"), size_guidance={"histograms": 0})    # keep every step
    acc.Reload()
    assert [e.step for e in acc.Histograms("data/attr_color")] == [2, 4]


def test_transformable_attributes_are_cropped_not_dropped(squares):
    """Crop scales come from the truncated normal, seeded by (seed, epoch); a scale s crops the
    centre square of side s x the shorter side before resizing."""
    import io

    from PIL import Image

    from jobs.train.data import decode_crop, epoch_crops

    cfg = feedback_cfg(squares)
    cfg.feedback.stats.crop_std, cfg.feedback.stats.crop_mean, cfg.feedback.stats.crop_min = 0.2, 0.9, 0.6
    a = epoch_crops(cfg, 0, 4000)
    assert np.array_equal(a, epoch_crops(cfg, 0, 4000)) and not np.array_equal(a, epoch_crops(cfg, 1, 4000))
    assert a.min() >= 0.6 and a.max() <= 1.0 and 0.8 < a.mean() < 0.9     # truncation pulls the mean below 0.9
    arr = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    assert np.array_equal(decode_crop(buf.getvalue(), 16, crop=0.5), arr[8:24, 16:32])


def test_resume_refuses_feedback_switched_on_or_changed(squares):
    from jobs.train.checkpoints import check_resume
    from tests.jobs.train.fixtures import tiny

    cfg = tiny(Path("/nonexistent"), squares, "x", "data.partitions=2")
    index = build_index(cfg.data)
    state = {"global_batch": 8, "data_fingerprint": index.fingerprint, "order": td.order_settings(cfg.data)}
    check_resume(state, cfg, index, 2)                                        # plain on plain: fine
    on = tiny(Path("/nonexistent"), squares, "x", "data.partitions=2", "data.feedback.stats.enabled=true")
    with pytest.raises(ValueError, match="feedback None vs"):
        check_resume(state, on, index, 2)
    state["order"] = td.order_settings(on.data)
    off = tiny(Path("/nonexistent"), squares, "x", "data.partitions=2", "data.feedback.stats.enabled=true",
               "data.feedback.stats.drop_probability=0.25")
    with pytest.raises(ValueError, match="sample order was made with different settings"):
        check_resume(state, off, index, 2)
