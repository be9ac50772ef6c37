import torch
from PIL import Image

from model.checkpoint import save_weights
from model.denoiser import DenoiserConfig
from model.mmjit import MMJiT, preset
from model.text_encoder import TextEncoderConfig, build_tiny_t5
from tests.conftest import run_cli


def test_sample_cli_from_a_checkpoint_writes_a_grid(tmp_path):
    t5 = build_tiny_t5(tmp_path / "t5", d_model=32, num_layers=1, num_heads=2)
    cfg = preset("debug", text_dim=32, text_length=16)
    net = MMJiT(cfg)
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.05)
    save_weights(tmp_path / "ckpt", net.state_dict(), cfg, TextEncoderConfig(str(t5), 16), DenoiserConfig(), name="ema_0.999")
    out = tmp_path / "grid.png"
    args = ["sample", f"checkpoint={tmp_path / 'ckpt'}", "prompts=[a red circle, two blue squares]",
            "per_prompt=2", "sampler.steps=3", "sampler.cfg_scale=3", "sampler.sampler=euler", "seed=5", f"out={out}"]
    proc = run_cli(*args)
    assert "ema_0.999" in proc.stdout
    first = Image.open(out).tobytes()
    assert Image.open(out).size[0] >= 2 * 128
    run_cli(*args)
    assert Image.open(out).tobytes() == first            # same seed, same grid


def test_sample_cli_reports_bad_input(tmp_path, cli):
    code, _, error = cli("sample", f"checkpoint={tmp_path / 'missing'}")
    assert code == 2 and "missing does not exist: give a weights folder, a checkpoint or a training run" in error
    (tmp_path / "empty").mkdir()
    code, _, error = cli("sample", f"checkpoint={tmp_path / 'empty'}")
    assert code == 2 and "empty has no model.json and no complete checkpoint in it" in error
    code, _, error = cli("sample", "preset=Q/7", "sampler.steps=1", f"out={tmp_path / 'g.png'}")
    assert code == 2 and "unknown model preset 'Q/7'" in error
