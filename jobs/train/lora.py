"""LoRA finetuning of MM-JiT through peft, applied from the train job (the network stays plain).

`apply_lora` injects peft's LoRA layers into the chosen linear layers of a built MM-JiT (peft's
`inject_adapter_in_model`: the base weights move under `<layer>.base_layer` and are frozen, only
`lora_A`/`lora_B` train). DeepSpeed then sees only the adapters as trainable, so ZeRO-1/2 partition
and step just those, and the Adam moments and EMA copies are adapter-sized.

On disk the adapters are peft's adapter layout, which peft's `PeftModel.from_pretrained` and the
diffusers LoRA loaders read: `adapter_config.json` (written by peft's LoraConfig) and
`adapter_model.safetensors` with keys `base_model.model.<layer>.lora_{A,B}.weight`. Each EMA decay
is such a folder, `ema_<decay>/`. `merge` folds adapters into the base weights (peft's
`merge_and_unload`), which `minit2i weights merge` writes as a plain weights folder.

EMA: of the adapters, not of the merged weights. The base is frozen, so its average is itself, and
the adapters are a few MB instead of a full model per decay on every rank; the price is that the
EMA of A and B is not exactly the EMA of their product B @ A (a second-order difference at the
small learning rates and high decays finetuning uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

CONFIG_NAME = "adapter_config.json"          # peft's names (peft.utils.CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."                 # what PeftModel.save_pretrained puts before every key
ADAPTER = "default"                          # peft's adapter name inside the module


@dataclass
class LoRAConfig:
    enabled: bool = False                # train LoRA adapters on checkpoint.init_from's frozen weights
    rank: int = 16                       # r of every adapter
    alpha: float = 16.0                  # scale alpha / r of the adapter's output
    dropout: float = 0.0                 # dropout on the adapter's input
    target_modules: list[str] = field(default_factory=lambda: ["img_qkv", "txt_qkv", "img_attn_proj", "txt_attn_proj"])
    # ^ names of linear layers (the last part of their module name): attention of the joint blocks by default

    def __post_init__(self):
        if not self.enabled:
            return
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty: name at least one linear layer (e.g. img_qkv)")


def peft_config(cfg: LoRAConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      bias="none")


def linear_names(net: torch.nn.Module) -> list[str]:
    """The names LoRA can target: the last part of every linear layer's module name."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)})


def apply_lora(net: torch.nn.Module, cfg: LoRAConfig) -> torch.nn.Module:
    """Inject adapters into `net` in place (base weights frozen); a target that names no linear layer
    is an error listing the ones there are."""
    from peft import inject_adapter_in_model

    names = linear_names(net)
    unknown = [t for t in cfg.target_modules if t not in names]
    if unknown:
        raise ValueError(f"lora.target_modules: {', '.join(map(repr, unknown))} names no linear layer of MM-JiT; "
                         f"its linear layers are {', '.join(names)}")
    return inject_adapter_in_model(peft_config(cfg), net, adapter_name=ADAPTER)


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def to_peft_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module parameter names (`<layer>.lora_A.default.weight`) -> peft's file keys
    (`base_model.model.<layer>.lora_A.weight`)."""
    return {PREFIX + k.replace(f".{ADAPTER}.", "."): v for k, v in state.items() if is_adapter(k)}


def from_peft_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_peft_layout`."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix(PREFIX)
        for part in ("lora_A", "lora_B"):
            k = k.replace(f".{part}.", f".{part}.{ADAPTER}.")
        out[k] = v
    return out


def save_adapters(folder: str | Path, state: dict[str, torch.Tensor], cfg: LoRAConfig) -> None:
    """`folder/adapter_config.json` + `folder/adapter_model.safetensors` (peft's adapter layout)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    peft_config(cfg).save_pretrained(str(folder))
    save_file({k: v.detach().cpu().contiguous() for k, v in to_peft_layout(state).items()}, str(folder / WEIGHTS_NAME))


def read_adapters(folder: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """(LoRAConfig, adapter tensors under module names) of a peft adapter folder."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: not a LoRA adapter folder")
    c = json.loads((folder / CONFIG_NAME).read_text())
    cfg = LoRAConfig(enabled=True, rank=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c["lora_dropout"]),
                     target_modules=sorted(c["target_modules"]))
    return cfg, from_peft_layout(load_file(str(folder / WEIGHTS_NAME)))


def load_adapters(net: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy adapter tensors (module names) into a LoRA-injected `net`; every adapter must be given."""
    expected = {k for k, _ in net.named_parameters() if is_adapter(k)}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"{where}: the adapters do not match lora.target_modules and the model: "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")
    params = dict(net.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def merge(net: torch.nn.Module, cfg: LoRAConfig, state: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    """`net` (plain MM-JiT with the base weights) with the adapters folded in: W + (alpha / r) B @ A
    (peft's merge_and_unload); the result has MM-JiT's own parameter names."""
    from peft.tuners.lora import LoraModel

    tuner = LoraModel(net, peft_config(cfg), ADAPTER)       # injects under `model.`
    load_adapters(tuner.model, state, where)
    return tuner.merge_and_unload()
