"""LoRA through peft (jobs/train/lora.py): only adapters train, under DeepSpeed ZeRO-2; peft's
adapter layout on disk; merging equals the unmerged forward; bad settings are one-line errors.
The whole run (Ray Train, resume, `weights merge`) is in tests/jobs/test_start_from_released.py."""

from __future__ import annotations

import json
import multiprocessing as mp
import queue as queue_lib
import time

import pytest
import torch

from jobs.train.lora import LoRAConfig, apply_lora, merge, read_adapters, save_adapters
from model.mmjit import MMJiT, preset

LORA = LoRAConfig(enabled=True, rank=4, alpha=8.0)


def base_model(seed: int = 0) -> MMJiT:
    """A debug MM-JiT whose zero-initialised output layer is made non-zero (so every layer matters)."""
    torch.manual_seed(seed)
    net = MMJiT(preset("debug", depth=2))
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.02)
    return net


def _lora_steps(queue) -> None:
    """Twelve ZeRO-2 steps of a LoRA engine on one fixed batch, in this (child) process."""
    from jobs.train.step import OptimConfig, TrainStep, build_engine, full_state, trainable
    from model.denoiser import DenoiserConfig

    net = base_model()
    cfg = net.config
    base = {k: v.clone() for k, v in net.state_dict().items()}
    optim = OptimConfig(lr=1e-2, warmup_steps=0, steps=12, zero_stage=2, compile=False)
    engine, precision = build_engine(cfg, optim, 4, torch.device("cpu"), base, lora=LORA)
    step = TrainStep(engine, precision, DenoiserConfig(caption_dropout=0.0), optim, None, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8, generator=g)
    text = torch.randn(4, cfg.text_length, cfg.text_dim, generator=g)
    mask = torch.ones(4, cfg.text_length, dtype=torch.bool)
    # The same samples (positions) every step: the same t and noise, so the loss can only fall by learning.
    losses = [step(i, x, text, mask, positions=[0, 1, 2, 3])["loss"].item() for i in range(12)]
    module = engine.module
    after = {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items() if "lora_" not in k}
    queue.put({"losses": losses, "base_same": sorted(k for k in base if torch.equal(base[k], after[k])),
               "base_keys": sorted(base), "trained": sorted(trainable(module)),
               "in_optimizer": sum(p.numel() for group in engine.optimizer.bit16_groups for p in group),
               "adapters": {k: v.numpy() for k, v in full_state(engine)[0].items()}})
    engine.destroy()


def test_only_the_adapters_train_under_zero2_and_the_loss_falls():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_lora_steps, args=(queue,))
    proc.start()
    deadline = time.monotonic() + 600
    while True:
        try:
            out = queue.get(timeout=2)
            break
        except queue_lib.Empty:
            assert proc.is_alive(), f"training child exited with code {proc.exitcode} before reporting"
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("training child took over 10 minutes")
    proc.join(timeout=60)
    assert proc.exitcode == 0
    losses = out["losses"]
    assert losses[-1] < 0.9 * losses[0], losses
    assert out["base_same"] == out["base_keys"]                         # every base weight bit-identical
    assert out["trained"] and all(".lora_A." in k or ".lora_B." in k for k in out["trained"])
    # 2 joint blocks x 4 target layers, each A [r, in] + B [out, r]: all that ZeRO partitions and steps.
    assert out["in_optimizer"] == sum(v.size for v in out["adapters"].values())
    assert any(abs(v).max() > 0 for k, v in out["adapters"].items() if ".lora_B." in k)   # B starts at 0 and moved


def test_merge_equals_the_unmerged_forward_and_the_files_are_peft_layout(tmp_path):
    net = base_model()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    apply_lora(net, LORA)
    with torch.no_grad():                                             # trained-looking adapters (B is 0 at init)
        for name, p in net.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.05)
    adapters = {k: v for k, v in net.named_parameters() if ".lora_" in k}
    save_adapters(tmp_path / "a", adapters, LORA)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    from safetensors.torch import load_file

    keys = sorted(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.double_blocks.0.img_attn_proj.lora_A.weight" and len(keys) == 16
    cfg, state = read_adapters(tmp_path / "a")
    assert (cfg.rank, cfg.alpha) == (4, 8.0) and state.keys() == adapters.keys()

    plain = MMJiT(net.config)
    plain.load_state_dict(base)
    merged = merge(plain, cfg, state, "test")
    assert type(merged) is MMJiT and merged.state_dict().keys() == base.keys()
    g = torch.Generator().manual_seed(2)
    c = net.config
    x, text = torch.randn(2, 3, c.image_size, c.image_size, generator=g), torch.randn(2, c.text_length, c.text_dim, generator=g)
    mask = torch.arange(c.text_length)[None] < torch.tensor([[5], [c.text_length]])
    with torch.no_grad():
        unmerged, folded = net.eval()(x, text, mask), merged.eval()(x, text, mask)
    assert (unmerged - folded).abs().max() < 1e-5
    alone = MMJiT(c).eval()
    alone.load_state_dict(base)
    with torch.no_grad():
        assert (alone(x, text, mask) - unmerged).abs().max() > 1e-4          # the adapters do change the output
    untouched = [k for k in base if "qkv" not in k and "attn_proj" not in k]
    assert all(torch.equal(merged.state_dict()[k], base[k]) for k in untouched)


def test_bad_lora_settings_are_one_line_errors(tmp_path, capsys):
    from jobs.cli import main
    from jobs.train.config import TrainConfig
    from jobs.train.driver import check
    from pipelines import config as config_lib

    with pytest.raises(ValueError, match="lora.rank must be >= 1, got 0"):
        config_lib.load(TrainConfig, None, ["lora.enabled=true", "lora.rank=0"])
    with pytest.raises(ValueError, match=r"lora.dropout must be in \[0, 1\), got 1.5"):
        LoRAConfig(enabled=True, dropout=1.5)
    assert LoRAConfig(rank=0).rank == 0                                 # off: not checked
    cfg = config_lib.load(TrainConfig, None, ["lora.enabled=true", "lora.target_modules=[img_qkv, to_q]",
                                              f"checkpoint.init_from={tmp_path}", "logging.sample_every=0"])
    with pytest.raises(ValueError, match="lora.target_modules: 'to_q' names no linear layer of MM-JiT; its linear "
                                         "layers are attn_proj, img_attn_proj, img_qkv, linear"):
        check(cfg)
    with pytest.raises(ValueError, match="unknown"):
        apply_lora(base_model(), LoRAConfig(enabled=True, target_modules=["unknown"]))
    cfg.lora.target_modules, cfg.checkpoint.init_from = ["img_qkv"], None
    with pytest.raises(ValueError, match="lora.enabled needs checkpoint.init_from"):
        check(cfg)
    assert main(["train", "lora.enabled=true", "lora.rank=-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("minit2i train: error: lora.rank must be >= 1, got -2")
