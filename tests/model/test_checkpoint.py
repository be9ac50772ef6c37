import pytest
import torch

from model.checkpoint import available_weights, load_weights, save_weights
from model.denoiser import DenoiserConfig
from model.mmjit import MMJiT, preset
from model.text_encoder import TextEncoderConfig


def test_round_trip_and_ema_preference(tmp_path):
    cfg = preset("debug", text_length=8)
    net = MMJiT(cfg)
    torch.nn.init.normal_(net.final_layer.linear.weight)
    ema = {k: v + 1 for k, v in net.state_dict().items()}
    save_weights(tmp_path, net.state_dict(), cfg, TextEncoderConfig("tiny-t5", 8), DenoiserConfig(), name="model")
    save_weights(tmp_path, ema, cfg, TextEncoderConfig("tiny-t5", 8), DenoiserConfig(), name="ema_0.999")
    save_weights(tmp_path, ema, cfg, TextEncoderConfig("tiny-t5", 8), DenoiserConfig(), name="ema_0.9999")
    assert available_weights(tmp_path) == ["ema_0.9999", "ema_0.999", "model"]
    loaded, meta = load_weights(tmp_path, "model")
    assert meta["weights"] == "model" and meta["text_encoder"]["prompt_length"] == 8
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    best, meta = load_weights(tmp_path)
    assert meta["weights"] == "ema_0.9999"
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_or_wrong_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no model.json"):
        load_weights(tmp_path)
    cfg = preset("debug", text_length=8)
    save_weights(tmp_path, MMJiT(cfg).state_dict(), cfg, TextEncoderConfig(), DenoiserConfig())
    with pytest.raises(FileNotFoundError, match="no ema_1.safetensors; it has: model"):
        load_weights(tmp_path, "ema_1")
    other = preset("debug", text_length=8, depth=1)
    save_weights(tmp_path, MMJiT(other).state_dict(), cfg, TextEncoderConfig(), DenoiserConfig(), name="model")
    with pytest.raises(ValueError, match="does not match the model"):
        load_weights(tmp_path, "model")


def _legacy_names(state: dict) -> dict:
    """Our state dict as folders written before the released layout named it: no norm gains, a
    [C_txt] mask token, `patch_embed`, `text_blocks.i.text.*`, `blocks.i.{image,text}.*`, `final`."""
    out = {}
    for k, v in state.items():
        if k.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight", "norm_final.weight")):
            continue
        k = (k.replace("img_embedder.", "patch_embed.").replace("txt_embedder.", "text_embed.")
             .replace("final_layer.linear.", "final.").replace("double_blocks.", "blocks.")
             .replace("txt_preamble_blocks.", "text_blocks.").replace("attn_proj.", "proj."))
        parts = k.split(".")
        if parts[0] == "text_blocks":
            parts.insert(2, "text")
        elif parts[0] == "blocks":
            stream, name = parts[2].split("_", 1)
            parts[2:3] = [{"img": "image", "txt": "text"}[stream], name]
        out[".".join(parts)] = v.reshape(-1) if k == "mask_token" else v
    return out


def test_weights_folders_from_before_the_released_layout_still_load(tmp_path):
    cfg = preset("debug", text_length=8)
    net = MMJiT(cfg).eval()
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.05)
    old = _legacy_names(net.state_dict())
    assert "blocks.0.image.qkv.weight" in old and "text_blocks.1.text.proj.bias" in old and old["mask_token"].dim() == 1
    save_weights(tmp_path, old, cfg, TextEncoderConfig("tiny-t5", 8), DenoiserConfig())
    with pytest.warns(UserWarning, match="predates the released parameter layout"):
        loaded, meta = load_weights(tmp_path)
    assert meta["legacy_layout"]
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, net.state_dict()[k]), k          # names mapped, gains 1 as at init
    # Resuming a training run of that age (its raw state dict straight into the model) is refused.
    with pytest.raises(ValueError, match="predate the released parameter layout.*cannot be resumed.*init_from"):
        MMJiT(cfg).load_state_dict(old)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 8, 64, generator=g)
    mask = torch.ones(2, 8, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(loaded(x, text, mask), net(x, text, mask))


def test_mismatched_keys_name_the_key_and_both_shapes(tmp_path):
    cfg = preset("debug", text_length=8)
    state = MMJiT(cfg).state_dict()
    state["txt_embedder.weight"] = torch.zeros(128, 65)
    del state["double_blocks.2.q_norm.weight"]
    state["extra.bias"] = torch.zeros(3)
    save_weights(tmp_path, state, cfg, TextEncoderConfig(), DenoiserConfig())
    with pytest.raises(ValueError) as err:
        load_weights(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing double_blocks.2.q_norm.weight [32]" in msg
    assert "unexpected extra.bias [3]" in msg
    assert "txt_embedder.weight is [128, 65] but the model expects [128, 64]" in msg
