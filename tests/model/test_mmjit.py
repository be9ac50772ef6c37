import dataclasses
import math

import pytest
import torch

from model.mmjit import (
    MMJiT, PRESETS, RMSNorm, apply_rope, count_params, forward_flops, preset, rope_angles_1d, rope_angles_2d,
)
from model.released import unused_shapes
from tests.model.released_layout import PREFIX, debug_config, is_gain, plain_forward, random_state


def small(name: str, **kw):
    """A preset at a small image size and one block: the real layer shapes, cheap to run."""
    size = 2 * (32 if name == "B/32" else 16) if name != "debug" else 32
    return preset(name, image_size=size, text_dim=32, text_length=8, depth=1, **kw)


def inputs(cfg, B=2, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    text = torch.randn(B, L, cfg.text_dim, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, L // 2:] = False
    return x, text, mask


def randomize_output(net):
    torch.manual_seed(1)
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.02)


def live_debug_net(attn_mask: bool):
    """The debug preset with 8 text positions and a non-zero output layer, and its inputs."""
    cfg = preset("debug", text_length=8, attn_mask=attn_mask)
    net = MMJiT(cfg).eval()
    randomize_output(net)
    return net, *inputs(cfg)


@pytest.mark.parametrize("name", list(PRESETS))
def test_shapes_every_preset(name):
    cfg = small(name)
    net = MMJiT(cfg)
    x, text, mask = inputs(cfg)
    out = net(x, text, mask)
    assert out.shape == x.shape
    assert out.dtype == torch.float32


def test_output_exactly_zero_at_init():
    cfg = preset("debug")
    x, text, mask = inputs(cfg)
    assert torch.count_nonzero(MMJiT(cfg)(x, text, mask)) == 0


def test_every_weight_but_the_last_blocks_text_update_gets_a_gradient():
    # The last joint block's text output reaches nothing: its out-proj, MLP and the norm before it
    # are skipped (the weights stay, as in MiniT2I's layout). Everything else must learn, every
    # norm gain included.
    net, x, text, mask = live_debug_net(False)
    net(x, text, mask).square().mean().backward()
    last = len(net.double_blocks) - 1
    idle = {n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()}
    assert idle == {n for n, _ in net.named_parameters()
                    if n.startswith(tuple(f"double_blocks.{last}.txt_{m}." for m in ("attn_proj", "mlp", "norm2")))}


def test_parameter_names_are_the_released_ones():
    # The released checkpoints' keys without `model.net.`, less the two parts no forward reads.
    cfg = preset("debug", text_length=8)
    released = {k.removeprefix(PREFIX) for k in random_state(debug_config())}
    assert set(MMJiT(cfg).state_dict()) == released - set(unused_shapes(cfg.text_dim, cfg.width))


def test_unit_gains_leave_every_norm_bit_identical():
    # With all gains 1 (their init) the network computes exactly what it did without gains.
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(RMSNorm(64)(x), torch.nn.functional.rms_norm(x, (64,), eps=1e-6))


def _with_released_weights(gains_one: bool):
    """The debug net with random released weights (gains 1 or random) and its plain-code twin."""
    c = debug_config()
    state = random_state(c, seed=3)
    if gains_one:
        state = {k: torch.ones_like(v) if is_gain(k) else v for k, v in state.items()}
    net = MMJiT(preset("debug", text_length=8)).eval()
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith(("t_embedder.", "pooled_embedder."))})
    return net, c, state


def test_forward_equals_plain_reference_code_with_unit_gains():
    net, c, state = _with_released_weights(gains_one=True)
    x, text, mask = inputs(net.config)
    with torch.no_grad():
        ours, ref = net(x, text, mask), plain_forward(state, c, x, text, mask)
    assert ours.abs().mean() > 0.1
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("family", ["img_norm1", "txt_norm1", "img_norm2", "q_norm", "k_norm",
                                    "txt_preamble_blocks.0.norm1", "txt_preamble_blocks.1.norm2", "norm_final"])
def test_norm_gains_change_the_output(family):
    net, _, _ = _with_released_weights(gains_one=True)
    x, text, mask = inputs(net.config)
    with torch.no_grad():
        before = net(x, text, mask)
        hits = [p for n, p in net.named_parameters() if family in n and n.endswith(".weight") and p.dim() == 1]
        assert hits
        for p in hits:
            p.mul_(1.5)
        assert not torch.allclose(net(x, text, mask), before, atol=1e-4)


@pytest.mark.parametrize("attn_mask", [False, True])
def test_padded_text_positions_do_not_change_the_image(attn_mask):
    """Padded features never reach the network (the mask token replaces them), masked or not."""
    net, x, text, mask = live_debug_net(attn_mask)
    out = net(x, text, mask)
    text2 = text.clone()
    text2[~mask] = torch.randn_like(text2[~mask]) * 100
    assert torch.equal(net(x, text2, mask), out)
    # ...while a valid token does change it
    text3 = text.clone()
    text3[0, 0] += 1.0
    assert not torch.allclose(net(x, text3, mask)[0], out[0])


@pytest.mark.parametrize("attn_mask", [False, True])
def test_dropped_caption_is_finite_and_ignores_text(attn_mask):
    net, x, text, _ = live_debug_net(attn_mask)
    empty = torch.zeros(2, 8, dtype=torch.bool)
    a = net(x, text, empty)
    b = net(x, torch.randn_like(text), empty)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_unmasked_attention_sees_the_mask_tokens_as_minit2i_does():
    """Without the attention mask (the default, as in MiniT2I), padded positions are attended as
    mask tokens, so the padding length matters; with attn_mask=True it does not."""
    same = {}
    for attn_mask in (False, True):
        net, x, text, _ = live_debug_net(attn_mask)
        valid = torch.zeros(2, 8, dtype=torch.bool)
        valid[:, :3] = True                                     # 3 real tokens, then 5 padded ...
        long = net(x, text, valid)
        short = net(x, text[:, :4], valid[:, :4])               # ... or the same 3 and 1 padded
        same[attn_mask] = torch.allclose(long, short, atol=1e-5)
    assert same == {False: False, True: True}


def _dot_after_rope(angles, q, k, m, n):
    cos, sin = angles.cos().float(), angles.sin().float()
    qr = apply_rope(q[None, None, None], cos[m][None], sin[m][None])
    kr = apply_rope(k[None, None, None], cos[n][None], sin[n][None])
    return (qr * kr).sum()


def test_rope_depends_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(32), torch.randn(32)
    text = rope_angles_1d(32, torch.arange(40), 10000.0)
    d1 = _dot_after_rope(text, q, k, 3, 10)
    d2 = _dot_after_rope(text, q, k, 20, 27)
    d3 = _dot_after_rope(text, q, k, 20, 28)
    assert torch.allclose(d1, d2, atol=1e-5) and not torch.allclose(d1, d3, atol=1e-3)

    grid = 8
    img = rope_angles_2d(32, grid, 10000.0)
    at = lambda r, c: r * grid + c
    e1 = _dot_after_rope(img, q, k, at(1, 2), at(3, 5))
    e2 = _dot_after_rope(img, q, k, at(4, 1), at(6, 4))      # same (dr, dc) = (2, 3)
    e3 = _dot_after_rope(img, q, k, at(4, 1), at(6, 5))
    e4 = _dot_after_rope(img, q, k, at(1, 2), at(4, 4))      # rows and columns are not interchangeable
    assert torch.allclose(e1, e2, atol=1e-5)
    assert not torch.allclose(e1, e3, atol=1e-3) and not torch.allclose(e1, e4, atol=1e-3)


def test_reference_parameter_counts():
    # With FLAN-T5-large's 1024-dim features. Gains: 4 block norms [D] + q/k-norm [Dh] per joint
    # block, 2 [D] + 2 [Dh] per text block, the final norm (CONTEXT.md: 58,496 and 123,656).
    b16, l16 = preset("B/16", text_dim=1024), preset("L/16", text_dim=1024)
    assert count_params(b16, norm_gains_only=True) == 17 * (4 * 768 + 2 * 64) + 2 * (2 * 768 + 2 * 64) + 768 == 58_496
    assert count_params(l16, norm_gains_only=True) == 123_656
    assert count_params(b16) == 256_489_984 + 58_496
    # The released files also store a timestep embedder and a pooled-text embedder (cond width = D),
    # which makes B/16 the published "258M" and L/16 the "912M".
    unused = lambda cfg: sum(math.prod(s) for s in unused_shapes(cfg.text_dim, cfg.width).values())  # noqa: E731
    assert unused(b16) == 1_574_400 and round((count_params(b16) + unused(b16)) / 1e6) == 258
    assert round((count_params(l16) + unused(l16)) / 1e6) == 912
    assert preset("L/16").mlp_hidden == 3376 and preset("B/16").mlp_hidden == 2048


def test_flops_match_a_hand_count():
    cfg = preset("B/16", text_dim=1024)
    f = forward_flops(cfg)
    D, S, Fh = 768, 1280, 2048
    joint = 17 * (S * 2 * (4 * D * D + 3 * D * Fh) + 4 * S * S * D) - 256 * 2 * (D * D + 3 * D * Fh)  # last block: no text update
    assert f["joint_blocks"] == joint
    assert 395e9 < f["total"] < 410e9          # CONTEXT.md: ~400 GFLOPs for the B/16 denoiser


def test_bad_inputs_say_what_is_wrong():
    cfg = preset("debug")
    net = MMJiT(cfg)
    x, text, mask = inputs(cfg)
    with pytest.raises(ValueError, match="image batch has shape .*32, 32"):
        net(torch.randn(2, 3, 64, 64), text, mask)
    with pytest.raises(ValueError, match="text features .*64"):
        net(x, torch.randn(2, 8, 10), mask)
    with pytest.raises(ValueError, match="text mask"):
        net(x, text, mask[:, :3])
    with pytest.raises(ValueError, match="unknown model preset 'Z/9'.*debug, B/32, B/16, L/16"):
        preset("Z/9")
    with pytest.raises(ValueError, match="unknown model config key"):
        preset("debug", widht=3)
    with pytest.raises(ValueError, match="num_heads \\* head_dim"):
        dataclasses.replace(preset("debug"), num_heads=3)
