"""The one inference module: an image's noise depends on its (index, seed) only, sampler settings
come from the weights' own record, and weights load from a folder, a checkpoint or a run folder."""

import numpy as np
import pytest

from jobs.inference import image_noise, load_model, resolve_sampler, sample_images
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
