"""The training step, without Ray: DeepSpeed engine from our config, forward/backward/step, EMA.

Runs in any process that has a torch.distributed group (or none: a single process makes its own),
so it can be profiled on a bare GPU box (`minit2i bench train`, benchmarks/gpu_bench.py).
Ray Train's worker loop (jobs/train/loop.py) only feeds it batches and saves what it returns.

World-size-independent state. A checkpoint holds full fp32 tensors, consolidated on rank 0 with
DeepSpeed's own fragment API (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`), which
works for ZeRO 1, 2 and 3 on CPU and GPU: the weights, Adam's two moments per parameter, the EMA
copies and the step. Loading builds a fresh engine for the new world size, loads the weights into
the module before `deepspeed.initialize` and writes the moments into the new partitions with
`safe_set_full_optimizer_state`. DeepSpeed's universal checkpoint would do the same through an
offline conversion step; this keeps one format that `minit2i sample` can also read.

EMA under ZeRO. Each rank keeps the EMA of exactly the fp32 master slice it owns (its ZeRO-3
partition, or its ZeRO-1/2 fragment), updated in place after every optimiser step with no
communication; the update is element-wise, so the slices are exact. Saving gathers the slices into
full tensors (one all-reduce per parameter, the same way DeepSpeed's fragment API assembles
weights). Memory per rank is 1/W of a model per decay instead of a whole model.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from jobs.train.data import to_model_range
from model.denoiser import DenoiserConfig, per_sample_draws, training_loss
from model.mmjit import MMJiT, MMJiTConfig, preset


@dataclass
class ModelConfig:
    preset: str = "debug"                                  # a name in model.mmjit.PRESETS
    overrides: dict = field(default_factory=dict)          # MMJiTConfig fields on top of the preset (e.g. depth: 2)

    def build(self, text_dim: int, text_length: int) -> MMJiTConfig:
        # text_dim / text_length follow the text encoder unless overridden explicitly.
        return preset(self.preset, **{"text_dim": text_dim, "text_length": text_length, **self.overrides})


@dataclass
class OptimConfig:
    lr: float = 4e-4                     # peak learning rate (MiniT2I: 4e-4 B, 2e-4 L pretrain; 4e-5 finetune)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 5000             # linear warmup from 0, then constant (MiniT2I)
    decay_steps: int = 0                 # the run's last N steps decay the rate linearly to decay_to x lr (0: constant to the end)
    decay_to: float = 0.0                # the rate at the last step, as a fraction of lr
    steps: int = 250_000                 # total optimiser steps of the run
    grad_clip: float = 1.0               # global grad-norm clipping
    micro_batch: int = 0                 # images per worker per forward/backward; less than its batch accumulates (0: no)
    zero_stage: int = 2                  # DeepSpeed ZeRO stage: 1, 2 or 3
    precision: str = "auto"              # "auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32"
    activation_checkpointing: bool = False
    compile: bool | str = "auto"         # torch.compile the model: "auto" = on a GPU with ZeRO 1/2 (about 2x the eager step)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"optim.compile must be true, false or auto, got {self.compile!r}")
        if self.compile is True and self.zero_stage == 3:
            raise ValueError("optim.compile=true does not work with optim.zero_stage=3 (ZeRO-3 gathers and frees "
                             "parameters inside the compiled graphs, which then read freed storage); use zero_stage "
                             "1 or 2, or compile false or auto (auto runs ZeRO-3 eager)")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"optim.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"optim.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.micro_batch < 0:
            raise ValueError(f"optim.micro_batch must be >= 0 (0: no accumulation), got {self.micro_batch}")
        if not 0 <= self.decay_steps <= self.steps:
            raise ValueError(f"optim.decay_steps must be between 0 and optim.steps ({self.steps}), got {self.decay_steps}")
        if not 0.0 <= self.decay_to <= 1.0:
            raise ValueError(f"optim.decay_to must be a fraction of optim.lr in [0, 1], got {self.decay_to}")

    def accumulation(self, batch: int) -> tuple[int, int]:
        """(micro batch, passes per optimiser step) for a per-worker batch of `batch` images; a
        micro_batch above the batch (many workers) is the batch, in one pass."""
        micro = min(self.micro_batch, batch) if self.micro_batch else batch
        if batch % micro:
            raise ValueError(f"optim.micro_batch {micro} must divide the per-worker batch {batch} "
                             f"(data.batch_size / scaling.num_workers)")
        return micro, batch // micro


@dataclass
class EMAConfig:
    decays: list[float] = field(default_factory=lambda: [0.9999])   # one EMA copy per decay (MiniT2I: 0.99995 B, 0.9999 L)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then constant; with decay_steps, the last
    decay_steps of the run fall linearly to decay_to x lr at the last step (warmup-stable-decay:
    the constant phase can be extended or restarted from any checkpoint before the decay). A
    function of the step alone, so a resumed run needs no scheduler state (DeepSpeed's WarmupLR
    would have to be restored too)."""
    scale = 1.0 if cfg.warmup_steps <= 0 else min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.decay_steps > 0:
        into = step - (cfg.steps - cfg.decay_steps)      # 0 at the first decaying step
        if into >= 0:
            frac = min(1.0, (into + 1) / cfg.decay_steps)
            scale = min(scale, 1.0 - frac * (1.0 - cfg.decay_to))
    return cfg.lr * scale


def resolve_precision(cfg: OptimConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if cfg.precision == "bf16" and device.type != "cuda":
        raise ValueError("optim.precision=bf16 needs a GPU; use auto or fp32 on CPU")
    return cfg.precision


def resolve_compile(cfg: OptimConfig, device: torch.device) -> bool:
    """auto compiles on a GPU with ZeRO 1/2 only: on CPU the compile takes longer than a debug run,
    and ZeRO-3's parameter gathering breaks the compiled graphs (see OptimConfig)."""
    if cfg.compile == "auto":
        return device.type == "cuda" and cfg.zero_stage < 3
    return bool(cfg.compile)


def deepspeed_config(cfg: OptimConfig, batch: int, world: int, precision: str) -> dict:
    """DeepSpeed's config for a per-worker batch of `batch` images per optimiser step."""
    micro, accum = cfg.accumulation(batch)
    return {
        "train_batch_size": batch * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 1 << 30,       # we log ourselves
        "wall_clock_breakdown": False,
    }


def apply_activation_checkpointing(net: torch.nn.Module) -> None:
    """Recompute every block's activations in backward (torch.utils.checkpoint), from the job:
    the model stays plain. Patching `forward` on the instance keeps the state-dict names. The
    blocks are the members of the network's top-level ModuleLists (its stacks of text and joint
    blocks), found by type so no parameter or attribute name is written here."""
    from torch.utils.checkpoint import checkpoint

    blocks = [block for child in net.children() if isinstance(child, torch.nn.ModuleList) for block in child]
    for block in blocks:
        inner = block.forward
        block.forward = lambda *args, _f=inner, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when nothing set one up (a plain process, a benchmark)."""
    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)               # DeepSpeed reads these even for one process
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def import_deepspeed():
    """`import deepspeed`, without the MLflow import DeepSpeed's autotuner makes when MLflow is installed.

    deepspeed/autotuning/autotuner.py imports MLflow at module level if it can (for the autotuner's
    own metrics, which this project never runs): 1.3 CPU-seconds in every worker process that builds
    an engine, a third of DeepSpeed's import. MLflow is hidden only while DeepSpeed loads (a None in
    sys.modules makes `import mlflow` raise ImportError); the tracker in jobs/train/tracking.py
    imports it normally afterwards. DeepSpeed's Muon kernels, which every engine imports, load
    without TorchInductor (below)."""
    import sys

    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None            # type: ignore[assignment]
        try:
            import deepspeed
        finally:
            if sys.modules.get("mlflow", 0) is None:
                del sys.modules["mlflow"]
    import deepspeed

    import_muon_compiling_on_first_call()
    return deepspeed


MUON = "deepspeed.runtime.zero.muon.original_muon"


def import_muon_compiling_on_first_call() -> None:
    """Import DeepSpeed's Muon kernels with each `torch.compile` applied at its first call instead of at import.

    DeepSpeed 0.19 imports this module in every engine (ZeRO-3's constructor, ZeRO-1/2's gradient
    reduction, the BF16 optimiser: it checks for its Muon optimiser), and the module wraps three
    functions in `torch.compile` as it loads (`deepspeed.runtime.compiler.compile()`), which imports
    TorchInductor: 1.1-1.4 CPU-s in every Train worker, for kernels that run only with DeepSpeed's Muon
    optimiser, which this project never builds. torch.compile does its work at a function's first
    call either way, so deferring the wrapping changes nothing else; should a Muon kernel ever run,
    it is compiled then with the same arguments. Written here because DeepSpeed has no setting for it."""
    import functools
    import sys

    if MUON in sys.modules:
        return
    from deepspeed.runtime import compiler

    deepspeed_compile = compiler.compile

    def compile_on_first_call(fn):
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = deepspeed_compile()(fn)      # torch.compile(fn), as DeepSpeed's decorator does
            return compiled(*args, **kwargs)
        return call

    compiler.compile = lambda: compile_on_first_call
    try:
        __import__(MUON)
    finally:
        compiler.compile = deepspeed_compile


def skip_cpu_shm_kernel(device: torch.device) -> None:
    """On the CPU, keep DeepSpeed from JIT-compiling its shared-memory all-reduce kernel.

    DeepSpeed's comm backend builds `deepspeed_shm_comm` (C++, ~45 s of compiling on a 2-core box,
    again whenever the torch build or the environment path changes) when it starts on the CPU
    accelerator, but only its inference all-reduce uses it: training's collectives go through the
    gloo process group. Marking the op incompatible is the one switch DeepSpeed reads
    (`deepspeed.comm.torch.build_shm_op`); there is no setting for it."""
    if device.type != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# --------------------------------------------------------------------------------------------
# EMA of the locally owned fp32 slices
# --------------------------------------------------------------------------------------------

def _local_slice(p: torch.nn.Parameter, stage: int) -> tuple[torch.Tensor, int] | None:
    """(live view of this rank's fp32 master slice of p, its offset in p.flatten()), or None."""
    if stage == 3:
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(p)
        return local, dist.get_rank() * local.numel()
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    return mapping.get_hp_fragment(), mapping.lp_fragment_address.start


def _numel(p: torch.nn.Parameter) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def _shape(p: torch.nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def gather_slices(slices: dict[str, tuple[torch.Tensor, int] | None], params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Full tensors from per-rank slices: each rank writes its slice into zeros, then all-reduce."""
    out = {}
    for name, p in params.items():
        n = _numel(p)
        local = slices.get(name)
        size = n if local is None else max(n, local[1] + local[0].numel())   # ZeRO-3 pads the last partition
        device = local[0].device if local is not None else next(iter(s[0] for s in slices.values() if s)).device
        buf = torch.zeros(size, dtype=torch.float32, device=device)
        if local is not None:
            buf.narrow(0, local[1], local[0].numel()).copy_(local[0].flatten())
        dist.all_reduce(buf)
        out[name] = buf[:n].view(_shape(p)).cpu()
    return out


class ShardedEMA:
    """EMA copies (one per decay) of the fp32 master slices this rank owns."""

    def __init__(self, engine, decays: list[float], init: dict[float, dict[str, torch.Tensor]] | None = None):
        self.stage = engine.zero_optimization_stage()
        self.params = trainable(engine.module)
        self.decays = [float(d) for d in decays]
        live = self._live()
        self.names = [n for n, s in live.items() if s is not None]
        self.offsets = {n: live[n][1] for n in self.names}
        self.shadow: dict[float, list[torch.Tensor]] = {}
        for d in self.decays:
            if init is not None and d in init:      # resume: cut this rank's slice out of the full tensor
                self.shadow[d] = [self._cut(init[d][n], *live[n]) for n in self.names]
            else:
                self.shadow[d] = [live[n][0].detach().float().clone() for n in self.names]

    @staticmethod
    def _cut(full: torch.Tensor, local: torch.Tensor, offset: int) -> torch.Tensor:
        flat = full.flatten().float()
        end = offset + local.numel()
        if flat.numel() < end:                      # the last ZeRO-3 partition is padded past the end
            flat = torch.nn.functional.pad(flat, (0, end - flat.numel()))
        return flat[offset:end].clone().to(local.device)

    def _live(self):
        return {n: _local_slice(p, self.stage) for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        live = self._live()
        current = [live[n][0].float() for n in self.names]
        for d, shadow in self.shadow.items():
            torch._foreach_lerp_(shadow, current, 1.0 - d)

    def full(self) -> dict[float, dict[str, torch.Tensor]]:
        """Consolidated EMA weights per decay (a collective: every rank must call it)."""
        out = {}
        for d, shadow in self.shadow.items():
            slices = {n: (s, self.offsets[n]) for n, s in zip(self.names, shadow)}
            out[d] = gather_slices(slices, self.params)
        return out


# --------------------------------------------------------------------------------------------
# Engine, consolidated state, the step
# --------------------------------------------------------------------------------------------

OPT_KEYS = ("exp_avg", "exp_avg_sq")


def trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimiser steps, by name (all of them, or a LoRA run's adapters)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def build_engine(model_cfg: MMJiTConfig, optim: OptimConfig, batch: int, device: torch.device,
                 weights: dict[str, torch.Tensor] | None = None, init_seed: int = 0,
                 lora=None, adapters: dict[str, torch.Tensor] | None = None):
    """(DeepSpeed engine, precision) for a per-worker batch of `batch` images per optimiser step
    (in optim.micro_batch passes). Weights, if given, are loaded before ZeRO partitions them;
    otherwise the initial weights are a function of `init_seed` (DeepSpeed broadcasts rank 0's),
    so two runs of the same config start from the same model. With `lora` (jobs/train/lora.py,
    enabled) the loaded weights are frozen and LoRA adapters (`adapters` when resuming) are what
    trains; ZeRO partitions only them."""
    deepspeed = import_deepspeed()

    if lora is not None and lora.enabled and optim.zero_stage == 3:
        raise ValueError("lora with optim.zero_stage=3 is not supported: ZeRO-3 would partition the frozen base "
                         "weights too; use zero_stage 1 or 2 (the adapters are small)")
    ensure_process_group(device)
    skip_cpu_shm_kernel(device)
    precision = resolve_precision(optim, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        net = MMJiT(model_cfg)
    if weights is not None:
        missing, unexpected = net.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"initial weights do not match the model config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if lora is not None and lora.enabled:
        from jobs.train.lora import apply_lora, load_adapters

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)                   # the same adapter init on every rank and run
            apply_lora(net, lora)
        if adapters is not None:
            load_adapters(net, adapters, "the checkpoint's adapters")
    if optim.activation_checkpointing:
        apply_activation_checkpointing(net)
    net.to(device)
    # A torch optimiser: DeepSpeed's FusedAdam needs a GPU build; AdamW with these betas is the recipe,
    # fused into one kernel per parameter group, which torch has for CUDA and the CPU (on the CPU, the
    # debug model's step is 8% faster than with the per-tensor loop: BENCHMARKS.md, "Test-suite cost").
    opt = torch.optim.AdamW(list(trainable(net).values()), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                            fused=device.type in ("cuda", "cpu"))
    # DeepSpeed 0.19's ZeRO gathers its partitions through torch.distributed.all_gather_into_tensor,
    # which this torch marks deprecated: a FutureWarning in every worker's log that only DeepSpeed can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt,
                                      config=deepspeed_config(optim, batch, dist.get_world_size(), precision))
    if resolve_compile(optim, device):
        # DeepSpeed's own entry point (Module.compile: state-dict names stay as they are). Static
        # shapes: every step has the same micro batch, and sampling uses a separate, eager model.
        engine.compile(compile_kwargs={"dynamic": False})
    return engine, precision


def full_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fp32 weights, Adam moments) of the trained parameters as full CPU tensors by name; a collective."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights, moments = {}, {}
    for name, p in trainable(engine.module).items():
        weights[name] = safe_get_full_fp32_param(p).cpu()
        for key in OPT_KEYS:
            moments[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).cpu()
    return weights, moments


def load_moments(engine, moments: dict[str, torch.Tensor], step: int) -> None:
    """Write consolidated Adam moments into this engine's partitions (any world size)."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_optimizer_state

    zero = engine.optimizer
    inner = zero.optimizer                                    # the torch AdamW over flat fp32 partitions
    if engine.zero_optimization_stage() == 3:
        # ZeRO-3 hands its flat partitions to the torch optimiser only while it steps; between steps
        # (and in a new engine) the optimiser's parameter groups are empty.
        flats = [(inner.param_groups[zero.sub_group_to_group_id[i]], flat) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
    else:
        flats = [(group, flat) for group in inner.param_groups for flat in group["params"]]
    # torch's AdamW creates its state lazily on the first step; create it now so it can be filled,
    # laid out as torch would: the fused (and capturable) kernels keep the step count on the
    # partition's device, the per-tensor loop on the CPU.
    for group, flat in flats:
        on_device = group.get("fused") or group.get("capturable")
        inner.state[flat] = {"step": torch.tensor(float(step), dtype=torch.float32, device=flat.device if on_device else "cpu"),
                             "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    if engine.zero_optimization_stage() < 3:
        # ZeRO-1/2 link each parameter's fragment to the state tensors after the first step; do it now.
        for i, _ in enumerate(inner.param_groups):
            lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], zero.single_partition_of_fp32_groups[i], inner.state)
    for name, p in trainable(engine.module).items():
        for key in OPT_KEYS:
            value = moments.get(f"{key}/{name}")
            if value is None:
                raise ValueError(f"optimizer state has no {key} for parameter {name}")
            safe_set_full_optimizer_state(p, value.to(torch.float32), key)


def position_generators(positions: list[int], seed: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sample, seeded by the run's seed and the sample's global position in the
    run's sample stream: its noise, t and caption dropout (model.denoiser.per_sample_draws) do not
    depend on how a batch is split over workers, and a resumed step draws what the interrupted one drew."""
    return [torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, pos]).generate_state(1, np.uint64)[0]))
            for pos in positions]


class TrainStep:
    """One optimiser step of MM-JiT under DeepSpeed, plus the EMA update.

    With optim.micro_batch below the per-worker batch, the step runs the batch in equal micro
    batches and DeepSpeed accumulates their gradients (scaled by 1/passes, stepping at the last):
    every loss is a mean over its micro batch and each sample keeps its own position-seeded draws,
    so the update is the whole batch's, in less memory (MiniT2I's global batch 1024 on 8 GPUs: 4 x 32).
    """

    def __init__(self, engine, precision: str, denoiser: DenoiserConfig, optim: OptimConfig, ema: ShardedEMA | None, seed: int):
        self.engine, self.denoiser, self.optim, self.ema, self.seed = engine, denoiser, optim, ema, seed
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.device = engine.device
        self.micro = engine.train_micro_batch_size_per_gpu()

    def __call__(self, step: int, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                 positions: list[int], valid: torch.Tensor | None = None) -> dict[str, float]:
        """x: uint8 [b, H, W, 3] as the loader ships it (made [b, 3, H, W] in [-1, 1] here, on the
        device) or float [b, 3, H, W] in [-1, 1]; text [b, L, C_txt], mask [b, L]; positions:
        global sample ids; b = micro batch x accumulation passes."""
        b, m = x.shape[0], self.micro
        passes = self.engine.gradient_accumulation_steps()
        if b != m * passes:
            raise ValueError(f"a step takes {m * passes} images per worker ({passes} x micro batch {m}), got {b}")
        lr = lr_at(step, self.optim)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for i in range(0, b, m):
            loss = self._micro(x[i:i + m], text[i:i + m], mask[i:i + m], positions[i:i + m],
                               None if valid is None else valid[i:i + m])
            self.engine.backward(loss)             # DeepSpeed scales by 1 / passes
            self.engine.step()                     # the optimiser steps at the last pass only
            losses.append(loss.detach())
        if self.ema is not None:
            self.ema.update()
        return {"loss": torch.stack(losses).mean(), "lr": lr}

    def _micro(self, x, text, mask, positions, valid) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = to_model_range(x.to(self.device, non_blocking=True).float()).to(self.dtype)
        else:
            x = x.to(self.device, self.dtype, non_blocking=True)
        text = text.to(self.device, self.dtype, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        generators = position_generators(positions, self.seed, self.device)
        keep, t, eps = per_sample_draws(generators, tuple(x.shape[1:]), self.denoiser, self.device)
        weight = None if valid is None else valid.to(self.device)
        loss, _ = training_loss(self.engine, x, text, mask, self.denoiser, t=t, eps=eps, keep=keep, weight=weight)
        return loss

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
