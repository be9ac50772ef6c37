import json
import math

import pytest
import torch
from safetensors.torch import load_file

from model import released
from model.checkpoint import available_weights, load_weights, read_meta
from model.mmjit import count_params, preset
from tests.model.released_layout import (
    PREFIX, debug_config, fold_gains, plain_forward, port_checkpoint, port_state_names, random_state, released_config,
    released_shapes, write_released,
)


def inputs(B=2, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 5:] = False                                          # padding becomes mask tokens
    return torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, L, 64, generator=g), mask


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A debug-sized released model folder: config.json + safetensors with `model.net.*` keys."""
    root = tmp_path_factory.mktemp("release")
    c = debug_config()
    state = random_state(c, seed=0)
    write_released(root / "minit2i-debug", c, state)
    return root / "minit2i-debug", c, state


@pytest.mark.parametrize("name, over", [("B/16", {}), ("L/16", dict(hidden_size=1248, cond_vec_size=1248, depth_double=23,
                                                                      num_heads=24, head_dim=52, mlp_ratio=2.7))])
def test_released_key_set_and_shapes_of_full_size_models_on_the_meta_device(name, over):
    # Only shapes: the full-size checkpoints are never materialised.
    c = released_config(**over)
    shapes = {k: torch.Size(s) for k, s in released_shapes(c).items()}
    cfg, found, _, unused = released.released_to_ours(shapes, c, name)
    assert found == name and cfg == preset(name, text_dim=1024, image_size=512, text_length=256)
    assert unused == sorted(PREFIX + k for k in ("t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight",
                                                 "t_embedder.mlp.2.bias", "pooled_embedder.weight"))
    used = sum(math.prod(s) for k, s in shapes.items() if k not in unused)
    assert used == count_params(cfg)
    print(f"{name}: {used:,} used + {sum(math.prod(shapes[k]) for k in unused):,} stored unused")
    wrong = dict(shapes, **{PREFIX + "double_blocks.16.k_norm.weight": torch.Size([63])})
    with pytest.raises(ValueError, match=r"double_blocks\.16\.k_norm\.weight is \[63\] but the model expects \[[0-9]+\]"):
        released.released_to_ours(wrong, c, name)


def test_import_then_export_is_bit_identical(release, tmp_path):
    model_dir, c, state = release
    report = released.import_weights(model_dir, tmp_path / "w")
    # The Hub's weights are the EMA: named so, and what every loader picks by default.
    assert report.preset == "debug" and report.weights == ["ema_0.99995"] and len(report.dropped) == 5
    meta = read_meta(tmp_path / "w")
    assert meta["imported_from"]["ema_decay_source"] == "assumed (B recipe)"
    assert load_weights(tmp_path / "w")[1]["weights"] == "ema_0.99995"
    assert meta["model"] == meta["model"] | {"text_dim": 64, "image_size": 32, "text_length": 8}
    assert meta["text_encoder"]["name_or_path"] == "tiny-t5" and meta["denoiser"]["noise_scale"] == 2.0
    assert meta["sampling"]["default"]["sampler"] == "euler" and meta["sampling"]["default"]["steps"] == 100
    w = load_file(str(tmp_path / "w" / "ema_0.99995.safetensors"))
    for k, v in w.items():
        assert torch.equal(v, state[PREFIX + k])

    out = released.export_diffusers(tmp_path / "w", tmp_path / "exported")
    exported_config = json.loads((out / "config.json").read_text())
    assert exported_config == c                                  # every field as the release wrote it
    exported = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in exported.items()} == released_shapes(c)   # a strict loader's key set
    released.import_weights(tmp_path / "exported", tmp_path / "w2", ema_decay=0.9999)
    w2 = load_file(str(tmp_path / "w2" / "ema_0.9999.safetensors"))
    assert w2.keys() == w.keys()
    assert all(w2[k].dtype == w[k].dtype and torch.equal(w2[k], w[k]) for k in w)
    assert read_meta(tmp_path / "w2")["model"] == meta["model"]


def test_export_of_a_model_trained_here_loads_as_the_released_layout(tmp_path):
    from model.checkpoint import save_weights
    from model.denoiser import DenoiserConfig
    from model.mmjit import MMJiT
    from model.text_encoder import TextEncoderConfig

    cfg = preset("debug", text_length=8)
    net = MMJiT(cfg)
    save_weights(tmp_path / "ours", net.state_dict(), cfg, TextEncoderConfig("tiny-t5", 8), DenoiserConfig(), name="ema_0.999")
    out = released.export_diffusers(tmp_path / "ours", tmp_path / "exported")
    c = json.loads((out / "config.json").read_text())
    assert c["_class_name"] == "MiniT2IMMJiTModel" and c["cond_vec_size"] == 128 and c["prediction"] == "x"
    assert c["_diffusers_version"] == "0.33.1"                        # as the released config.json carries it
    tensors = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == released_shapes(c)
    assert not tensors[PREFIX + "pooled_embedder.weight"].any()      # stored for strict loaders, never read


def test_imported_model_equals_the_gain_folded_reference_forward(release, tmp_path):
    model_dir, c, state = release
    released.import_weights(model_dir, tmp_path / "w")
    net, _ = load_weights(tmp_path / "w")
    x, text, mask = inputs()
    with torch.no_grad():
        ours = net(x, text, mask)
        folded = plain_forward(fold_gains(state), c, x, text, mask)
        unfolded = plain_forward({k.removeprefix(PREFIX): v for k, v in state.items()}, c, x, text, mask)
    assert ours.abs().mean() > 0.1
    assert torch.allclose(ours, folded, atol=1e-5), (ours - folded).abs().max()
    assert not torch.allclose(ours, unfolded, atol=1e-2)         # the gains matter: ignoring them is wrong


@pytest.mark.parametrize("change, message", [
    ("drop", r"missing model\.net\.double_blocks\.1\.q_norm\.weight \[32\]"),
    ("extra", r"unexpected model\.net\.double_blocks\.1\.gate\.weight \[4\]"),
    ("shape", r"model\.net\.txt_embedder\.weight is \[128, 65\] but the model expects \[128, 64\]"),
    ("unused shape", r"model\.net\.pooled_embedder\.weight is \[128, 63\] but the model expects \[128, 64\]"),
])
def test_missing_extra_or_misshaped_keys_are_named_and_nothing_is_written(release, tmp_path, change, message):
    _, c, state = release
    bad = dict(state)
    if change == "drop":
        del bad[PREFIX + "double_blocks.1.q_norm.weight"]
    elif change == "extra":
        bad[PREFIX + "double_blocks.1.gate.weight"] = torch.zeros(4)
    elif change == "shape":
        bad[PREFIX + "txt_embedder.weight"] = torch.zeros(128, 65)
    else:
        bad[PREFIX + "pooled_embedder.weight"] = torch.zeros(128, 63)
    write_released(tmp_path / "bad", c, bad)
    with pytest.raises(ValueError, match=message):
        released.import_weights(tmp_path / "bad", tmp_path / "w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]    # no output, no temp folder


def test_bad_config_and_existing_output_are_refused(release, tmp_path):
    model_dir, c, state = release
    write_released(tmp_path / "v", dict(c, prediction="v"), state)
    with pytest.raises(ValueError, match="prediction 'v'"):
        released.import_weights(tmp_path / "v", tmp_path / "w")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        released.import_weights(model_dir, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="not a released MiniT2I folder"):
        released.import_weights(tmp_path / "taken", tmp_path / "w")


def test_whole_hub_folder_needs_the_model_named(tmp_path):
    # MiniT2I/MiniT2I holds minit2i-b-16/ and minit2i-l-16/ (here two debug-sized stand-ins).
    c = debug_config()
    states = {name: random_state(c, seed=i) for i, name in enumerate(["minit2i-b-16", "minit2i-l-16"])}
    for name, state in states.items():
        write_released(tmp_path / "MiniT2I" / name, c, state)
    with pytest.raises(ValueError, match="holds the models minit2i-b-16, minit2i-l-16; choose one with model=NAME"):
        released.import_weights(tmp_path / "MiniT2I", tmp_path / "w")
    with pytest.raises(ValueError, match="no 'b16' there"):
        released.import_weights(tmp_path / "MiniT2I", tmp_path / "w", model="b16")
    with pytest.raises(ValueError, match="is the one model 'minit2i-b-16'; model='minit2i-l-16' does not name it"):
        released.import_weights(tmp_path / "MiniT2I" / "minit2i-b-16", tmp_path / "w", model="minit2i-l-16")
    released.import_weights(tmp_path / "MiniT2I" / "minit2i-b-16" / "transformer", tmp_path / "b", model="minit2i-b-16")
    released.import_weights(tmp_path / "MiniT2I", tmp_path / "w", model="minit2i-l-16")
    w = load_file(str(tmp_path / "w" / "ema_0.99995.safetensors"))
    assert torch.equal(w["txt_embedder.weight"], states["minit2i-l-16"][PREFIX + "txt_embedder.weight"])


def test_port_training_checkpoint_imports_raw_and_ema(tmp_path):
    c = debug_config()
    raw, ema = random_state(c, seed=1), random_state(c, seed=2)
    # A torch.compile'd model saves its state dict under `_orig_mod.`; the EMA copy is plain.
    pt = port_checkpoint(tmp_path / "checkpoint_001200.pt",
                         {"_orig_mod." + k: v for k, v in port_state_names(raw).items()}, port_state_names(ema))
    report = released.import_weights(pt, tmp_path / "w")
    assert report.weights == ["model", "ema_0.99995"] and len(report.dropped) == 5
    assert available_weights(tmp_path / "w") == ["ema_0.99995", "model"]
    meta = read_meta(tmp_path / "w")
    assert meta["step"] == 1200 and meta["denoiser"]["a_min"] == 0.05 and meta["sampling"]["default"]["cfg_scale"] == 2.0
    for name, src in (("model", raw), ("ema_0.99995", ema)):
        net, _ = load_weights(tmp_path / "w", name)
        for k, v in net.state_dict().items():
            assert torch.equal(v, src[PREFIX + k]), (name, k)
    x, text, mask = inputs()
    with torch.no_grad():
        assert torch.allclose(net(x, text, mask), plain_forward(fold_gains(ema), c, x, text, mask), atol=1e-5)


def test_port_checkpoints_of_another_network_or_format_are_refused(tmp_path):
    c = debug_config()
    state = port_state_names(random_state(c))
    with pytest.raises(ValueError, match="compat_checkpoint_arch"):
        released.import_weights(port_checkpoint(tmp_path / "a.pt", state, state, compat_checkpoint_arch=True), tmp_path / "w")
    torch.save({"state_dict": state}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="has no model, ema, config entry"):
        released.import_weights(tmp_path / "b.pt", tmp_path / "w")
    (tmp_path / "c.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a minit2i-torch training checkpoint"):
        released.import_weights(tmp_path / "c.pt", tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_published_sampler_settings_come_with_released_shapes():
    b16, l16 = released.published_sampling("B/16"), released.published_sampling("L/16")
    assert {k: v["cfg_scale"] for k, v in b16.items()} == {"geneval": 6.0, "dpg_bench": 6.0, "coco_fid": 2.0,
                                                           "default": 6.0, "general": 2.5}
    assert b16["geneval"] | {"sampler": "euler", "steps": 100, "a_min": 0.05, "noise_scale": 2.0,
                             "cfg_interval": (0.0, 1.0)} == b16["geneval"]
    assert l16["geneval"]["cfg_scale"] == 8.5 and l16["geneval"]["a_min"] == 0.01
    assert released.published_sampling("debug") == {}
