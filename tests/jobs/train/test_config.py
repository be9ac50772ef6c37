"""The named run configs under jobs/configs/ are MiniT2I's recipes and load as TrainConfig."""

import pytest

from jobs.train.config import TrainConfig
from pipelines import config as config_lib
from tests.conftest import ROOT


@pytest.mark.parametrize("name, lr, steps, warmup, decay, micro", [
    ("b16_pretrain", 4e-4, 250_000, 5000, 0.99995, 32), ("l16_pretrain", 2e-4, 250_000, 5000, 0.9999, 16),
    ("b16_finetune", 4e-5, 40_000, 1000, 0.99995, 32), ("l16_finetune", 4e-5, 40_000, 1000, 0.9999, 16)])
def test_recipe_configs_are_minit2i_and_run_on_any_gpu_count(name, lr, steps, warmup, decay, micro):
    # CONTEXT.md's recipe; the global batch of 1024 holds on 8 to 128 GPUs through accumulation.
    cfg = config_lib.load(TrainConfig, ROOT / f"jobs/configs/{name}.yaml")
    assert (cfg.optim.lr, cfg.optim.steps, cfg.optim.warmup_steps, cfg.ema.decays) == (lr, steps, warmup, [decay])
    assert (cfg.data.batch_size, cfg.optim.betas[1], cfg.scaling.use_gpu, cfg.optim.micro_batch) == (1024, 0.95, True, micro)
    assert (cfg.denoiser.t_mu, cfg.denoiser.t_sigma, cfg.denoiser.caption_dropout) == (-0.8, 0.8, 0.1)
    assert cfg.model.build(1024, cfg.text_encoder.prompt_length).image_size == 512
    assert cfg.text_encoder.name_or_path == "google/flan-t5-large"
    assert [cfg.optim.accumulation(1024 // gpus) for gpus in (8, 32, 128)] == [(micro, 128 // micro), (micro, 32 // micro), (8, 1)]
    if "finetune" in name:
        assert cfg.checkpoint.init_from and cfg.data.weights == [0.06, 0.016, 0.04]


def test_every_config_file_loads_as_its_command_config():
    from jobs.cli import COMMANDS, _load

    by_command = {"train": ["debug", "b16_pretrain", "b16_finetune", "l16_pretrain", "l16_finetune"], "demo": ["demo"],
                  "curate": ["curate_finetune"]}
    for command, names in by_command.items():
        cls = _load(COMMANDS[command].spec.config)
        for name in names:
            config_lib.load(cls, ROOT / f"jobs/configs/{name}.yaml")
    for action, name in (("sampling", "tune_sampling"), ("schedule", "tune_schedule")):
        config_lib.load(_load(COMMANDS["tune"].actions[action].config), ROOT / f"jobs/configs/{name}.yaml")
    # samplers.yaml: named sampler settings, each a full SamplerConfig and the model it was published for.
    from jobs.inference import sampler_presets
    from model.denoiser import SamplerConfig

    for name, entry in sampler_presets().items():
        assert set(entry.pop("model")) == {"image_size", "text_length"}, name
        config_lib.from_dict(SamplerConfig, entry)
    assert sorted(p.stem for p in (ROOT / "jobs/configs").glob("*.yaml")) == sorted(
        [n for names in by_command.values() for n in names] + ["tune_sampling", "tune_schedule", "samplers"])
