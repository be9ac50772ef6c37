"""Frozen T5 text encoder (MiniT2I uses FLAN-T5-large features, prompt length 256).

Loads `T5EncoderModel` and its tokenizer through `transformers` from a local directory or a hub id
the machine can reach; nothing is downloaded unless the caller's environment allows it. For tests
and the offline embedded default, `build_tiny_t5` makes a small seeded T5 with the byte-level ByT5
tokenizer (which needs no vocabulary file), or with a word-level tokenizer over a closed vocabulary
(the synthetic world's words: one token per word, so a caption is a few tokens instead of one per
byte), and saves it with `save_pretrained`, so it is loaded by exactly the same code path as a real
FLAN-T5.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class TextEncoderConfig:
    name_or_path: str = "tiny-t5"  # local directory (save_pretrained layout), hub id, or "tiny-t5"
    prompt_length: int = 256      # tokens kept per prompt (padded / truncated)
    dtype: str = "float32"        # "float32" or "bfloat16" for the frozen weights and features


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec and not spec.count("/") == 1


# The embedded default's encoder: a tiny random T5 built offline on first use (see build_tiny_t5).
TINY_T5 = "tiny-t5"


def cache_root() -> Path:
    return Path(os.environ.get("MINIT2I_CACHE", Path.home() / ".cache" / "minit2i"))


def cached_tiny_t5(name: str, words=None) -> Path:
    """`build_tiny_t5(words=words)` built once into the cache folder `name` and reused (seeded, so
    every build of a name is identical)."""
    root = cache_root()
    path = root / name
    if not (path / "config.json").is_file():
        # Build beside the target and rename, so concurrent workers never see a half-written folder.
        tmp = root / f".{name}.{os.getpid()}.tmp"
        build_tiny_t5(tmp, words=words)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; its copy is identical (seeded)
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_t5_dir() -> Path:
    return cached_tiny_t5(TINY_T5)


def _check_exists(spec: str) -> str:
    if spec == TINY_T5:
        return str(tiny_t5_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder directory {path} has no config.json (expected a save_pretrained layout)")
        return str(path)
    if _looks_like_path(spec):
        raise FileNotFoundError(f"text encoder path {spec} does not exist")
    return spec  # a hub id: transformers resolves it (from its cache when offline)


def load_tokenizer(name_or_path: str):
    """The encoder's tokenizer, from a local directory or hub id."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_check_exists(name_or_path))


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Token counts (with the end-of-sequence token) as the encoder would see them, untruncated."""
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


class FrozenT5(nn.Module):
    """T5 encoder features + mask, padded/truncated to `prompt_length`, never trained."""

    def __init__(self, config: TextEncoderConfig, device: str | torch.device = "cpu"):
        super().__init__()
        from transformers import T5EncoderModel

        if not config.name_or_path:
            raise ValueError("text encoder name_or_path is empty: give a local T5 directory or a hub id")
        if config.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"text encoder dtype must be float32 or bfloat16, got {config.dtype!r}")
        spec = _check_exists(config.name_or_path)
        self.config = config
        self.tokenizer = load_tokenizer(spec)
        dtype = getattr(torch, config.dtype)
        self.encoder = T5EncoderModel.from_pretrained(spec, dtype=dtype).to(device).eval()
        self.encoder.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (features [B, L, C_txt] float32, mask [B, L] bool), L = prompt_length."""
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True,
            max_length=self.config.prompt_length, return_tensors="pt",
        ).to(self.device)
        feats = self.encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        mask = tokens.attention_mask.bool()
        feats = feats.float() * mask[..., None]                          # zero the padded positions
        return feats, mask


def word_tokenizer(words):
    """A word-level tokenizer over `words` in T5's conventions (pad 0, end of sequence 1, unknown 2;
    lower-cased, split on whitespace and punctuation, `</s>` appended), as a transformers fast
    tokenizer that `save_pretrained` writes and `AutoTokenizer` loads back. Built with the
    `tokenizers` library's WordLevel model: none of T5's own tokenizers takes a closed vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted({w.lower() for w in words} - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=1 << 16)


def build_tiny_t5(out_dir: str | Path, d_model: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0,
                  words=None, d_ff: int | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """A small random T5 encoder, saved with save_pretrained: with the byte-level ByT5 tokenizer, or
    with `word_tokenizer(words)` when `words` is given. `d_ff` defaults to 2 x d_model; any shape works
    (benchmarks/gpu_job.py builds a FLAN-T5-large-shaped one in bf16).

    Stands in for FLAN-T5 where no weights can be downloaded (tests, the embedded default); it is
    loaded by `FrozenT5` exactly as a real checkpoint is.
    """
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    tokenizer = ByT5Tokenizer() if words is None else word_tokenizer(words)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff or d_model * 2,
        num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
    )
    torch.manual_seed(seed)
    model = T5EncoderModel(config).to(dtype).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
