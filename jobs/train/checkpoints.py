"""Training checkpoint folders and where inference weights are found (local or s3://).

A checkpoint is a world-size-independent folder: `model.safetensors` + `ema_<decay>.safetensors`
with `model.json` (so it is also an inference weights folder, model/checkpoint.py), the Adam
moments (`optimizer.safetensors`) and `train_state.json` (step, data position and order settings).
Ray Train keeps a run's checkpoints under storage_path/name as `checkpoint_*` folders; a run folder
stands for its newest complete one. Inference (jobs/inference.py) and finetuning read them here.
"""

from __future__ import annotations

import json
import os
import tempfile

from pipelines import storage

STATE_NAME = "train_state.json"
MOMENTS_NAME = "optimizer.safetensors"
CRITIC_NAME = "critic.safetensors"                # data.feedback.critic: the ResNet-18's weights
SCORES_NAME = "critic_scores.safetensors"         # and its score of every training row ("scores", [R] float32)


def checkpoint_problem(uri: str) -> str | None:
    """None if `uri` is a complete checkpoint this job wrote, else what is wrong with it."""
    from jobs.train import lora

    for name in (STATE_NAME, MOMENTS_NAME, "model.json"):
        if not storage.exists(storage.join(uri, name)):
            return f"it has no {name}"
    try:
        state = json.loads(storage.read_bytes(storage.join(uri, STATE_NAME)))
    except ValueError as err:
        return f"{STATE_NAME} is unreadable: {err}"
    adapters = bool(state.get("lora_base"))
    for name in [lora.WEIGHTS_NAME if adapters else "model.safetensors"] + [
            f"ema_{d}/{lora.WEIGHTS_NAME}" if adapters else f"ema_{d}.safetensors" for d in state.get("ema_decays", [])]:
        if not storage.exists(storage.join(uri, name)):
            return f"it has no {name}"
    return None


def newest_checkpoint(run_uri: str) -> str | None:
    """The complete checkpoint with the highest step among a run folder's subfolders (storage_path/
    name holds Ray Train's checkpoint_* folders); an upload cut short by a failure is passed over."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(run_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    best = None
    for info in fs.get_file_info(pafs.FileSelector(path)):
        uri = storage.join(run_uri, info.base_name)
        if info.type != pafs.FileType.Directory or checkpoint_problem(uri):
            continue
        step = json.loads(storage.read_bytes(storage.join(uri, STATE_NAME)))["step"]
        if best is None or step > best[0]:
            best = (step, uri)
    return best and best[1]


def resume_checkpoint(uri: str) -> str:
    """checkpoint.resume_from as a checkpoint folder: the folder itself, or a run folder's newest
    complete checkpoint. Anything else fails loudly, never a silent fresh start."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"checkpoint.resume_from {uri} does not exist")
    problem = checkpoint_problem(uri)
    if problem is None:
        return uri
    newest = newest_checkpoint(uri)
    if newest is None:
        raise ValueError(f"checkpoint.resume_from {uri} is not a training checkpoint ({problem}) "
                         "nor a run folder holding a complete one")
    print(f"[train] checkpoint.resume_from {uri}: a run folder; resuming from its newest checkpoint {newest}", flush=True)
    return newest


def weights_folder(uri: str) -> str:
    """A folder to load inference weights from: a weights folder or checkpoint (model.json +
    *.safetensors) as it is, or a run folder's newest complete checkpoint. Local or s3://."""
    if storage.exists(storage.join(uri, "model.json")):
        return uri
    newest = newest_checkpoint(uri)
    if newest is None:
        where = "does not exist" if not storage.exists(uri) else "has no model.json and no complete checkpoint in it"
        raise FileNotFoundError(f"{uri} {where}: give a weights folder, a checkpoint or a training run's folder "
                                "(storage_path/name)")
    print(f"{uri}: a run folder; using its newest checkpoint {newest}", flush=True)
    return newest


def local_copy(uri: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A local path holding a weights folder's model.json and weights (a local folder as it is; from
    S3, a temp dir with those files only: a checkpoint's Adam moments are twice the weights)."""
    if not storage.is_s3(uri):
        return uri, None
    import pyarrow.fs as pafs

    tmp = tempfile.TemporaryDirectory()
    for f in storage.list_files(uri, recursive=True):
        rel = f[len(uri.rstrip("/")) + 1:]                  # a LoRA checkpoint keeps EMA adapters in ema_<decay>/
        name = rel.rsplit("/", 1)[-1]
        if name in ("model.json", "adapter_config.json") or (name.endswith(".safetensors") and name != MOMENTS_NAME):
            fs, path = storage.resolve(f)
            os.makedirs(os.path.dirname(os.path.join(tmp.name, rel)), exist_ok=True)
            pafs.copy_files(path, os.path.join(tmp.name, rel), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
    return tmp.name, tmp


def read_checkpoint(path: str) -> dict:
    """(weights, moments, ema per decay, state) from a checkpoint folder on local disk."""
    from safetensors.torch import load_file

    from jobs.train.lora import read_adapters

    try:
        state = json.loads(open(os.path.join(path, STATE_NAME)).read())
        out = {"state": state, "moments": load_file(os.path.join(path, MOMENTS_NAME)), "ema": {}}
        if state.get("lora_base"):                          # a LoRA run: adapters in peft's layout
            out["weights"] = read_adapters(path)[1]
            for d in state.get("ema_decays", []):
                out["ema"][float(d)] = read_adapters(os.path.join(path, f"ema_{d}"))[1]
        else:
            out["weights"] = load_file(os.path.join(path, "model.safetensors"))
            for d in state.get("ema_decays", []):
                out["ema"][float(d)] = load_file(os.path.join(path, f"ema_{d}.safetensors"))
        if os.path.exists(os.path.join(path, SCORES_NAME)):
            out["feedback"] = read_critic(path, state)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"checkpoint {path} is unreadable: {err}") from err
    return out


def save_critic(path: str, scores, weights: dict | None) -> None:
    """The critic's scores (and weights, on the rank that trained it) into a local checkpoint folder."""
    import torch
    from safetensors.torch import save_file

    save_file({"scores": torch.from_numpy(scores)}, os.path.join(path, SCORES_NAME))
    if weights is not None:
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(path, CRITIC_NAME))


def read_critic(path: str, state: dict) -> dict:
    """{scores, weights, state} of the critic saved in a checkpoint; its scores must hash to what
    train_state.json recorded, or the resumed order would differ from the one the run made."""
    from safetensors.torch import load_file

    from jobs.train.feedback import scores_digest

    scores = load_file(os.path.join(path, SCORES_NAME))["scores"].numpy()
    recorded = state.get("feedback", {}).get("scores_sha256")
    if recorded != scores_digest(scores):
        raise ValueError(f"checkpoint {path}: {SCORES_NAME} does not match the hash train_state.json recorded")
    critic = os.path.join(path, CRITIC_NAME)
    return {"scores": scores, "weights": load_file(critic) if os.path.exists(critic) else None,
            "state": state["feedback"].get("critic", {})}


def write_checkpoint(path: str, weights, moments, emas, state: dict, model_cfg, text_encoder, denoiser, lora=None) -> None:
    """Weights, EMA copies and Adam moments as safetensors plus train_state.json, into a local folder.
    A LoRA run (`lora` enabled, state["lora_base"] naming the frozen weights) writes its adapters in
    peft's layout instead (top level and `ema_<decay>/`), and a model.json with no weights beside it:
    `minit2i weights merge` makes the weights folder."""
    from safetensors.torch import save_file

    from model.checkpoint import save_meta, save_weights

    extra = {"step": state["step"]}
    if lora is not None and lora.enabled:
        from jobs.train.lora import save_adapters
        from pipelines import config as config_lib

        save_adapters(path, weights, lora)
        for d, sd in emas.items():
            save_adapters(os.path.join(path, f"ema_{d}"), sd, lora)
        save_meta(path, model_cfg, text_encoder, denoiser,
                  {**extra, "lora": config_lib.to_dict(lora), "lora_base": state["lora_base"]})
    else:
        save_weights(path, weights, model_cfg, text_encoder, denoiser, name="model", extra=extra)
        for d, sd in emas.items():
            save_weights(path, sd, model_cfg, text_encoder, denoiser, name=f"ema_{d}", extra=extra)
    save_file(moments, os.path.join(path, MOMENTS_NAME))
    with open(os.path.join(path, STATE_NAME), "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)


def check_resume(state: dict, cfg, index, world: int) -> None:
    """Refuse to continue a run from a checkpoint (its train_state.json) whose data position would
    not line up with `cfg`: another global batch, other data, another sample order. A `partitions`
    of 0 (auto) takes the checkpoint's, so a run keeps its first streams on any number of workers."""
    from jobs.train.data import order_settings, with_partitions

    G = cfg.data.batch_size
    if state["global_batch"] != G:
        raise ValueError(f"checkpoint was trained with global batch {state['global_batch']}, config says {G}: the data position would not line up")
    if state["data_fingerprint"] != index.fingerprint:
        raise ValueError("checkpoint was trained on different data (manifest fingerprint differs); use a new run name to start over")
    recorded = state.get("order", {})
    if not cfg.data.partitions and recorded.get("partitions"):
        cfg.data.partitions = recorded["partitions"]
    now = order_settings(with_partitions(cfg.data, world))
    # Feedback counts when either side has it: switching it on or off mid-run changes the order.
    changed = {k: (recorded.get(k), now.get(k)) for k in {*recorded, *({"feedback"} & {*now})} if now.get(k) != recorded.get(k)}
    if changed:
        raise ValueError("checkpoint's sample order was made with different settings (checkpoint, config): "
                         + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in changed.items())
                         + "; resume with the checkpoint's values or use a new run name")

