"""MM-JiT: MiniT2I's pixel-space double-stream transformer, in one file.

"A Minimalist Baseline for Text-to-Image Generation" (MiniT2I, 2026), built on JiT ("Back to
Basics: Let Denoising Generative Models Denoise", arXiv 2511.13720) and MM-DiT (SD3,
arXiv 2403.03206). The network maps a noisy image and frozen text features to a clean image
(x-prediction); it has no timestep input and no AdaLN: the noisy image itself tells the noise level.
The flow-matching objective and samplers live apart, in `model/denoiser.py`.

Parameter names are those of MiniT2I's released checkpoints without their `model.net.` prefix
(Hope7Happiness/minit2i-torch `diffusers/mmdit.py`, the module the released `transformer/` folders
load into), so importing them is a prefix strip (`model/released.py`).

Read top to bottom: config, position embeddings, embedders, blocks, the model, FLOPs, presets.
Shape letters: B batch, C channels, N image tokens, L text tokens, S = L + N, D width,
H heads, Dh head dim, P patch size.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MMJiTConfig:
    image_size: int = 512          # square input/output resolution in pixels
    patch_size: int = 16           # P: pixels per patch side
    in_channels: int = 3           # RGB in [-1, 1]
    text_dim: int = 1024           # width of the frozen text features (FLAN-T5-large: 1024)
    text_length: int = 256         # maximum prompt length in tokens
    width: int = 768               # D: hidden size of both streams
    depth: int = 17                # double-stream joint-attention blocks
    text_depth: int = 2            # text adapter ("preamble") blocks before the joint blocks
    num_heads: int = 12            # H
    head_dim: int = 64             # Dh; H * Dh == D
    mlp_ratio: float = 2.6667      # SwiGLU hidden = D * mlp_ratio, rounded up to a multiple of 8
    bottleneck: int = 128          # channels of the low-rank patch embedding (JiT)
    rope_theta: float = 10000.0    # RoPE base frequency
    attn_mask: bool = False        # False (MiniT2I): attention covers every text position, padding
                                   # carries the learned mask token; True also masks padded keys
                                   # out (SDPA then cannot use flash attention: ~7% slower on H100)

    def __post_init__(self):
        if self.num_heads * self.head_dim != self.width:
            raise ValueError(f"num_heads * head_dim must equal width: {self.num_heads} * {self.head_dim} != {self.width}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 (2D RoPE splits it in two halves of pairs)")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def mlp_hidden(self) -> int:
        return (int(self.width * self.mlp_ratio) + 7) // 8 * 8


# --------------------------------------------------------------------------------------------
# Position embeddings: fixed 2D sin-cos added to image tokens (MAE), RoPE inside attention.
# --------------------------------------------------------------------------------------------

def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos [M] -> [M, dim]: sin of dim/2 frequencies, then cos (MAE's layout)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]                             # [M, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid*grid, dim]: half the channels encode the row, half the column (row-major tokens)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    # MAE's convention: the first half embeds the column (w) coordinate, the second the row (h).
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)


def rope_angles_1d(dim: int, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """[M] positions -> [M, dim] angles, duplicated across the two halves for rotate_half."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)     # [dim/2]
    angles = positions.double()[:, None] * inv_freq[None]                              # [M, dim/2]
    return torch.cat([angles, angles], dim=1)


def rope_angles_2d(dim: int, grid: int, theta: float) -> torch.Tensor:
    """[grid*grid, dim] axial angles: within each half, the first quarter rotates with the row, the
    second with the column, each at dim/4 frequencies (half the head dim per axis)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim // 2, 2, dtype=torch.float64) / (dim // 2))  # [dim/4]
    pos = torch.arange(grid, dtype=torch.float64)
    f_row = (pos[:, None, None] * inv_freq).expand(grid, grid, -1)        # [g, g, dim/4]
    f_col = (pos[None, :, None] * inv_freq).expand(grid, grid, -1)        # [g, g, dim/4]
    half = torch.cat([f_row, f_col], dim=-1).reshape(grid * grid, dim // 2)
    return torch.cat([half, half], dim=1)                                 # [N, dim]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, Dh]; cos, sin [S, Dh]. Computed in x's dtype (no silent upcast under bf16)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------

class BottleneckPatchEmbed(nn.Module):
    """P x P patches -> a low-rank bottleneck (no bias) -> width (JiT's bottleneck embedding)."""

    def __init__(self, cfg: MMJiTConfig):
        super().__init__()
        self.proj1 = nn.Conv2d(cfg.in_channels, cfg.bottleneck, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.proj2 = nn.Conv2d(cfg.bottleneck, cfg.width, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj2(self.proj1(x))                                     # [B, D, g, g]
        return x.flatten(2).transpose(1, 2)                               # [B, N, D]


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm with a learned gain, initialised to ones. The reference declares its norms "without
    affine" but its RMSNorm always creates this gain and trains it (minit2i-jax
    `models/torch_models.py`, `_RMSNorm`), so every norm here has one too."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, S, 3D] -> q, k, v [B, H, S, Dh]."""
    B, S, D3 = qkv.shape
    q, k, v = qkv.view(B, S, 3, num_heads, D3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)  # [B, H, S, Dh] each
    return q, k, v


def attention(q, k, v, key_mask: torch.Tensor | None) -> torch.Tensor:
    """q, k, v [B, H, S, Dh]; key_mask [B, S] bool (True = attend) -> [B, S, H*Dh]."""
    mask = None if key_mask is None else key_mask[:, None, None, :]      # [B, 1, 1, S]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)        # [B, H, S, Dh]
    return out.transpose(1, 2).flatten(2)                                 # [B, S, D]


class TextPreambleBlock(nn.Module):
    """Plain pre-norm transformer block on the text stream alone (the reference's "preamble" or
    adapter block): qk-norm with gains [Dh], then 1D RoPE."""

    def __init__(self, cfg: MMJiTConfig):
        super().__init__()
        D = cfg.width
        self.norm1 = RMSNorm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=True)
        self.q_norm = RMSNorm(cfg.head_dim)
        self.k_norm = RMSNorm(cfg.head_dim)
        self.attn_proj = nn.Linear(D, D, bias=True)
        self.norm2 = RMSNorm(D)
        self.mlp = SwiGLU(D, cfg.mlp_hidden)
        self.num_heads = cfg.num_heads

    def forward(self, txt, cos, sin, key_mask):
        q, k, v = split_heads(self.qkv(self.norm1(txt)), self.num_heads)     # [B, H, L, Dh]
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        txt = txt + self.attn_proj(attention(q, k, v, key_mask))              # [B, L, D]
        return txt + self.mlp(self.norm2(txt))


class DoubleStreamBlock(nn.Module):
    """MM-DiT block without AdaLN: separate image and text weights, one joint attention over
    [text; image] with 1D RoPE on text positions and 2D RoPE on image positions. One q-norm and
    one k-norm per block serve both streams, as in the reference."""

    def __init__(self, cfg: MMJiTConfig):
        super().__init__()
        D, Dh, F_ = cfg.width, cfg.head_dim, cfg.mlp_hidden
        self.img_norm1, self.txt_norm1 = RMSNorm(D), RMSNorm(D)
        self.img_qkv, self.txt_qkv = nn.Linear(D, 3 * D, bias=True), nn.Linear(D, 3 * D, bias=True)
        self.q_norm, self.k_norm = RMSNorm(Dh), RMSNorm(Dh)
        self.img_attn_proj, self.txt_attn_proj = nn.Linear(D, D, bias=True), nn.Linear(D, D, bias=True)
        self.img_norm2, self.txt_norm2 = RMSNorm(D), RMSNorm(D)
        self.img_mlp, self.txt_mlp = SwiGLU(D, F_), SwiGLU(D, F_)
        self.num_heads = cfg.num_heads

    def forward(self, img, txt, cos, sin, key_mask, update_text: bool = True):
        """update_text=False in the last block: nothing reads its text output, so its text out-proj,
        second norm and MLP are skipped (their weights stay, unused, as in MiniT2I's layout)."""
        L = txt.shape[1]
        # The two streams' qkv are joined along the sequence first: the shared qk-norm, RoPE and
        # attention then run once over [text; image].
        qkv = torch.cat([self.txt_qkv(self.txt_norm1(txt)), self.img_qkv(self.img_norm1(img))], dim=1)  # [B, S, 3D]
        q, k, v = split_heads(qkv, self.num_heads)                            # [B, H, S, Dh]
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        out = attention(q, k, v, key_mask)                                    # [B, S, D]
        img = img + self.img_attn_proj(out[:, L:])                            # [B, N, D]
        img = img + self.img_mlp(self.img_norm2(img))
        if update_text:
            txt = txt + self.txt_attn_proj(out[:, :L])                        # [B, L, D]
            txt = txt + self.txt_mlp(self.txt_norm2(txt))
        return img, txt


class FinalLayer(nn.Module):
    """RMSNorm, then a zero-initialised linear to pixel patches."""

    def __init__(self, cfg: MMJiTConfig):
        super().__init__()
        self.norm_final = RMSNorm(cfg.width)
        self.linear = nn.Linear(cfg.width, cfg.patch_size ** 2 * cfg.in_channels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))                            # [B, N, P*P*C]


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

def predates_released_layout(state: dict) -> bool:
    """A state dict written before MM-JiT took the released names and norm gains."""
    return "final.weight" in state and "final_layer.linear.weight" not in state


class MMJiT(nn.Module):
    """(noisy image [B, C, H, W], text features [B, L, C_txt], text mask [B, L]) -> clean image."""

    def __init__(self, cfg: MMJiTConfig):
        super().__init__()
        self.config = cfg
        self.img_embedder = BottleneckPatchEmbed(cfg)
        self.txt_embedder = nn.Linear(cfg.text_dim, cfg.width, bias=False)
        # Padded text positions are replaced by this learned token before the text embedding.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.text_dim))
        self.txt_preamble_blocks = nn.ModuleList(TextPreambleBlock(cfg) for _ in range(cfg.text_depth))
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)

        self.init_buffers()
        self.reset_parameters()

    def init_buffers(self, device: torch.device | str | None = None):
        """The fixed tables (positions, RoPE angles), computed, not stored: a model built on the
        meta device gets them here after its weights are loaded with `assign=True`."""
        cfg = self.config
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.register_buffer("pos_embed", sincos_2d(cfg.width, cfg.grid), persistent=False)   # [N, D]
            txt_angles = rope_angles_1d(cfg.head_dim, torch.arange(cfg.text_length), cfg.rope_theta)
            img_angles = rope_angles_2d(cfg.head_dim, cfg.grid, cfg.rope_theta)
            self.register_buffer("rope_text", torch.stack([txt_angles.cos(), txt_angles.sin()]).float(), persistent=False)
            self.register_buffer("rope_image", torch.stack([img_angles.cos(), img_angles.sin()]).float(), persistent=False)

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for conv in (self.img_embedder.proj1, self.img_embedder.proj2):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.img_embedder.proj2.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)                    # output is exactly 0 at init
        nn.init.zeros_(self.final_layer.linear.bias)

    def load_state_dict(self, state_dict, *args, **kwargs):
        # Weights from before the released layout would fail on names and shapes deep in torch;
        # say what they are instead (model/checkpoint.load_weights maps them for inference).
        if predates_released_layout(state_dict):
            raise ValueError("these weights predate the released parameter layout (patch_embed.*, blocks.*, final.*, "
                             "no norm gains): a training run of that age cannot be resumed; start a new run from its "
                             "checkpoint with checkpoint.init_from, which maps the names and sets every gain to 1")
        return super().load_state_dict(state_dict, *args, **kwargs)

    def _check_inputs(self, x, text, mask):
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or x.shape[-2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"image batch has shape {tuple(x.shape)}; this model takes [B, {cfg.in_channels}, "
                f"{cfg.image_size}, {cfg.image_size}] (config image_size={cfg.image_size})"
            )
        if text.dim() != 3 or text.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"text features have shape {tuple(text.shape)}; this model takes [B, L, {cfg.text_dim}] "
                f"(config text_dim={cfg.text_dim}: does the text encoder match the checkpoint?)"
            )
        if text.shape[1] > cfg.text_length:
            raise ValueError(f"text length {text.shape[1]} exceeds the model's text_length {cfg.text_length}")
        if mask.shape != text.shape[:2] or text.shape[0] != x.shape[0]:
            raise ValueError(f"text mask {tuple(mask.shape)} must be [B, L] = {tuple(text.shape[:2])} with B = {x.shape[0]}")

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        B, g, P, C = x.shape[0], cfg.grid, cfg.patch_size, cfg.in_channels
        x = x.view(B, g, g, P, P, C)                                      # [B, g, g, P, P, C]
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * P, g * P)    # [B, C, H, W]

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x, text, mask)
        mask = mask.bool()
        L = text.shape[1]
        text = torch.where(mask[..., None], text, self.mask_token.to(text.dtype))  # [B, L, C_txt]

        img = self.img_embedder(x) + self.pos_embed.to(x.dtype)           # [B, N, D]
        txt = self.txt_embedder(text)                                     # [B, L, D]

        cos_t, sin_t = self.rope_text[:, :L]                              # [L, Dh] each
        text_keys = keys = None                                           # MiniT2I: no attention mask
        if self.config.attn_mask:
            # A caption dropped for CFG has no valid token; its adapter rows then attend over the
            # mask tokens (the joint blocks still mask them all out) instead of over nothing.
            text_keys = mask | ~mask.any(dim=1, keepdim=True)             # [B, L]
            keys = torch.cat([mask, mask.new_ones(x.shape[0], img.shape[1])], dim=1)   # [B, S]
        for block in self.txt_preamble_blocks:
            txt = block(txt, cos_t, sin_t, text_keys)

        cos = torch.cat([cos_t, self.rope_image[0]])                      # [S, Dh]
        sin = torch.cat([sin_t, self.rope_image[1]])
        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, cos, sin, keys, update_text=i < len(self.double_blocks) - 1)

        # The reference normalises [text; image] and keeps the image rows: RMSNorm is per token,
        # so normalising the image tokens alone is the same.
        out = self.final_layer(img)                                       # [B, N, P*P*C]
        return self.unpatchify(out)                                       # [B, C, H, W]


# --------------------------------------------------------------------------------------------
# Size and compute
# --------------------------------------------------------------------------------------------

def count_params(cfg: MMJiTConfig, norm_gains_only: bool = False) -> int:
    """Exact parameter count (or only the RMSNorm gains'), from the module itself on the meta
    device (no memory used)."""
    with torch.device("meta"):
        net = MMJiT(cfg)
    modules = [m for m in net.modules() if isinstance(m, RMSNorm)] if norm_gains_only else [net]
    return sum(p.numel() for m in modules for p in m.parameters())


def forward_flops(cfg: MMJiTConfig, text_len: int | None = None) -> dict[str, float]:
    """Analytic FLOPs of one forward pass for one image (2 FLOPs per multiply-add).

    Counts every matmul and the attention products that reach the output (the last block's text
    out-proj and MLP are skipped); norms, RoPE and activations are left out (well under 1%).
    Training costs ~3x this per image (forward + backward).
    """
    L = cfg.text_length if text_len is None else text_len
    N, D, F_ = cfg.num_patches, cfg.width, cfg.mlp_hidden
    S = L + N
    per_token = 2 * (3 * D * D + D * D + 3 * D * F_)                      # qkv, out-proj, SwiGLU
    attn = lambda n: 2 * 2 * n * n * D                                     # QK^T and AV
    flops = {
        "patch_embed": 2 * N * (cfg.patch_size ** 2 * cfg.in_channels * cfg.bottleneck + cfg.bottleneck * D),
        "text_embed": 2 * L * cfg.text_dim * D,
        "text_blocks": cfg.text_depth * (L * per_token + attn(L)),
        "joint_blocks": cfg.depth * (S * per_token + attn(S)) - L * 2 * (D * D + 3 * D * F_),
        "final": 2 * N * D * cfg.patch_size ** 2 * cfg.in_channels,
    }
    flops["total"] = sum(flops.values())
    return flops


# --------------------------------------------------------------------------------------------
# Presets (MiniT2I's released shapes; `debug` is for tests and the CPU demo)
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    "debug": dict(image_size=32, patch_size=4, text_dim=64, text_length=64, width=128, depth=4,
                  num_heads=4, head_dim=32, bottleneck=32),
    "B/32": dict(patch_size=32, width=768, depth=17, num_heads=12, head_dim=64),
    "B/16": dict(patch_size=16, width=768, depth=17, num_heads=12, head_dim=64),
    "L/16": dict(patch_size=16, width=1248, depth=23, num_heads=24, head_dim=52, mlp_ratio=2.7),
}


def same_network(a: MMJiTConfig, b: MMJiTConfig) -> bool:
    """Whether two configs build the same network: equal, except that mlp_ratio only matters through
    the hidden size it rounds to (the port writes 8/3 as 2.6666666666666665, presets as 2.6667)."""
    return dataclasses.replace(a, mlp_ratio=b.mlp_ratio) == b and a.mlp_hidden == b.mlp_hidden


def preset(name: str, **overrides) -> MMJiTConfig:
    """A named preset with optional field overrides, e.g. preset("B/16", text_dim=1024)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(MMJiTConfig)}
    bad = set(overrides) - fields
    if bad:
        raise ValueError(f"unknown model config key(s) {sorted(bad)}; valid keys: {sorted(fields)}")
    return MMJiTConfig(**{**PRESETS[name], **overrides})
