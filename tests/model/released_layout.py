"""MiniT2I's released layout and network, written for the tests apart from model/.

- `released_shapes` lists the keys and shapes a released `diffusion_pytorch_model.safetensors`
  holds, from the published description (CONTEXT.md "Released weights": names under `model.net.`,
  hidden = (int(D * mlp_ratio) + 7) // 8 * 8, the timestep and pooled embedders stored unused),
  and `released_config` the `config.json` fields of minit2i-torch's `MiniT2IMMJiTModel`.
- `port_state_names` renames them to the port's training module (`mini_t2i/model.py`), and
  `port_checkpoint` writes its training checkpoint `.pt`.
- `plain_forward` is the reference network as plain tensor code (einsum attention, the text stream
  updated in every block, the final norm over [text; image]); its block and final norms have no
  gain, so `fold_gains` must fold them into the following linear weights first. The q/k-norm gains
  sit between a norm and RoPE with no linear after them, so they stay as gains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

PREFIX = "model.net."


def released_config(**over) -> dict:
    """A config.json as the port's diffusers model writes it; defaults are the released B/16."""
    c = {"_class_name": "MiniT2IMMJiTModel", "_diffusers_version": "0.33.1",
         "image_size": 512, "patch_size": 16, "in_channels": 3, "txt_input_size": 1024, "hidden_size": 768,
         "txt_hidden_size": 768, "cond_vec_size": 768, "depth_double": 17, "txt_preamble_depth": 2, "num_heads": 12,
         "head_dim": 64, "mlp_ratio": 2.6666666666666665, "pca_channels": 128, "prompt_length": 256, "n_T": 100,
         "prediction": "x", "sampler": "euler", "cfg_channels": 3, "cfg_interval": [0.0, 1.0],
         "llm": "google/flan-t5-large"}
    c.update(over)
    if "hidden_size" in over and "txt_hidden_size" not in over:
        c["txt_hidden_size"] = over["hidden_size"]
    return c


def debug_config(**over) -> dict:
    """The debug preset's shapes (32px, patch 4, width 128, 4 blocks, 4 heads x 32, 64-dim text)."""
    return released_config(**{**dict(image_size=32, patch_size=4, txt_input_size=64, hidden_size=128, cond_vec_size=128,
                                      depth_double=4, num_heads=4, head_dim=32, pca_channels=32, prompt_length=8,
                                      llm="tiny-t5"), **over})


def released_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    D, Dh, HDh = c["hidden_size"], c["head_dim"], c["num_heads"] * c["head_dim"]
    F = (int(D * c["mlp_ratio"]) + 7) // 8 * 8
    P, C, T, cond, K = c["patch_size"], c["in_channels"], c["txt_input_size"], c["cond_vec_size"], c["pca_channels"]
    s = {"img_embedder.proj1.weight": (K, C, P, P), "img_embedder.proj2.weight": (D, K, 1, 1),
         "img_embedder.proj2.bias": (D,), "txt_embedder.weight": (D, T), "mask_token": (1, 1, T),
         "t_embedder.mlp.0.weight": (cond, 256), "t_embedder.mlp.0.bias": (cond,),
         "t_embedder.mlp.2.weight": (cond, cond), "t_embedder.mlp.2.bias": (cond,), "pooled_embedder.weight": (cond, T),
         "final_layer.norm_final.weight": (D,), "final_layer.linear.weight": (P * P * C, D),
         "final_layer.linear.bias": (P * P * C,)}

    def attn_mlp(p: str) -> dict:
        return {f"{p}qkv.weight": (3 * HDh, D), f"{p}qkv.bias": (3 * HDh,), f"{p}attn_proj.weight": (D, HDh),
                f"{p}attn_proj.bias": (D,), f"{p}mlp.w1.weight": (F, D), f"{p}mlp.w3.weight": (F, D),
                f"{p}mlp.w2.weight": (D, F), f"{p}norm1.weight": (D,), f"{p}norm2.weight": (D,)}

    for i in range(c["txt_preamble_depth"]):
        s.update(attn_mlp(f"txt_preamble_blocks.{i}."))
        s.update({f"txt_preamble_blocks.{i}.q_norm.weight": (Dh,), f"txt_preamble_blocks.{i}.k_norm.weight": (Dh,)})
    for i in range(c["depth_double"]):
        for stream in ("img", "txt"):
            s.update(attn_mlp(f"double_blocks.{i}.{stream}_"))
        s.update({f"double_blocks.{i}.q_norm.weight": (Dh,), f"double_blocks.{i}.k_norm.weight": (Dh,)})
    return {PREFIX + k: v for k, v in s.items()}


def is_gain(key: str) -> bool:
    return key.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight", "norm_final.weight"))


def random_state(c: dict, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random released weights; every norm gain drawn around 1 so that a misplaced gain shows."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in released_shapes(c).items():
        if is_gain(k):
            t = 1 + 0.3 * torch.randn(shape, generator=g)
        elif k.endswith(".bias") or k.endswith("mask_token"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[k] = t.to(dtype)
    return out


def write_released(model_dir: Path, c: dict, state: dict[str, torch.Tensor]) -> Path:
    """`model_dir/transformer/{config.json, diffusion_pytorch_model.safetensors}`."""
    from safetensors.torch import save_file

    folder = Path(model_dir) / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(c, indent=2, sort_keys=True))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def port_state_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released keys -> the port's training module names (MMJiTB32Text2 in mini_t2i/model.py)."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix(PREFIX)
        for old, new in (("img_embedder.", "img_embed."), ("txt_embedder.", "txt_embed."), ("t_embedder.", "t_embed."),
                         ("pooled_embedder.", "pooled_embed."), ("txt_preamble_blocks.", "txt_blocks."),
                         ("double_blocks.", "blocks."), ("final_layer.norm_final.", "final_norm."),
                         ("final_layer.linear.", "final."), ("attn_proj.", "proj.")):
            k = k.replace(old, new)
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# The network as plain tensor code
# --------------------------------------------------------------------------------------------

def fold_gains(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each block/final norm gain g folded into the linear after it: W x_hat g = (W diag g) x_hat."""
    s = {k.removeprefix(PREFIX): v.float().clone() for k, v in state.items()}
    pairs = [("final_layer.norm_final", ["final_layer.linear"])]
    for k in list(s):
        if k.startswith("txt_preamble_blocks.") and k.endswith(".norm1.weight"):
            p = k[: -len("norm1.weight")]
            pairs += [(p + "norm1", [p + "qkv"]), (p + "norm2", [p + "mlp.w1", p + "mlp.w3"])]
        if k.startswith("double_blocks.") and k.endswith(".img_norm1.weight"):
            p = k[: -len("img_norm1.weight")]
            for st in ("img", "txt"):
                pairs += [(f"{p}{st}_norm1", [f"{p}{st}_qkv"]), (f"{p}{st}_norm2", [f"{p}{st}_mlp.w1", f"{p}{st}_mlp.w3"])]
    for norm, linears in pairs:
        g = s.pop(norm + ".weight")
        for lin in linears:
            s[lin + ".weight"] = s[lin + ".weight"] * g[None, :]
    return s


def _rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _rotate(x, angles):
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * angles.cos() + turned * angles.sin()


def _angles_1d(n: int, dim: int) -> torch.Tensor:
    inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    a = torch.arange(n, dtype=torch.float64)[:, None] * inv
    return torch.cat([a, a], -1).float()                                   # [n, dim]


def _angles_2d(g: int, dim: int) -> torch.Tensor:
    half = dim // 2                                                        # half the head dim per axis
    inv = 10000.0 ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    a = torch.cat([rows.flatten()[:, None] * inv, cols.flatten()[:, None] * inv], -1)
    return torch.cat([a, a], -1).float()                                   # [g*g, dim], row-major tokens


def _sincos(g: int, D: int) -> torch.Tensor:
    def one(pos, dim):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        a = pos.double()[:, None] * omega
        return torch.cat([a.sin(), a.cos()], 1)
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    return torch.cat([one(cols.flatten(), D // 2), one(rows.flatten(), D // 2)], 1).float()


def plain_forward(s: dict[str, torch.Tensor], c: dict, x, text, mask) -> torch.Tensor:
    """The reference forward on released weights `s` (no prefix) whose block norms have no gain."""
    H, Dh, P, C = c["num_heads"], c["head_dim"], c["patch_size"], c["in_channels"]
    B, L = text.shape[:2]
    lin = lambda h, n: h @ s[n + ".weight"].T + (s[n + ".bias"] if n + ".bias" in s else 0)   # noqa: E731
    swiglu = lambda h, p: lin(torch.nn.functional.silu(lin(h, p + ".w1")) * lin(h, p + ".w3"), p + ".w2")  # noqa: E731
    heads = lambda t: t.view(B, t.shape[1], H, Dh)                         # noqa: E731

    def attend(qkv, qn, kn, angles):
        q, k, v = [heads(t) for t in qkv.chunk(3, -1)]                     # [B, S, H, Dh]
        q = _rotate(_rms(q) * s[qn], angles[:, None])
        k = _rotate(_rms(k) * s[kn], angles[:, None])
        w = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(Dh ** -0.5).softmax(-1)
        return torch.einsum("bhqk,bkhd->bqhd", w, v).flatten(2)

    text = torch.where(mask.bool()[..., None], text, s["mask_token"])
    patches = torch.nn.functional.conv2d(x, s["img_embedder.proj1.weight"], stride=P)
    img = torch.nn.functional.conv2d(patches, s["img_embedder.proj2.weight"], s["img_embedder.proj2.bias"])
    g = img.shape[-1]
    img = img.flatten(2).transpose(1, 2) + _sincos(g, img.shape[1])
    txt = text @ s["txt_embedder.weight"].T
    a_txt, a_img = _angles_1d(L, Dh), _angles_2d(g, Dh)
    for i in range(c["txt_preamble_depth"]):
        p = f"txt_preamble_blocks.{i}."
        txt = txt + lin(attend(lin(_rms(txt), p + "qkv"), p + "q_norm.weight", p + "k_norm.weight", a_txt), p + "attn_proj")
        txt = txt + swiglu(_rms(txt), p + "mlp")
    for i in range(c["depth_double"]):
        p = f"double_blocks.{i}."
        qkv = torch.cat([lin(_rms(txt), p + "txt_qkv"), lin(_rms(img), p + "img_qkv")], 1)
        out = attend(qkv, p + "q_norm.weight", p + "k_norm.weight", torch.cat([a_txt, a_img]))
        txt, img = txt + lin(out[:, :L], p + "txt_attn_proj"), img + lin(out[:, L:], p + "img_attn_proj")
        txt, img = txt + swiglu(_rms(txt), p + "txt_mlp"), img + swiglu(_rms(img), p + "img_mlp")
    out = lin(_rms(torch.cat([txt, img], 1)), "final_layer.linear")[:, L:]   # [B, N, P*P*C]
    out = out.reshape(B, g, g, P, P, C)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(B, C, g * P, g * P)


def port_checkpoint(path, state, ema, **config):
    """The port's `checkpoint_*.pt` as its save_checkpoint writes it (mini_t2i/train.py)."""
    cfg = {"image_size": 32, "patch_size": 4, "hidden_size": 128, "text_hidden_size": 128, "t5_hidden_size": 64,
           "depth_double": 4, "text_preamble_depth": 2, "num_heads": 4, "head_dim": 32, "mlp_ratio": 2.6667,
           "pca_channels": 32, "prompt_length": 8, "t5_name": "tiny-t5", "compat_checkpoint_arch": False,
           "noise_scale": 2.0, "t_lognorm_mu": -0.8, "t_lognorm_sigma": 0.8, "label_drop_rate": 0.1,
           "n_T": 100, "cfg_scale": 2.0, "ema_decay": 0.99995, "output_dir": "/runs/b32", **config}
    opt = {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.zeros(3)}},
           "param_groups": [{"lr": 4e-4, "betas": (0.9, 0.95), "params": [0]}]}
    torch.save({"step": 1200, "model": state, "ema": ema, "optimizer": opt, "config": cfg}, path)
    return path
