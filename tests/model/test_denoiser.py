import math

import pytest
import torch

from model.denoiser import (
    DenoiserConfig, SamplerConfig, add_noise, guided_velocity, per_sample_draws, sample, timesteps, training_loss, x_to_v,
)
from model.mmjit import MMJiT, preset


def test_x_to_v_and_loss_match_the_formulas():
    g = torch.Generator().manual_seed(0)
    B = 4
    x = torch.rand(B, 3, 8, 8, generator=g) * 2 - 1
    x_pred = torch.randn(B, 3, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.5, 0.995, 1.0])
    eps = torch.randn(B, 3, 8, 8, generator=g) * 2.0
    z = add_noise(x, t, eps)
    for b in range(B):
        assert torch.allclose(z[b], t[b] * x[b] + (1 - t[b]) * eps[b])
    v = x_to_v(x_pred, z, t, a_min=0.01)
    for b in range(B):
        denom = max(1 - t[b].item(), 0.01)
        assert torch.allclose(v[b], (x_pred[b] - z[b]) / denom)

    # The full training loss, recomputed by hand with the same random draws.
    cfg = DenoiserConfig(caption_dropout=0.0)
    net = lambda z_, text, mask: torch.tanh(z_) * 0.5
    text, mask = torch.zeros(B, 2, 4), torch.ones(B, 2, dtype=torch.bool)
    loss, stats = training_loss(net, x, text, mask, cfg, torch.Generator().manual_seed(7))
    g2 = torch.Generator().manual_seed(7)
    t2 = torch.sigmoid(cfg.t_mu + cfg.t_sigma * torch.randn(B, generator=g2))
    eps2 = torch.randn(x.shape, generator=g2) * cfg.noise_scale
    z2 = t2.view(-1, 1, 1, 1) * x + (1 - t2.view(-1, 1, 1, 1)) * eps2
    denom = torch.clamp(1 - t2, min=cfg.a_min).view(-1, 1, 1, 1)
    expected = (((torch.tanh(z2) * 0.5 - z2) / denom - (x - z2) / denom) ** 2).mean()
    assert torch.allclose(stats["t"], t2)
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_caption_dropout_zeroes_whole_masks():
    seen = {}

    def net(z, text, mask):
        seen["mask"] = mask
        return z

    B = 2000
    x = torch.zeros(B, 3, 2, 2)
    mask = torch.ones(B, 5, dtype=torch.bool)
    training_loss(net, x, torch.zeros(B, 5, 1), mask, DenoiserConfig(caption_dropout=0.1), torch.Generator().manual_seed(0))
    m = seen["mask"]
    rows_dropped = (~m.any(1)).float().mean().item()
    assert ((m.all(1)) | (~m.any(1))).all()          # rows are all-kept or all-dropped
    assert 0.08 < rows_dropped < 0.12


def test_per_sample_draws_depend_on_each_samples_generator_only():
    cfg = DenoiserConfig(t_mu=-0.8, t_sigma=0.8, noise_scale=2.0, caption_dropout=0.1)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    keep, t, eps = per_sample_draws(gens(range(4000)), (3, 2, 2), cfg)
    assert keep.shape == t.shape == (4000,) and eps.shape == (4000, 3, 2, 2)
    # Sample 7's draws are the same alone, first, or among other neighbours.
    for seeds in ([7], [7, 1, 2], [9, 8, 7]):
        k, tt, e = per_sample_draws(gens(seeds), (3, 2, 2), cfg)
        i = seeds.index(7)
        assert k[i] == keep[7] and tt[i] == t[7] and torch.equal(e[i], eps[7])
    # The distributions training_loss draws for a batch: 10% dropped, logit-normal t, eps ~ N(0, 2^2).
    assert 0.08 < 1 - keep.float().mean().item() < 0.12
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.8) < 0.05 and abs(logit.std().item() - 0.8) < 0.05
    assert abs(eps.std().item() - 2.0) < 0.05


def _net(seed=0):
    cfg = preset("debug", text_length=8)
    net = MMJiT(cfg).eval()
    torch.manual_seed(seed)
    torch.nn.init.normal_(net.final.weight, std=0.05)
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 8, cfg.text_dim, generator=g)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 4:] = False
    return net, text, mask


def test_cfg_scale_one_is_the_conditional_branch_and_scale_s_extrapolates():
    net, text, mask = _net()
    z = torch.randn(2, 3, 32, 32)
    t = 0.3
    tt = torch.full((2,), t)
    with torch.no_grad():
        v_cond = x_to_v(net(z, text, mask), z, tt, 0.05)
        v_unc = x_to_v(net(z, text, torch.zeros_like(mask)), z, tt, 0.05)
        v1 = guided_velocity(net, z, t, text, mask, SamplerConfig(cfg_scale=1.0))
        v3 = guided_velocity(net, z, t, text, mask, SamplerConfig(cfg_scale=3.0))
        v3_outside = guided_velocity(net, z, t, text, mask, SamplerConfig(cfg_scale=3.0, cfg_interval=(0.5, 1.0)))
    assert torch.allclose(v1, v_cond, atol=1e-6)
    assert torch.allclose(v3, v_unc + 3.0 * (v_cond - v_unc), atol=1e-5)
    assert torch.allclose(v3_outside, v_cond, atol=1e-6)        # outside the interval: no guidance


def test_euler_converges_to_the_exact_flow_on_gaussian_data():
    # Data x ~ N(m, s^2) per pixel and eps ~ N(0, n^2): the ideal x-predictor is the posterior mean,
    # and the ODE maps noise z0 = n*u exactly to x = m + s*u (the flow is affine for Gaussians).
    m, s, n = 0.3, 0.5, 2.0

    def oracle(z, text, mask):
        # t is recovered from the sampler's schedule through a closure below
        t = oracle.t
        var = t * t * s * s + (1 - t) ** 2 * n * n
        return m + t * s * s / var * (z - t * m)

    def net(z, text, mask):
        return oracle(z, text, mask)

    u = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    exact = m + s * u
    errors = []
    for steps in (8, 32, 128, 512):
        ts = timesteps(steps).tolist()
        calls = iter(ts[:-1])

        def stepping_net(z, text, mask):
            oracle.t = next(calls)
            return oracle(z, text, mask)

        cfg = SamplerConfig(sampler="euler", steps=steps, cfg_scale=1.0, noise_scale=n, a_min=1e-12)
        out = sample(stepping_net, torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool), u.shape, cfg, noise=u)
        errors.append((out - exact).abs().max().item())
    print("euler max error by steps 8/32/128/512:", errors)
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 0.01
    assert errors[2] / errors[3] > 3        # first order: ~4x smaller error for 4x the steps


def test_time_shift_schedule():
    t = timesteps(10)
    assert t[0] == 0 and t[-1] == 1 and torch.allclose(t, torch.linspace(0, 1, 11))
    shifted = timesteps(10, shift=3.0)
    assert shifted[0] == 0 and math.isclose(shifted[-1].item(), 1.0)
    assert (shifted[1:-1] < t[1:-1]).all()      # more steps spent at high noise (small t)


def test_sampling_is_bit_identical_for_a_seed():
    net, text, mask = _net()
    cfg = SamplerConfig(sampler="heun", steps=6, cfg_scale=2.0)
    a = sample(net, text, mask, (2, 3, 32, 32), cfg, generator=torch.Generator().manual_seed(42))
    b = sample(net, text, mask, (2, 3, 32, 32), cfg, generator=torch.Generator().manual_seed(42))
    c = sample(net, text, mask, (2, 3, 32, 32), cfg, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_sampler_settings_are_refused():
    with pytest.raises(ValueError, match="sampler must be"):
        SamplerConfig(sampler="dpm")
    with pytest.raises(ValueError, match="cfg_interval"):
        SamplerConfig(cfg_interval=(0.8, 0.2))


def test_debug_model_overfits_a_handful_of_pairs():
    # Four fixed image-caption pairs; the v-loss of the debug model must fall by at least 4x.
    torch.manual_seed(0)
    cfg = preset("debug", text_length=8)
    net = MMJiT(cfg)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images = torch.stack([
        torch.stack([xx, yy, -xx]), torch.stack([yy, -xx, xx * yy]),
        torch.stack([torch.sin(3 * xx), torch.cos(3 * yy), xx]), torch.stack([-yy, xx * 0.5, yy * 0.5]),
    ])
    text = torch.randn(4, 8, cfg.text_dim, generator=g)
    mask = torch.ones(4, 8, dtype=torch.bool)
    den = DenoiserConfig(caption_dropout=0.0)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    eval_gen = lambda: torch.Generator().manual_seed(123)

    def eval_loss():
        with torch.no_grad():
            return sum(training_loss(net, images, text, mask, den, eval_gen())[0].item() for _ in range(4)) / 4

    before = eval_loss()
    for step in range(200):
        loss, _ = training_loss(net, images, text, mask, den, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before / 4, (before, after)
