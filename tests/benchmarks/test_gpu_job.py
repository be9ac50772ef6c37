"""benchmarks/gpu_job.py reads the train job's own console lines: its parser must read what the
job's Logger prints (through Ray's worker prefix), and take the steady state after the compile."""

from __future__ import annotations

from benchmarks.gpu_job import parse_train_lines, steady
from jobs.train.config import TrainConfig
from jobs.train.tracking import Logger


def test_parses_the_loggers_lines_and_skips_the_compile(tmp_path, capsys):
    cfg = TrainConfig()
    cfg.logging.tensorboard = False
    logger = Logger(cfg, str(tmp_path), "run", 0)
    for step, img_s in ((10, 3.4), (20, 130.6), (30, 127.2), (40, 124.9)):
        logger.log({"step": step, "loss": 0.5, "img_per_s": img_s, "mfu": img_s / 1000}, step, 40)
    printed = capsys.readouterr().out
    text = "\n".join(f"\x1b[36m(RayTrainWorker pid=7)\x1b[0m {line}" for line in printed.splitlines())
    rows = parse_train_lines(text + "\n[train] done: {'step': 40}\nunrelated line\n")
    assert [r["step"] for r in rows] == [10, 20, 30, 40] and rows[0]["total"] == 40
    assert rows[1]["img_per_s"] == 130.6 and rows[1]["loss"] == 0.5
    assert steady(rows, 20, "img_per_s") == (127.2 + 124.9) / 2
    assert steady(rows, 20, "mfu") == (0.1272 + 0.1249) / 2
    assert steady(rows, 40, "img_per_s") is None
