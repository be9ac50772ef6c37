"""MiniT2I's released weights in and out of our weights folders (plain torch + safetensors).

Layouts read, as the public code writes them:
- diffusers layout (the Hub folder `MiniT2I/MiniT2I`): `<model>/transformer/config.json` +
  `diffusion_pytorch_model.safetensors`, keys `model.net.<name>`: the port's `MiniT2IMMJiTModel`
  holds `model = DiffusionModel`, which holds `net = MMJiT` (Hope7Happiness/minit2i-torch
  `diffusers/pipeline.py`, `diffusers/mmdit.py`). The whole Hub folder holds `minit2i-b-16/` and
  `minit2i-l-16/`, each such a model folder.
- the port's training checkpoint `.pt`: {"step", "model", "ema", "optimizer", "config"} with the
  state dicts of its training module `MMJiTB32Text2` (minit2i-torch `mini_t2i/train.py`
  `save_checkpoint`, `mini_t2i/model.py`), which names the same tensors differently.

Our MM-JiT uses the released names without `model.net.`, so import strips the prefix (or renames
the port's training names), checks every key and shape, drops the two parts the released files
store but the forward never reads (a timestep embedder and a pooled-text embedder, left over from
an AdaLN design), and writes a weights folder through a temp folder renamed at the end. Tensors
keep their stored dtype and bytes. Export writes the diffusers layout back, with those unused keys
as zeros so a strict loader accepts it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.checkpoint import (
    META_NAME, available_weights, check_state, read_meta, rename, save_weights, upgrade_legacy,
)
from model.denoiser import DenoiserConfig, SamplerConfig
from model.mmjit import PRESETS, MMJiT, MMJiTConfig, predates_released_layout, preset, same_network
from model.text_encoder import TextEncoderConfig

PREFIX = "model.net."
TRANSFORMER_DIR = "transformer"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# `MiniT2IMMJiTModel`'s config fields and their defaults (minit2i-torch `diffusers/pipeline.py`; the
# diffusers version as the released config.json records it, written by every export):
# diffusers fills a field missing from config.json with its default, so import does the same.
PORT_DEFAULTS: dict = {
    "_class_name": "MiniT2IMMJiTModel", "_diffusers_version": "0.33.1",
    "image_size": 512, "patch_size": 16, "in_channels": 3, "txt_input_size": 1024,
    "hidden_size": 768, "txt_hidden_size": 768, "cond_vec_size": 768, "depth_double": 17,
    "txt_preamble_depth": 2, "num_heads": 12, "head_dim": 64, "mlp_ratio": 2.6666666666666665,
    "pca_channels": 128, "prompt_length": 256, "n_T": 100, "prediction": "x", "sampler": "euler",
    "cfg_channels": 3, "cfg_interval": [0.0, 1.0], "llm": "google/flan-t5-large",
}

# Our MMJiTConfig fields <- the port's names for them in config.json, and in the TrainConfig a `.pt`
# carries (minit2i-torch `mini_t2i/config.py`; its training module always has 3 input channels).
DIFFUSERS_FIELDS = {
    "image_size": "image_size", "patch_size": "patch_size", "in_channels": "in_channels", "text_dim": "txt_input_size",
    "text_length": "prompt_length", "width": "hidden_size", "depth": "depth_double", "text_depth": "txt_preamble_depth",
    "num_heads": "num_heads", "head_dim": "head_dim", "mlp_ratio": "mlp_ratio", "bottleneck": "pca_channels",
}
PORT_FIELDS = {**{k: v for k, v in DIFFUSERS_FIELDS.items() if k != "in_channels"},
               "text_dim": "t5_hidden_size", "text_depth": "text_preamble_depth"}

# The port's training-module names -> the released names (first match wins).
PORT_NAMES = [
    (r"^img_embed\.", "img_embedder."),
    (r"^txt_embed\.", "txt_embedder."),
    (r"^txt_blocks\.(\d+)\.proj\.", r"txt_preamble_blocks.\1.attn_proj."),
    (r"^txt_blocks\.", "txt_preamble_blocks."),
    (r"^blocks\.(\d+)\.(img|txt)_proj\.", r"double_blocks.\1.\2_attn_proj."),
    (r"^blocks\.", "double_blocks."),
    (r"^final_norm\.", "final_layer.norm_final."),
    (r"^final\.", "final_layer.linear."),
    (r"^t_embed\.", "t_embedder."),
    (r"^pooled_embed\.", "pooled_embedder."),
]

# What the authors sample with (minit2i-jax `configs/{b16,b32,l16}/eval.yml`): Euler, 100 steps,
# noise 2.0, guidance over all of t in [0, 1]; a_min and CFG per model and benchmark. "general" is
# the port's README suggestion for looks, with its pipeline's a_min 0.05 (`diffusers/mmdit.py`).
PUBLISHED = {
    "B/16": {"a_min": 0.05, "cfg": {"geneval": 6.0, "dpg_bench": 6.0, "coco_fid": 2.0}, "general": 2.5},
    "B/32": {"a_min": 0.05, "cfg": {"geneval": 6.0, "dpg_bench": 6.0, "coco_fid": 2.0}, "general": 2.5},
    "L/16": {"a_min": 0.01, "cfg": {"geneval": 8.5, "dpg_bench": 8.5}, "general": 6.0},
}

# The Hub's diffusers weights are the EMA, with the decay of the model's recipe (B/16 and B/32
# 0.99995, L/16 0.9999; minit2i-jax `configs/*/finetune.yml`, the Hub model card). An import names
# the file `ema_<decay>` so `weights=` choices and every loader's default (the highest-decay EMA)
# read right; a folder of another shape takes `ema_decay` from the import (default the B recipe's).
EMA_DECAY = {"B/16": 0.99995, "B/32": 0.99995, "L/16": 0.9999}
DEFAULT_EMA_DECAY = 0.99995

# The training recipe behind the released weights (minit2i-jax `configs/*/{pretrain,finetune}.yml`).
RECIPE = DenoiserConfig(t_mu=-0.8, t_sigma=0.8, noise_scale=2.0, a_min=0.01, caption_dropout=0.1)


def unused_shapes(text_dim: int, cond_vec_size: int) -> dict[str, tuple[int, ...]]:
    """The stored-but-unused tensors: the port's `TimestepEmbedder` (256 sin-cos frequencies -> MLP)
    and `pooled_embedder` (mean text feature -> cond_vec_size); its forward adds them into a vector
    no block reads (minit2i-torch `diffusers/mmdit.py`)."""
    c = cond_vec_size
    return {"t_embedder.mlp.0.weight": (c, 256), "t_embedder.mlp.0.bias": (c,),
            "t_embedder.mlp.2.weight": (c, c), "t_embedder.mlp.2.bias": (c,),
            "pooled_embedder.weight": (c, text_dim)}


def model_shapes(cfg: MMJiTConfig) -> dict[str, torch.Size]:
    """Our parameter shapes, from the module on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in MMJiT(cfg).state_dict().items()}


def published_sampling(preset_name: str | None) -> dict[str, dict]:
    """SamplerConfig fields per use ("default", "geneval", ...) for a released model's shape."""
    pub = PUBLISHED.get(preset_name or "")
    if pub is None:
        return {}
    make = lambda scale, a_min: dataclasses.asdict(SamplerConfig(  # noqa: E731
        sampler="euler", steps=100, cfg_scale=scale, cfg_interval=(0.0, 1.0), noise_scale=2.0, a_min=a_min))
    out = {use: make(scale, pub["a_min"]) for use, scale in pub["cfg"].items()}
    out["default"] = out["geneval"]
    out["general"] = make(pub["general"], 0.05)
    return out


def mmjit_config(c: dict, fields: dict[str, str], where: str) -> tuple[MMJiTConfig, str | None]:
    """Our config from the port's fields, as `normalise` returns it."""
    try:
        cfg = MMJiTConfig(**{ours: (float if ours == "mlp_ratio" else int)(c[theirs]) for ours, theirs in fields.items()})
    except KeyError as err:
        raise ValueError(f"{where}: no field {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    return normalise(cfg)


def normalise(cfg: MMJiTConfig) -> tuple[MMJiTConfig, str | None]:
    """(the preset's own config, its name) when cfg has a preset's shapes, else (cfg, None): an
    imported B/16 then equals preset("B/16", ...) exactly, as `train checkpoint.init_from` expects."""
    for name in PRESETS:
        try:
            p = preset(name, text_dim=cfg.text_dim, image_size=cfg.image_size, text_length=cfg.text_length)
        except ValueError:                                     # e.g. 16px is no B/32 (patch 32): not that preset
            continue
        if same_network(cfg, p):
            return p, name
    return cfg, None


# --------------------------------------------------------------------------------------------
# Reading the diffusers layout
# --------------------------------------------------------------------------------------------

def config_from_diffusers(raw: dict, where: str) -> tuple[MMJiTConfig, str | None, dict]:
    """(MMJiTConfig, preset name, the full port config) from a `transformer/config.json`."""
    c = {**PORT_DEFAULTS, **raw}
    if c["txt_hidden_size"] != c["hidden_size"]:
        raise ValueError(f"{where}: txt_hidden_size {c['txt_hidden_size']} != hidden_size {c['hidden_size']}; "
                         "MM-JiT joins the two streams in one attention and needs them equal")
    if c["prediction"] != "x":
        raise ValueError(f"{where}: prediction {c['prediction']!r}; MM-JiT predicts the clean image ('x')")
    if c["cfg_channels"] < c["in_channels"]:
        raise ValueError(f"{where}: cfg_channels {c['cfg_channels']} < in_channels {c['in_channels']}; "
                         "guidance here applies to every channel")
    return (*mmjit_config(c, DIFFUSERS_FIELDS, where), c)


def find_transformer(src: Path, model: str | None) -> Path:
    """The `transformer/` folder in a transformer folder, a model folder or a whole Hub folder."""
    for folder, model_dir in ((src, src.parent), (src / TRANSFORMER_DIR, src)):
        if (folder / WEIGHTS_NAME).is_file():
            if model not in (None, model_dir.name):
                raise ValueError(f"{src} is the one model {model_dir.name!r}; model={model!r} does not name it")
            return folder
    models = sorted(p.parent.parent.name for p in src.glob(f"*/{TRANSFORMER_DIR}/{WEIGHTS_NAME}"))
    if not models:
        raise FileNotFoundError(f"{src} holds no {WEIGHTS_NAME} (in itself, {TRANSFORMER_DIR}/ or */{TRANSFORMER_DIR}/): "
                                "not a released MiniT2I folder")
    if model is None and len(models) == 1:
        model = models[0]
    if model not in models:
        raise ValueError(f"{src} holds the models {', '.join(models)}; choose one with model=NAME"
                         + (f" (no {model!r} there)" if model else ""))
    return src / model / TRANSFORMER_DIR


def read_transformer(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, tensors by key) of a diffusers transformer folder, one safetensors file."""
    from safetensors.torch import load_file

    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} has {WEIGHTS_NAME} but no {CONFIG_NAME}")
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
    except ValueError as err:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON: {err}") from None
    return raw, load_file(str(folder / WEIGHTS_NAME))


def released_to_ours(shapes: dict[str, torch.Size], raw_config: dict, where: str) -> tuple[MMJiTConfig, str | None, dict, list[str]]:
    """Check a released key set against its config.json: (config, preset, full port config, the
    unused keys to drop). Every key must carry the prefix, be ours or an unused one, with its shape."""
    cfg, name, c = config_from_diffusers(raw_config, f"{where}/{CONFIG_NAME}")
    expected = {PREFIX + k: s for k, s in model_shapes(cfg).items()}
    unused = {PREFIX + k: torch.Size(s) for k, s in unused_shapes(cfg.text_dim, int(c["cond_vec_size"])).items()}
    check_state(shapes, {**expected, **unused}, f"{where}/{WEIGHTS_NAME}")
    return cfg, name, c, sorted(unused)


# --------------------------------------------------------------------------------------------
# Reading the port's training checkpoint
# --------------------------------------------------------------------------------------------

def read_port_checkpoint(path: Path) -> dict:
    """The port's `checkpoint_*.pt`, loaded with weights_only (plain tensors and Python values)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not this format"
        raise ValueError(f"{path} is not a minit2i-torch training checkpoint: {type(err).__name__}: {err}".splitlines()[0]) from None
    missing = [k for k in ("model", "ema", "config") if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} entry: not a minit2i-torch training checkpoint "
                         "(expected step, model, ema, optimizer, config)")
    return payload


def port_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The port's training names -> released names; a compiled or DDP-wrapped module's prefix goes."""
    out = {}
    for key, value in state.items():
        for wrapper in ("_orig_mod.", "module."):
            key = key.removeprefix(wrapper)
        out[rename(key, PORT_NAMES)] = value
    return out


def config_from_port(c: dict, where: str) -> tuple[MMJiTConfig, str | None]:
    if c.get("compat_checkpoint_arch"):
        raise ValueError(f"{where} was trained with compat_checkpoint_arch: no norm gains, no qk-norm and another "
                         "2D RoPE, which is not the released network")
    return mmjit_config(c, PORT_FIELDS, f"{where} [config]")


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------

@dataclass
class ImportReport:
    out: Path
    preset: str | None
    weights: list[str]                                         # weight files written (names)
    dropped: dict[str, list[int]] = field(default_factory=dict)  # unused keys -> shape
    seconds: float = 0.0


def import_weights(src: str | Path, out: str | Path, model: str | None = None,
                   ema_decay: float | None = None) -> ImportReport:
    """A released diffusers folder (a transformer folder, a model folder, or the whole Hub folder with
    `model` naming one) or a port `.pt` -> our weights folder `out`. `out` appears only complete.
    `ema_decay` names a diffusers folder's (EMA) weights; default: the released model's decay."""
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new out folder")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if src.is_file():
            report = _import_port(src, tmp)
        else:
            report = _import_diffusers(find_transformer(src, model), tmp, ema_decay)
        if out.exists():
            out.rmdir()                                        # an empty folder the user made
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.out, report.seconds = out, time.perf_counter() - start
    return report


def _import_diffusers(folder: Path, tmp: Path, ema_decay: float | None) -> ImportReport:
    raw, tensors = read_transformer(folder)
    cfg, name, c, unused = released_to_ours({k: v.shape for k, v in tensors.items()}, raw, str(folder))
    state = {k[len(PREFIX):]: v for k, v in tensors.items() if k not in unused}
    text_encoder = TextEncoderConfig(name_or_path=str(c["llm"]), prompt_length=cfg.text_length)
    sampling = published_sampling(name)
    if not sampling:                                           # not a released shape: its own config's settings
        sampling = {"default": dataclasses.asdict(SamplerConfig(
            sampler="euler", steps=int(c["n_T"]), cfg_scale=SamplerConfig.cfg_scale,
            cfg_interval=tuple(c["cfg_interval"]), noise_scale=RECIPE.noise_scale, a_min=0.05))}
    decay = float(ema_decay if ema_decay is not None else EMA_DECAY.get(name or "", DEFAULT_EMA_DECAY))
    extra = {"preset": name, "sampling": sampling, "diffusers_config": c,
             "imported_from": {"format": "diffusers", "path": str(folder.resolve()), "ema_decay": decay,
                               "ema_decay_source": "given" if ema_decay is not None
                               else "published" if name in EMA_DECAY else "assumed (B recipe)"}}
    save_weights(tmp, state, cfg, text_encoder, RECIPE, name=f"ema_{decay}", extra=extra)
    return ImportReport(tmp, name, [f"ema_{decay}"], {k: list(tensors[k].shape) for k in unused})


def _import_port(path: Path, tmp: Path) -> ImportReport:
    payload = read_port_checkpoint(path)
    c = payload["config"]
    cfg, name = config_from_port(c, str(path))
    where = {"model": f"{path} [model]", "ema": f"{path} [ema]"}
    states = {part: port_state(payload[part]) for part in ("model", "ema")}
    expected = dict(model_shapes(cfg))
    unused = {k: torch.Size(s) for k, s in unused_shapes(cfg.text_dim, cfg.width).items()}
    for part, state in states.items():
        check_state(state, {**expected, **unused}, where[part])
    text_encoder = TextEncoderConfig(name_or_path=str(c.get("t5_name", PORT_DEFAULTS["llm"])), prompt_length=cfg.text_length)
    # The port's loss floors 1 - t at 0.05 (minit2i-torch `mini_t2i/diffusion.py`), as its sampler does.
    denoiser = DenoiserConfig(t_mu=float(c.get("t_lognorm_mu", RECIPE.t_mu)), t_sigma=float(c.get("t_lognorm_sigma", RECIPE.t_sigma)),
                              noise_scale=float(c.get("noise_scale", RECIPE.noise_scale)), a_min=0.05,
                              caption_dropout=float(c.get("label_drop_rate", RECIPE.caption_dropout)))
    sampling = {"default": dataclasses.asdict(SamplerConfig(
        sampler="euler", steps=int(c.get("n_T", 100)), cfg_scale=float(c.get("cfg_scale", 2.0)), cfg_interval=(0.0, 1.0),
        noise_scale=denoiser.noise_scale, a_min=0.05))}
    ema_name = f"ema_{float(c.get('ema_decay', 0.99995))}"
    extra = {"preset": name, "sampling": sampling, "step": int(payload.get("step", 0)),
             "imported_from": {"format": "minit2i-torch checkpoint", "path": str(path.resolve())}}
    for part, file_name in (("model", "model"), ("ema", ema_name)):
        state = {k: v for k, v in states[part].items() if k not in unused}
        save_weights(tmp, state, cfg, text_encoder, denoiser, name=file_name, extra=extra)
    return ImportReport(tmp, name, ["model", ema_name], {k: list(states["model"][k].shape) for k in sorted(unused)})


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def diffusers_config(cfg: MMJiTConfig, meta: dict) -> dict:
    """The port's config.json for our config: architecture from ours, the fields we do not model
    (cond_vec_size, n_T, ...) as they were imported, else the port's defaults."""
    c = {**PORT_DEFAULTS, "cond_vec_size": cfg.width, **meta.get("diffusers_config", {})}
    ratio = c["mlp_ratio"]
    c.update({theirs: getattr(cfg, ours) for ours, theirs in DIFFUSERS_FIELDS.items()}, txt_hidden_size=cfg.width,
             llm=meta.get("text_encoder", {}).get("name_or_path", PORT_DEFAULTS["llm"]))
    if dataclasses.replace(cfg, mlp_ratio=float(ratio)).mlp_hidden == cfg.mlp_hidden:
        c["mlp_ratio"] = ratio                                  # 8/3 as written, where it gives our hidden size
    return c


def export_diffusers(weights_dir: str | Path, out: str | Path, name: str | None = None) -> Path:
    """Our weights folder -> `out/transformer/{config.json, diffusion_pytorch_model.safetensors}`,
    the layout the released weights come in. Tensors keep their dtype and bytes."""
    from safetensors.torch import load_file, save_file

    weights_dir, out = Path(weights_dir), Path(out)
    meta = read_meta(weights_dir)
    names = available_weights(weights_dir)
    name = name or (names[0] if names else None)
    if name not in names:
        raise FileNotFoundError(f"{weights_dir} has no {name}.safetensors; it has: {', '.join(names) or 'none'}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new out folder")
    cfg = MMJiTConfig(**meta["model"])
    path = weights_dir / f"{name}.safetensors"
    state = load_file(str(path))
    if predates_released_layout(state):
        with torch.device("meta"):
            state = upgrade_legacy(state, MMJiT(cfg))
    check_state(state, model_shapes(cfg), f"{path} (model in {META_NAME})")
    config = diffusers_config(cfg, meta)
    dtype = state["txt_embedder.weight"].dtype
    tensors = {PREFIX + k: v.contiguous() for k, v in state.items()}
    for k, shape in unused_shapes(cfg.text_dim, int(config["cond_vec_size"])).items():
        tensors[PREFIX + k] = torch.zeros(shape, dtype=dtype)   # never read by any forward
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / TRANSFORMER_DIR).mkdir(parents=True)
        save_file(tensors, str(tmp / TRANSFORMER_DIR / WEIGHTS_NAME))
        (tmp / TRANSFORMER_DIR / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / TRANSFORMER_DIR
