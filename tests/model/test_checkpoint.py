import pytest
import torch

from model.checkpoint import available_weights, load_weights, save_weights
from model.denoiser import DenoiserConfig
from model.mmjit import MMJiT, preset
from model.text_encoder import TextEncoderConfig


def test_round_trip_and_ema_preference(tmp_path):
    cfg = preset("debug", text_length=8)
    net = MMJiT(cfg)
    torch.nn.init.normal_(net.final.weight)
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
