"""The one inference module: an image's noise depends on its (index, seed) only, sampler settings
come from the weights' own record, and weights load from a folder, a checkpoint or a run folder."""

import numpy as np
import pytest

from jobs.inference import (
    SHORT, SamplerSection, image_noise, load_model, resolve_sampler, sample_images, sampler_presets, sampler_settings,
)
from model.denoiser import SamplerConfig
from tests.jobs.metrics.helpers import make_checkpoint

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("inference"))


def test_an_image_depends_on_its_index_seed_and_prompt_only(ckpt):
    net, encoder, meta = load_model(str(ckpt))
    sampler = resolve_sampler(SamplerConfig(sampler="euler", steps=2), meta)
    whole = sample_images(net, encoder, sampler, PROMPTS, seeds=[3, 3, 3], batch_size=3)
    # The same images made one at a time, in another order, among other neighbours.
    alone = [sample_images(net, encoder, sampler, [PROMPTS[i]], [i], [3], batch_size=1)[0] for i in (2, 0, 1)]
    assert np.array_equal(whole[2], alone[0]) and np.array_equal(whole[0], alone[1]) and np.array_equal(whole[1], alone[2])
    assert not np.array_equal(sample_images(net, encoder, sampler, PROMPTS[:1], seeds=4)[0], whole[0])
    assert image_noise((3, 4, 4), 1, 3).equal(image_noise((3, 4, 4), 1, 3))
    assert not image_noise((3, 4, 4), 1, 3).equal(image_noise((3, 4, 4), 2, 3))


def test_sampler_noise_comes_from_the_weights_unless_given(ckpt):
    _, _, meta = load_model(str(ckpt), "model")
    assert meta["weights"] == "model" and meta["denoiser"]["noise_scale"] == 1.0
    assert resolve_sampler(SamplerConfig(noise_scale=2.0), meta).noise_scale == 1.0
    assert resolve_sampler(SamplerConfig(noise_scale=2.0), meta, noise_scale=0.5).noise_scale == 0.5
    assert resolve_sampler(SamplerConfig(noise_scale=2.0), {}).noise_scale == 2.0


def test_a_fresh_model_is_seeded():
    a, _, meta = load_model(None, preset_name="debug")
    b, _, _ = load_model(None, preset_name="debug")
    assert meta["weights"] == "fresh debug"
    assert all(x.equal(y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------------------------
# Sampler presets and the checkpoint's own settings
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A debug-sized release in the diffusers layout, imported: model.json with `sampling`."""
    from model.released import import_weights
    from tests.model.released_layout import debug_config, random_state, write_released

    root = tmp_path_factory.mktemp("imported")
    write_released(root / "minit2i-b-16", debug_config(), random_state(debug_config()))
    import_weights(root / "minit2i-b-16", root / "w")
    return root / "w"


def released_meta(name: str, trained_here: bool = False) -> dict:
    """model.json of a released shape: as `weights import` writes it, or of a run trained here."""
    import dataclasses

    from model import released
    from model.mmjit import preset

    meta = {"model": dataclasses.asdict(preset(name, text_dim=1024, image_size=512, text_length=256)),
            "denoiser": {"noise_scale": 2.0}, "path": f"weights/{name}"}
    return meta if trained_here else {**meta, "sampling": released.published_sampling(name)}


def test_named_presets_are_the_published_settings_the_importer_records():
    from model import released

    presets = sampler_presets()
    for name, short in SHORT.items():
        for use, fields in released.published_sampling(name).items():
            entry = dict(presets[f"{short}-{use}"])
            assert entry.pop("model") == {"image_size": 512, "text_length": 256}
            assert entry == {**fields, "cfg_interval": list(fields["cfg_interval"])}, f"{short}-{use}"
    # As published: B/16 a_min 0.05 and CFG 6.0 / 2.0 (COCO FID); L/16's eval.yml says a_min 0.01 and CFG 8.5.
    assert presets["b16-geneval"]["a_min"] == 0.05 and presets["b16-coco_fid"]["cfg_scale"] == 2.0
    assert presets["l16-dpg_bench"]["a_min"] == 0.01 and presets["l16-geneval"]["cfg_scale"] == 8.5


@pytest.mark.parametrize("trained_here", [False, True])
def test_a_benchmark_preset_follows_the_model_and_given_keys_win(trained_here):
    b16, l16 = released_meta("B/16", trained_here), released_meta("L/16", trained_here)
    geneval = sampler_settings(SamplerSection(preset="geneval"), b16, SamplerConfig())
    assert (geneval.sampler, geneval.steps, geneval.cfg_scale, geneval.a_min, geneval.noise_scale, geneval.cfg_interval) == \
        ("euler", 100, 6.0, 0.05, 2.0, (0.0, 1.0))
    assert sampler_settings(SamplerSection(preset="coco_fid"), b16, SamplerConfig()).cfg_scale == 2.0
    l = sampler_settings(SamplerSection(preset="dpg_bench"), l16, SamplerConfig())
    assert (l.cfg_scale, l.a_min) == (8.5, 0.01)
    tuned = sampler_settings(SamplerSection(preset="geneval", cfg_scale=4.5, steps=50), b16, SamplerConfig())
    assert (tuned.cfg_scale, tuned.steps, tuned.a_min) == (4.5, 50, 0.05)
    # Without a preset, imported weights sample with their published default; ours with the command's.
    plain = sampler_settings(SamplerSection(), b16, SamplerConfig(sampler="heun", cfg_scale=2.0))
    assert (plain.sampler, plain.cfg_scale) == (("heun", 2.0) if trained_here else ("euler", 6.0))


def test_settings_that_contradict_the_checkpoint_are_errors_naming_both_values(imported):
    net, encoder, meta = load_model(str(imported))
    assert meta["weights"] == "ema_0.99995"
    s = sampler_settings(SamplerSection(), meta, SamplerConfig())   # the import's own default: its config.json's
    assert (s.sampler, s.steps, s.noise_scale, s.a_min) == ("euler", 100, 2.0, 0.05)
    with pytest.raises(ValueError, match=r"sampler preset b16-geneval is for 512px images, but .* has 32px images"):
        sampler_settings(SamplerSection(preset="b16-geneval"), meta, SamplerConfig())
    with pytest.raises(ValueError, match=r"noise_scale 1.0 contradicts .*: its weights were trained with noise_scale 2.0"):
        sampler_settings(SamplerSection(noise_scale=1.0), meta, SamplerConfig())
    with pytest.raises(ValueError, match=r"noise_scale 1.5 contradicts"):
        sampler_settings(SamplerSection(), meta, SamplerConfig(), noise_scale=1.5)
    with pytest.raises(ValueError, match="sampler preset 'geneval': .* publishes no sampler settings .* no released model shape"):
        sampler_settings(SamplerSection(preset="geneval"), {**meta, "sampling": {}}, SamplerConfig())
    with pytest.raises(ValueError, match="unknown sampler preset 'fid': one of default, geneval"):
        sampler_settings(SamplerSection(preset="fid"), meta, SamplerConfig())
    meta_512 = {**released_meta("B/16"), "model": {**released_meta("B/16")["model"], "text_length": 77}}
    with pytest.raises(ValueError, match="sampler preset b16-geneval is for 256 text tokens, but .* has 77 text tokens"):
        sampler_settings(SamplerSection(preset="b16-geneval"), meta_512, SamplerConfig())
    # A checkpoint trained here keeps its start noise a knob (tune sampling searches it) unless a preset is named.
    ours = released_meta("B/16", trained_here=True)
    assert sampler_settings(SamplerSection(noise_scale=1.0), ours, SamplerConfig()).noise_scale == 1.0
    with pytest.raises(ValueError, match="noise_scale 1.0 contradicts"):
        sampler_settings(SamplerSection(preset="geneval", noise_scale=1.0), ours, SamplerConfig())


def test_sample_takes_a_preset_by_name_and_refuses_a_contradiction(imported, tmp_path, capsys):
    from jobs.cli import main

    assert main(["sample", f"checkpoint={imported}", "sampler.preset=default", "sampler.steps=2", "prompts=[a red circle]",
                 f"out={tmp_path / 'g.png'}"]) == 0
    assert "euler 2 steps, cfg 2.0, a_min 0.05, noise 2.0" in capsys.readouterr().out
    assert main(["sample", f"checkpoint={imported}", "sampler.preset=l16-geneval", f"out={tmp_path / 'h.png'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]           # (above it: the text encoder's load progress)
    assert err.startswith("minit2i sample: error: sampler preset l16-geneval is for 512px images, but")
    assert not (tmp_path / "h.png").exists()
