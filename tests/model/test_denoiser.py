import math

import pytest
import torch

from model.denoiser import (
    DenoiserConfig, SamplerConfig, add_noise, guided_velocity, per_sample_draws, sample, timesteps, training_loss, x_to_v,
)

NO_TEXT = (torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool))
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
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.05)
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


class GaussianOracle:
    """The ideal x-predictor for data x ~ N(m, s^2) per pixel and eps ~ N(0, n^2): the posterior
    mean m + t s^2 / var_t (z - t m), var_t = t^2 s^2 + (1-t)^2 n^2. It is told t by walking the
    grid the sampler is expected to use, so a sampler on another grid fails the test."""

    def __init__(self, m, s, n, grid):
        self.m, self.s, self.n, self.calls = m, s, n, iter(grid)

    def __call__(self, z, text, mask):
        t = next(self.calls)
        var = t * t * self.s ** 2 + (1 - t) ** 2 * self.n ** 2
        return self.m + t * self.s ** 2 / var * (z - t * self.m)


def test_euler_4e_2_grid_ends_at_0_96_then_jumps():
    assert torch.allclose(timesteps(5, final_jump=0.04), torch.tensor([0.0, 0.24, 0.48, 0.72, 0.96, 1.0]))
    shifted = timesteps(5, shift=3.0, final_jump=0.04)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] < torch.tensor([0.24, 0.48, 0.72, 0.96])).all()


@pytest.mark.parametrize("a_min", [1e-12, 0.05])
def test_euler_4e_2_converges_to_its_closed_form_on_gaussian_data(a_min):
    # Up to t = 0.96 the exact flow maps z0 = n u to z = 0.96 m + sd u, sd = sqrt(var_0.96); the last
    # step is one Euler jump of 0.04 with v = (x_hat - z) / max(0.04, a_min): it lands on the oracle's
    # x_hat when a_min <= 0.04, and only 0.04 / 0.05 = 80% of the way there with MiniT2I's a_min 0.05.
    m, s, n, T = 0.3, 0.5, 2.0, 0.96
    u = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sd = math.sqrt(T * T * s * s + (1 - T) ** 2 * n * n)
    z, x_hat = T * m + sd * u, m + T * s * s / sd * u
    exact = z + 0.04 / max(0.04, a_min) * (x_hat - z)
    errors = []
    for steps in (8, 32, 128, 512):
        grid = torch.cat([torch.linspace(0, T, steps, dtype=torch.float64), torch.ones(1, dtype=torch.float64)]).float().tolist()
        cfg = SamplerConfig(sampler="euler-4e-2", steps=steps, cfg_scale=1.0, noise_scale=n, a_min=a_min)
        out = sample(GaussianOracle(m, s, n, grid[:-1]), *NO_TEXT, u.shape, cfg, noise=u)
        errors.append((out - exact).abs().max().item())
    print(f"euler-4e-2 (a_min {a_min}) max error by steps 8/32/128/512:", errors)
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 0.01


def reference_sde(m, s, n, steps, u, generator, a_min=0.05):
    """minit2i-jax `sample_one_step_sde` as written, in float64: time s_ = 1 - t, the velocity
    negated, SiT's score from the velocity, drift v - g/2 score, noise sqrt(g) sqrt(|ds|) xi."""
    z = u.double() * n
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).float().tolist()
    for i in range(steps):
        t_cur, t_next = ts[i], ts[i + 1]
        var_t = t_cur ** 2 * s ** 2 + (1 - t_cur) ** 2 * n ** 2
        x_hat = m + t_cur * s ** 2 / var_t * (z - t_cur * m)
        v = (x_hat - z) / max(1 - t_cur, a_min)
        s_cur, s_next = 1 - t_cur, 1 - t_next
        ds, g = s_next - s_cur, 2 * s_cur
        alpha, d_alpha, sigma, d_sigma = 1 - s_cur, -1.0, s_cur, 1.0
        ratio = alpha / d_alpha
        score = (ratio * -v - z) / (sigma ** 2 - ratio * d_sigma * sigma)
        drift = -v - 0.5 * g * score
        xi = torch.randn(u.shape, generator=generator).double() if i < steps - 1 else 0.0
        z = z + drift * ds + math.sqrt(g) * math.sqrt(abs(ds)) * xi
    return z


def test_sde_follows_the_reference_update_rule_step_for_step():
    m, s, n, steps = 0.3, 0.5, 2.0, 20
    u = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64).float().tolist()
    cfg = SamplerConfig(sampler="sde", steps=steps, cfg_scale=1.0, noise_scale=n, a_min=0.05)
    out = sample(GaussianOracle(m, s, n, grid[:-1]), *NO_TEXT, u.shape, cfg, noise=u,
                 generator=torch.Generator().manual_seed(5))
    ref = reference_sde(m, s, n, steps, u, torch.Generator().manual_seed(5))
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()


def sde_moments(m, s, n, steps):
    """Closed form of the sde chain's output law on Gaussian data: each step is affine in z plus
    Gaussian noise, z' = a z + b + c xi, so mean' = a mean + b and var' = a^2 var + c^2."""
    mean, var = 0.0, n * n
    for i in range(steps):
        t, dt = i / steps, 1 / steps
        A = t * s * s / (t * t * s * s + (1 - t) ** 2 * n * n)            # x_hat = A z + (1 - A t) m
        v_a, v_b = (A - 1) / (1 - t), (1 - A * t) * m / (1 - t)          # v = v_a z + v_b
        a, b = 1 + dt * ((1 + t) * v_a - 1), dt * (1 + t) * v_b
        mean, var = a * mean + b, a * a * var + (2 * (1 - t) * dt if i < steps - 1 else 0.0)
    return mean, var


@pytest.mark.parametrize("n", [1.0, 2.0])
def test_sde_output_law_on_gaussian_data_matches_its_closed_form(n):
    # With unit noise the reference's score is the true one and the chain samples the data law
    # N(m, s^2). MiniT2I samples with noise 2.0, where that score formula (written for unit-variance
    # eps) over-corrects: the closed form ends with a far smaller variance than the data's.
    m, s, steps = 0.3, 0.5, 200
    u = torch.randn(1, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64).float().tolist()
    cfg = SamplerConfig(sampler="sde", steps=steps, cfg_scale=1.0, noise_scale=n, a_min=1e-12)
    out = sample(GaussianOracle(m, s, n, grid[:-1]), *NO_TEXT, u.shape, cfg, noise=u, generator=torch.Generator().manual_seed(1))
    mean, var = sde_moments(m, s, n, steps)
    print(f"sde noise {n}: closed form mean {mean:.4f} var {var:.4f}; samples {out.mean():.4f} {out.var():.4f}")
    assert abs(out.mean().item() - mean) < 0.01 and abs(out.var().item() / var - 1) < 0.05
    if n == 1.0:
        assert abs(mean - m) < 1e-6 and abs(var - s * s) < 0.01
    else:
        assert var < 0.5 * s * s


def test_sde_is_bit_identical_for_a_seed_and_per_image_generators_ignore_the_batch():
    net, text, mask = _net()
    cfg = SamplerConfig(sampler="sde", steps=5, cfg_scale=2.0)
    run = lambda seed: sample(net, text, mask, (2, 3, 32, 32), cfg, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(42), run(42)) and not torch.equal(run(42), run(43))
    with pytest.raises(ValueError, match="pass a generator"):
        sample(net, text, mask, (2, 3, 32, 32), cfg, noise=torch.zeros(2, 3, 32, 32))
    # One generator per image: image 1's noise at every step is its own, whoever shares its batch.
    m, s, n, steps = 0.3, 0.5, 2.0, 6
    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64).float().tolist()
    c = SamplerConfig(sampler="sde", steps=steps, cfg_scale=1.0, noise_scale=n)
    gens = lambda *seeds: [torch.Generator().manual_seed(x) for x in seeds]   # noqa: E731
    pair = sample(GaussianOracle(m, s, n, grid[:-1]), *NO_TEXT, (2, 1, 8, 8), c, generator=gens(7, 8))
    alone = sample(GaussianOracle(m, s, n, grid[:-1]), *NO_TEXT, (1, 1, 8, 8), c, generator=gens(8))
    assert torch.equal(pair[1:], alone)


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
    with pytest.raises(ValueError, match="sampler must be one of euler, heun, euler-4e-2, sde"):
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
