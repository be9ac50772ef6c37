"""Flow-matching denoiser for MM-JiT: t sampling, noising, x->v conversion, loss, CFG, ODE steps.

Conventions (MiniT2I / JiT): t in [0, 1] with t = 1 clean; z_t = t * x + (1 - t) * eps with
eps ~ N(0, noise_scale^2). The network predicts clean x; the loss is taken on the velocity:
v_pred = (x_pred - z_t) / max(1 - t, a_min), v = (x - z_t) / max(1 - t, a_min), MSE averaged over
pixels. Training draws t from a logit-normal(mu, sigma). Classifier-free guidance drops 10% of
captions by zeroing their text mask; at sampling the unconditional branch uses an all-zero mask and
guidance is applied to the velocity. Samplers integrate the ODE dz/dt = v from t = 0 to t = 1
(Euler, Heun, Euler on the reference's `euler-4e-2` grid) or the reference's SDE (`sde`).

The network is only ever called as `net(z_t, text, mask) -> x_pred`; nothing here reaches inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DenoiserConfig:
    t_mu: float = -0.8             # logit-normal mean of the training t (negative: noisier)
    t_sigma: float = 0.8           # logit-normal std
    noise_scale: float = 2.0       # std of eps (2.0 at 512px in MiniT2I)
    a_min: float = 0.01            # floor of (1 - t) in the x->v conversion, training
    caption_dropout: float = 0.1   # share of captions dropped for classifier-free guidance


# The reference's samplers (minit2i-jax `diffusion.py`): Euler and Heun on an even grid (Heun's last
# step is Euler), Euler on a grid ending at 1 - 0.04 plus one jump to 1, and an Euler-Maruyama SDE.
SAMPLERS = ("euler", "heun", "euler-4e-2", "sde")


@dataclass
class SamplerConfig:
    sampler: str = "heun"                          # one of SAMPLERS (see `sample`)
    steps: int = 100                               # network evaluations (x2 for Heun) from t=0 to t=1
    cfg_scale: float = 2.0                         # 1.0 = conditional only; MiniT2I: 2.0 FID, 6.0 GenEval
    cfg_interval: tuple[float, float] | None = None  # guide only for t in [lo, hi]; None = always
    time_shift: float = 1.0                        # >1 spends more steps at high noise (SD3-style shift)
    noise_scale: float = 2.0                       # must match training
    a_min: float = 0.05                            # floor of (1 - t) at sampling (MiniT2I eval: 0.05)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")
        if self.cfg_interval is not None:
            lo, hi = self.cfg_interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")
            self.cfg_interval = (float(lo), float(hi))


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def sample_t(batch: int, mu: float, sigma: float, generator=None, device=None) -> torch.Tensor:
    """Logit-normal t: sigmoid(mu + sigma * n), n ~ N(0, 1). [B]"""
    n = torch.randn(batch, generator=generator, device=device)
    return torch.sigmoid(mu + sigma * n)


def add_noise(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z_t = t * x + (1 - t) * eps."""
    t = _bcast(t, x)
    return t * x + (1 - t) * eps


def x_to_v(x_pred: torch.Tensor, z: torch.Tensor, t: torch.Tensor, a_min: float) -> torch.Tensor:
    """Velocity implied by a clean-image prediction: (x_pred - z_t) / max(1 - t, a_min)."""
    return (x_pred - z) / _bcast(torch.clamp(1 - t, min=a_min), z)


def drop_captions(mask: torch.Tensor, p: float, generator=None) -> torch.Tensor:
    """Zero the whole text mask of a random share p of the batch (CFG training)."""
    if p <= 0:
        return mask
    keep = torch.rand(mask.shape[0], generator=generator, device=mask.device) >= p   # [B]
    return mask & keep[:, None]


def per_sample_draws(generators: list[torch.Generator], image_shape: tuple[int, ...], cfg: DenoiserConfig,
                     device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(caption keep [B], t [B], eps [B, C, H, W]) where sample i draws only from generators[i],
    in a fixed order (keep, t, eps), with the distributions `training_loss` uses for a batch.
    A job that seeds one generator per sample position gets the same loss however a batch is
    split over workers, and a resumed step draws what the interrupted one drew."""
    keep, t, eps = [], [], []
    for g in generators:
        keep.append(torch.rand((), generator=g, device=device) >= cfg.caption_dropout)
        t.append(sample_t(1, cfg.t_mu, cfg.t_sigma, g, device)[0])
        eps.append(torch.randn(image_shape, generator=g, device=device) * cfg.noise_scale)
    return torch.stack(keep), torch.stack(t), torch.stack(eps)


def training_loss(
    net: Net, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
    cfg: DenoiserConfig, generator: torch.Generator | None = None,
    t: torch.Tensor | None = None, eps: torch.Tensor | None = None, keep: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The v-loss of x-prediction on a batch of clean images x [B, C, H, W] in [-1, 1].

    The random draws (t [B], eps [B, C, H, W] already scaled by noise_scale, caption keep [B]) are
    taken from `generator` unless given: a distributed job draws them per sample so that a batch
    gives the same loss however it is split across workers. `weight` [B] (e.g. 0 for a row whose
    image failed to decode) scales each sample's loss; the mean is still over B.
    Returns the scalar loss and per-sample tensors (t, loss) for logging.
    """
    B = x.shape[0]
    device = x.device
    mask = drop_captions(mask.bool(), cfg.caption_dropout, generator) if keep is None else mask.bool() & keep[:, None]
    if t is None:
        t = sample_t(B, cfg.t_mu, cfg.t_sigma, generator, device)                      # [B]
    if eps is None:
        eps = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype) * cfg.noise_scale
    z = add_noise(x, t.to(x.dtype), eps.to(x.dtype))                                   # [B, C, H, W]
    x_pred = net(z, text, mask)
    v_pred = x_to_v(x_pred.float(), z.float(), t, cfg.a_min)
    v_target = x_to_v(x.float(), z.float(), t, cfg.a_min)
    per_sample = ((v_pred - v_target) ** 2).flatten(1).mean(1)                         # [B]
    loss = per_sample.mean() if weight is None else (per_sample * weight.float()).sum() / B
    return loss, {"t": t.detach(), "loss": per_sample.detach()}


# The reference's `euler-4e-2` grid stops its even steps this far before t = 1 and jumps the rest.
FINAL_JUMP = 0.04


def timesteps(steps: int, shift: float = 1.0, device=None, final_jump: float = 0.0) -> torch.Tensor:
    """steps + 1 times from 0 (noise) to 1 (clean). A shift s > 1 maps the noise level
    sigma = 1 - t to s*sigma / (1 + (s-1)*sigma), putting more steps where noise is high.

    final_jump > 0 (the reference's `euler-4e-2` with 0.04): steps points evenly from 0 to
    1 - final_jump, then 1, so the last step jumps the remaining final_jump at once. The shift maps
    every point, 0 and 1 stay put."""
    if final_jump > 0:
        even = torch.linspace(0.0, 1.0 - final_jump, steps, device=device, dtype=torch.float64)
        t = torch.cat([even, torch.ones(1, device=device, dtype=torch.float64)])
    else:
        t = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64)
    if shift != 1.0:
        sigma = 1 - t
        t = 1 - shift * sigma / (1 + (shift - 1) * sigma)
    return t.float()


def guided_velocity(
    net: Net, z: torch.Tensor, t: float, text: torch.Tensor, mask: torch.Tensor, cfg: SamplerConfig,
) -> torch.Tensor:
    """Velocity at (z, t) with classifier-free guidance inside the configured interval."""
    B = z.shape[0]
    tt = torch.full((B,), t, device=z.device)
    lo, hi = cfg.cfg_interval or (0.0, 1.0)
    if cfg.cfg_scale == 1.0 or not lo <= t <= hi:
        return x_to_v(net(z, text, mask).float(), z, tt, cfg.a_min)
    z2 = torch.cat([z, z])                                                             # [2B, C, H, W]
    text2 = torch.cat([text, text])
    mask2 = torch.cat([mask, torch.zeros_like(mask)])                                  # uncond: no text
    v = x_to_v(net(z2, text2, mask2).float(), z2, torch.cat([tt, tt]), cfg.a_min)
    v_cond, v_uncond = v[:B], v[B:]
    return v_uncond + cfg.cfg_scale * (v_cond - v_uncond)


def normal_like(shape: tuple[int, ...], generator, device) -> torch.Tensor:
    """N(0, 1) of `shape` [B, ...] from one generator, or from one generator per row (a list of B):
    then a row's draws do not depend on which rows share its batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


def sde_step(z: torch.Tensor, v: torch.Tensor, t_cur: float, t_next: float, noise: torch.Tensor | None) -> torch.Tensor:
    """One Euler-Maruyama step of the reference's `sde` sampler (minit2i-jax `diffusion.py`).

    The reference works in s = 1 - t with the velocity negated, diffusion g = 2s, and the score
    from the velocity as for z = (1-s) x + s eps (SiT's formula): var = s^2 + t*s = s, so
    score = (t*v - z) / s and the drift -v - (g/2)*score, over ds = -dt, becomes
        z' = z + dt * ((1 + t) v - z) + sqrt(2 (1 - t) dt) * n,     n ~ N(0, 1),
    no noise on the last step (noise=None). The score assumes unit-variance eps, so with
    noise_scale 2 this is the reference's rule rather than an exact reverse SDE of the data."""
    dt = t_next - t_cur
    z_next = z + dt * ((1 + t_cur) * v - z)
    if noise is not None:
        z_next = z_next + (2 * (1 - t_cur) * dt) ** 0.5 * noise
    return z_next


@torch.no_grad()
def sample(
    net: Net, text: torch.Tensor, mask: torch.Tensor, shape: tuple[int, ...], cfg: SamplerConfig,
    generator: torch.Generator | list[torch.Generator] | None = None, noise: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Go from noise (t=0) to an image (t=1) with cfg.sampler. shape = [B, C, H, W].

    `generator` is one torch.Generator or one per image. The starting noise is `noise` if given,
    else drawn from the generator; `sde` also draws one N(0, 1) [B, C, H, W] per step but the last
    from it, so it needs a generator. Deterministic for given generators and noise.
    """
    device = text.device
    if cfg.sampler == "sde" and generator is None:
        raise ValueError("sampler 'sde' draws noise at every step: pass a generator (or one per image) to sample()")
    if noise is None:
        noise = normal_like(shape, generator, device)
    z = noise.float() * cfg.noise_scale
    mask = mask.bool()
    jump = FINAL_JUMP if cfg.sampler == "euler-4e-2" else 0.0
    ts = timesteps(cfg.steps, cfg.time_shift, final_jump=jump).tolist()
    for i in range(cfg.steps):
        t_cur, t_next = ts[i], ts[i + 1]
        last = i == cfg.steps - 1
        d_cur = guided_velocity(net, z, t_cur, text, mask, cfg)
        if cfg.sampler == "sde":
            z_next = sde_step(z, d_cur, t_cur, t_next, None if last else normal_like(tuple(z.shape), generator, device))
        else:
            z_next = z + (t_next - t_cur) * d_cur
        if cfg.sampler == "heun" and not last:
            d_next = guided_velocity(net, z_next, t_next, text, mask, cfg)
            z_next = z + (t_next - t_cur) * 0.5 * (d_cur + d_next)
        z = z_next
        if callback is not None:
            callback(i, z)
    return z
