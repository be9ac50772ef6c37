import pytest
import torch

from model.text_encoder import FrozenT5, TextEncoderConfig, build_tiny_t5, count_tokens, load_tokenizer


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5") / "tiny", d_model=32, num_layers=1, num_heads=2)


def test_tiny_t5_loads_through_the_real_path_and_pads(t5_dir):
    enc = FrozenT5(TextEncoderConfig(str(t5_dir), prompt_length=16))
    feats, mask = enc(["a red circle", "x" * 100])
    assert feats.shape == (2, 16, 32) and mask.shape == (2, 16) and mask.dtype == torch.bool
    assert mask[0].sum() == len("a red circle") + 1          # bytes + </s>
    assert mask[1].all()                                       # truncated to prompt_length
    assert torch.count_nonzero(feats[0, ~mask[0]]) == 0
    assert not any(p.requires_grad for p in enc.parameters())
    again, _ = FrozenT5(TextEncoderConfig(str(t5_dir), prompt_length=16))(["a red circle", "x" * 100])
    assert torch.equal(feats, again)


def test_bfloat16_weights(t5_dir):
    enc = FrozenT5(TextEncoderConfig(str(t5_dir), prompt_length=8, dtype="bfloat16"))
    assert next(enc.encoder.parameters()).dtype == torch.bfloat16
    feats, _ = enc(["hi"])
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_token_counts(t5_dir):
    tok = load_tokenizer(str(t5_dir))
    assert count_tokens(tok, ["abc", ""]) == [4, 1]


def test_missing_encoder_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="text encoder path .*nope does not exist"):
        FrozenT5(TextEncoderConfig(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        FrozenT5(TextEncoderConfig(str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="dtype"):
        FrozenT5(TextEncoderConfig(str(tmp_path / "empty"), dtype="fp8"))
