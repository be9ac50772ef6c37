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


def test_word_level_tiny_t5_saves_and_loads_through_the_real_path(tmp_path):
    """A closed vocabulary: one token per word, T5's ids for pad/end/unknown, lower-cased, punctuation
    split off; saved with save_pretrained and loaded back by AutoTokenizer and FrozenT5."""
    words = ["a", "red", "circle", "two", "circles", "above"]
    folder = build_tiny_t5(tmp_path / "words", d_model=32, num_layers=1, num_heads=2, words=words)
    tok = load_tokenizer(str(folder))
    assert len(tok) == 3 + len(words) and (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("Two red circles above a red circle.")["input_ids"]
    assert len(ids) == 9 and ids[-1] == 1 and ids[-2] == 2            # 7 words, "." unknown, </s>
    assert tok.convert_ids_to_tokens(ids[:3]) == ["two", "red", "circles"]
    assert count_tokens(tok, ["a red circle", "a green circle"]) == [4, 4]
    enc = FrozenT5(TextEncoderConfig(str(folder), prompt_length=6))
    feats, mask = enc(["a red circle", "two red circles above a red circle"])
    assert feats.shape == (2, 6, 32) and mask.sum(1).tolist() == [4, 6]
    rebuilt = FrozenT5(TextEncoderConfig(str(build_tiny_t5(tmp_path / "again", d_model=32, num_layers=1, num_heads=2,
                                                         words=list(reversed(words)))), prompt_length=6))
    assert torch.equal(rebuilt(["a red circle"])[0], feats[:1])        # seeded, vocabulary order-free
