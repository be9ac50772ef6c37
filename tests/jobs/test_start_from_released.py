"""The whole path a user takes from MiniT2I's released weights, at debug size, from the command line:
import (the diffusers folder and the PyTorch port's `.pt`) -> sample -> generate -> eval -> tune
sampling (EMA vs raw) -> a full finetune (`train checkpoint.init_from=`) and a LoRA finetune on Ray
Train + DeepSpeed ZeRO-2, resumed, merged, and sampled again.

The released folders are written by the test in the published layout (tests/model/released_layout.py)
with the shapes of the tiny training runs (tests/jobs/train/fixtures.py), so every run here is the
same size as the other training tests and shares their dataset and Ray instance.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from jobs.cli import main
from model.checkpoint import available_weights, load_weights, read_meta
from tests.jobs.train.fixtures import latest, tiny, trace
from tests.model.released_layout import debug_config, port_checkpoint, port_state_names, random_state, write_released

PROMPTS = ["a red square on the left", "a blue square on the right"]


def release_config() -> dict:
    """config.json of a release with the tiny runs' shapes: 16px, one joint block, 16 text tokens, tiny T5."""
    return debug_config(image_size=16, depth_double=1, prompt_length=16, llm="tiny-t5")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """`weights import` of a whole Hub-style folder (model=) and of a port `.pt` (raw + EMA)."""
    root = tmp_path_factory.mktemp("released")
    c = release_config()
    write_released(root / "MiniT2I" / "minit2i-b-16", c, random_state(c, seed=0))
    write_released(root / "MiniT2I" / "minit2i-l-16", c, random_state(c, seed=1))
    assert main(["weights", "import", str(root / "MiniT2I"), str(root / "b16"), "model=minit2i-b-16"]) == 0
    state = port_state_names(random_state(c, seed=2))
    ema = port_state_names(random_state(c, seed=3))
    pt = port_checkpoint(root / "checkpoint_000100.pt", state, ema, image_size=16, depth_double=1, prompt_length=16)
    assert main(["weights", "import", str(pt), str(root / "port")]) == 0
    return root


def test_imported_weights_sample_generate_and_evaluate(imported, ray_session, tmp_path, capsys):
    b16 = imported / "b16"
    assert available_weights(b16) == ["ema_0.99995"]                # the Hub weights are the EMA
    assert main(["sample", f"checkpoint={b16}", "sampler.preset=default", "sampler.steps=2", f"prompts={json.dumps(PROMPTS)}",
                 f"out={tmp_path / 'grid.png'}"]) == 0
    assert "ema_0.99995, euler 2 steps" in capsys.readouterr().out and Image.open(tmp_path / "grid.png").size[0] >= 128

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert main(["generate", f"prompts={tmp_path / 'prompts.txt'}", f"checkpoint={b16}", "sampler.preset=default",
                 "sampler.steps=2", f"out={tmp_path / 'gen'}", "seeds=[0]"]) == 0
    assert main(["eval", f"images={tmp_path / 'gen'}", f"out={tmp_path / 'ev'}"]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["summary"]["images"] == 2 and summary["summary"]["artifact_ratio"] > 0
    assert summary["settings"]["sampler"]["a_min"] == 0.05 and summary["settings"]["weights"] == "ema_0.99995"
    # eval that generates, with the preset through generate.sampler; a contradicting preset is refused first.
    assert main(["eval", f"generate.prompts={tmp_path / 'prompts.txt'}", f"generate.checkpoint={b16}",
                 "generate.sampler.preset=default", "generate.sampler.steps=2", f"out={tmp_path / 'ev2'}"]) == 0
    assert json.loads((tmp_path / "ev2" / "summary.json").read_text())["summary"]["images"] == 2
    capsys.readouterr()
    assert main(["generate", f"prompts={tmp_path / 'prompts.txt'}", f"checkpoint={b16}", "sampler.preset=b16-coco_fid",
                 f"out={tmp_path / 'gen3'}"]) == 2
    assert "sampler preset b16-coco_fid is for 512px images, but" in capsys.readouterr().err
    assert not (tmp_path / "gen3").exists()


def test_tune_sampling_sweeps_ema_against_raw_weights_of_the_port_import(imported, ray_session, tmp_path):
    port = imported / "port"
    assert available_weights(port) == ["ema_0.99995", "model"]
    space = "{cfg_scale: {grid: [2.0]}, sampler: euler, steps: 2, weights: {grid: all}}"
    assert main(["tune", "sampling", f"checkpoint={port}", "preset=default", f"space={space}", "subsets=[2]",
                 "batch_size=2", "objective.artifact_max=100", f"run.out={tmp_path / 'tune'}", "run.num_samples=1"]) == 0
    table = pd.read_csv(tmp_path / "tune" / "results.csv")
    assert sorted(table.weights) == ["ema_0.99995", "model"] and (table.status == "TERMINATED").all()
    assert (table.objective.notna()).all()
    assert main(["tune", "sampling", f"checkpoint={port}", "space={noise_scale: {grid: [1.0]}}",
                 f"run.out={tmp_path / 'tune2'}"]) == 2                # imported weights fix the start noise


def test_full_finetune_starts_from_the_imported_weights(imported, ray_session, squares, runs):
    from jobs.train.driver import main as train

    cfg = tiny(runs, squares, "from-released", "scaling.num_workers=1", "optim.steps=2", "optim.lr=0.0",
               "ema.decays=[0.9]", f"checkpoint.init_from={imported / 'b16'}")
    train(cfg)
    ckpt = latest(runs / "runs" / "from-released")
    finetuned = load_file(str(ckpt / "model.safetensors"))
    released_w = load_file(str(imported / "b16" / "ema_0.99995.safetensors"))
    assert finetuned.keys() == released_w.keys()
    assert all(torch.equal(finetuned[k], released_w[k]) for k in finetuned)     # lr 0: the start, bit for bit


def test_lora_finetune_resumes_and_merges_into_a_weights_folder(imported, ray_session, squares, runs, tmp_path, capsys):
    from jobs.train.driver import main as train

    base = imported / "b16"
    args = ["scaling.num_workers=2", "optim.zero_stage=2", "optim.lr=1e-2", "optim.warmup_steps=0",
            "checkpoint.every=2", f"checkpoint.init_from={base}", "lora.enabled=true", "lora.rank=4", "lora.alpha=8",
            "ema.decays=[0.5]"]
    train(tiny(runs, squares, "lora", "optim.steps=2", *args))
    first = latest(runs / "runs" / "lora")
    assert (first / "adapter_model.safetensors").is_file() and (first / "ema_0.5" / "adapter_config.json").is_file()
    assert not (first / "model.safetensors").exists()                # adapters only: the base stays where it is
    assert json.loads((first / "train_state.json").read_text())["lora_base"]["path"] == str(base)

    train(tiny(runs, squares, "lora", "optim.steps=4", *args))      # the same run, longer: resumes at step 2
    steps = trace(runs / "trace" / "lora")
    assert sorted(steps) == [0, 1, 2, 3]
    assert json.loads((latest(runs / "runs" / "lora") / "train_state.json").read_text())["step"] == 4

    out = tmp_path / "merged"
    assert main(["weights", "merge", str(runs / "runs" / "lora"), str(out)]) == 0
    assert "LoRA rank 4" in capsys.readouterr().out
    merged, meta = load_weights(out)
    assert meta["weights"] == "ema_0.5" and meta["sampling"] == read_meta(base)["sampling"]
    base_net, _ = load_weights(base)
    b, m = base_net.state_dict(), merged.state_dict()
    targets = ("img_qkv", "txt_qkv", "img_attn_proj", "txt_attn_proj")
    assert all(torch.equal(m[k], b[k]) for k in b if not any(f".{t}." in k for t in targets))
    assert any(not torch.equal(m[k], b[k]) for k in b if ".img_qkv.weight" in k)     # the adapters moved
    assert main(["sample", f"checkpoint={out}", "sampler.steps=2", "prompts=[a red square]",
                 f"out={tmp_path / 'merged.png'}"]) == 0
    assert main(["weights", "merge", str(base), str(tmp_path / "m2")]) == 2
    assert "holds no LoRA adapters" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds LoRA adapters, not weights: fold them into their base with"):
        load_weights(latest(runs / "runs" / "lora"))
