"""The critic of D-JEPA·T2I's critic-model sampling: a Ray job that learns which rows the model already gets right.

Every `data.feedback.critic.every` steps the train loop (rank 0) runs `critic_job` as a Ray task:
1. sample the current EMA model (jobs/inference.py) on `label_rows` training captions, chosen by
   (seed, version), one image each from the per-image noise of (row id, version);
2. label each image with the checker: the synthetic world's exact checks (jobs/metrics/world.py),
   or on real data GenEval's rules (jobs/metrics/geneval.py) on the clauses read from each caption
   (`caption_metadata`) with its detector and CLIP: 1 when the model got the caption right;
3. train torchvision's ResNet-18 (weights=None, one logit) on the *training* images of those rows
   against the labels: it learns which kinds of rows the model already handles;
4. score the training rows with it (sigmoid, [R] float32; rows not scored or not decodable: NaN).
The scores change the order from the next step on (jobs/train/feedback.py); they, the critic's
weights and its version are saved with every checkpoint, so a resumed run makes the same choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jobs.train.data import DataConfig, Index, ReadRows, decode_crop
from jobs.train.feedback import CriticFeedback


@dataclass
class CriticResult:
    version: int                        # 1 for the first critic of a run
    step: int                           # the step whose EMA weights were sampled
    scores: np.ndarray                  # [R] float32 predicted success per row (NaN: not scored)
    weights: dict[str, torch.Tensor]    # the ResNet-18's state dict
    labelled: int                       # captions sampled and checked
    success: float                      # share of them the model got right
    loss: float                         # the critic's last training loss

    def summary(self) -> dict:
        return {"critic_version": self.version, "critic_step": self.step, "critic_labelled": self.labelled,
                "critic_success": self.success, "critic_loss": self.loss}


def _images(index: Index, data: DataConfig, rows: np.ndarray, size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(captions, uint8 [n, size, size, 3] training images, valid [n]) of global row ids `rows`."""
    got = ReadRows(index, data)({"data": rows})
    images = np.zeros((len(rows), size, size, 3), dtype=np.uint8)
    valid = np.zeros(len(rows), dtype=bool)
    for i, b in enumerate(got["image"]):
        try:
            images[i] = decode_crop(b, size)
            valid[i] = True
        except Exception:  # noqa: BLE001 - an undecodable row is left unscored, as training skips it
            pass
    return [str(c) for c in got["caption"]], images, valid


def _label(cfg: CriticFeedback, images: np.ndarray, captions: list[str]) -> np.ndarray:
    """1.0 where the checker passes the image for its caption, 0.0 where not, NaN where it cannot read
    the caption (a world checker on a non-world caption; a GenEval checker on a caption naming no
    COCO class, or with a colour word and no clip_model)."""
    out = np.full(len(captions), np.nan, dtype=np.float32)
    if cfg.checker == "geneval":
        from jobs.metrics.geneval import GenEvalJudge, caption_metadata
        from jobs.metrics.mask2former import Mask2FormerDetector

        clip = None
        if cfg.clip_model:
            from jobs.metrics.clip_score import ClipScorer

            clip = ClipScorer(cfg.clip_model)
        judge = GenEvalJudge(Mask2FormerDetector(cfg.detector), clip)
        metas = [caption_metadata(c) for c in captions]
        usable = [i for i, m in enumerate(metas)
                  if m is not None and (clip is not None or not any("color" in r for r in m["include"]))]
        for i, rec in zip(usable, judge(images[usable], [metas[i] for i in usable]) if usable else []):
            out[i] = float(rec["correct"])
        what = "captions naming a COCO class (and, without clip_model, no colour)"
    else:
        from jobs.metrics.world import check_image

        for i, (im, cap) in enumerate(zip(images, captions)):
            try:
                out[i] = float(check_image(im, cap).correct)
            except ValueError:
                pass
        what = "synthetic-world captions"
    if np.isnan(out).all():
        raise ValueError(f"data.feedback.critic.checker {cfg.checker!r} could not read any of the {len(captions)} training "
                         f"captions (e.g. {captions[0]!r}): it labels {what} only")
    return out


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, S, S, 3] -> float [n, 3, S, S] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def critic_job(index: Index, data: DataConfig, cfg: CriticFeedback, version: int, step: int, model_cfg, ema_state: dict,
               text_encoder, denoiser, seed: int) -> CriticResult:
    """Sample, label, train, score (see the module docstring). Runs anywhere: a Ray task or a plain call."""
    import torchvision

    from jobs.inference import network, resolve_sampler, sample_images
    from model.denoiser import SamplerConfig
    from model.text_encoder import FrozenT5
    from pipelines import config as config_lib

    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    rng = np.random.default_rng([seed, version, 0xC217])
    R = index.num_rows
    rows = np.sort(rng.choice(R, size=min(cfg.label_rows, R), replace=False))
    captions, train_images, valid = _images(index, data, rows, cfg.image_size)

    net = network(model_cfg, ema_state)
    encoder = FrozenT5(text_encoder, "cpu")
    sampler = resolve_sampler(SamplerConfig(sampler="euler", steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale),
                              {"denoiser": config_lib.to_dict(denoiser)})
    samples = sample_images(net, encoder, sampler, captions, indices=rows.tolist(), seeds=version)
    labels = _label(cfg, samples, captions)
    keep = valid & ~np.isnan(labels)
    x, y = _to_input(train_images[keep]), torch.from_numpy(labels[keep])

    torch.manual_seed(seed * 1_000 + version)
    critic = torchvision.models.resnet18(weights=None, num_classes=1)
    opt = torch.optim.Adam(critic.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed * 1_000 + version)
    critic.train()
    loss = torch.zeros(())
    for _ in range(cfg.train_steps):
        pick = torch.randint(len(x), (min(cfg.train_batch, len(x)),), generator=gen)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(critic(x[pick]).squeeze(1), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()

    critic.eval()
    scored = np.arange(R) if not cfg.score_rows or cfg.score_rows >= R else np.sort(rng.choice(R, cfg.score_rows, replace=False))
    scores = np.full(R, np.nan, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(scored), 256):
            ids = scored[start:start + 256]
            _, images, ok = _images(index, data, ids, cfg.image_size)
            p = torch.sigmoid(critic(_to_input(images)).squeeze(1)).numpy()
            scores[ids[ok]] = p[ok]
    return CriticResult(version, step, scores, {k: v.detach().clone() for k, v in critic.state_dict().items()},
                        int(keep.sum()), float(y.mean()) if len(y) else 0.0, float(loss))


def run_critic(index: Index, data: DataConfig, version: int, step: int, model_cfg, ema_state: dict, text_encoder, denoiser,
               seed: int) -> CriticResult:
    """`critic_job` as a Ray task with the configured CPUs, waited for."""
    import ray

    cfg = data.feedback.critic
    task = ray.remote(num_cpus=cfg.num_cpus)(critic_job)
    return ray.get(task.remote(index, data, cfg, version, step, model_cfg, ema_state, text_encoder, denoiser, seed))
