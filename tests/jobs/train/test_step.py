"""The Ray-free training step: DeepSpeed engine from our config, compiled or eager.

Every engine runs in one child process: the one-process gloo group and DeepSpeed's engine state
stay out of the pytest process that the Ray tests share, and torch, DeepSpeed and the compiler
start once for all of them.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_lib
import time

import pytest
import torch

from jobs.train.step import OptimConfig, lr_at, resolve_compile


# (compile, ZeRO stage, micro batch) of every engine the tests compare; 0 = no accumulation.
VARIANTS = [(False, 2, 0), (True, 1, 0), (True, 2, 0), (False, 2, 2), (False, 3, 1)]


def _steps(variants, queue) -> None:
    """Three steps of each variant's engine in this (child) process, one after the other: the
    imports, the gloo group and the compile caches are paid once."""
    import sys
    import warnings

    import torch
    import torch._inductor.config

    from jobs.train.step import OptimConfig, TrainStep, build_engine, full_state, load_moments
    from model.denoiser import DenoiserConfig
    from model.mmjit import MMJiT, preset

    # Inductor writes scalar C++ kernels here instead of vectorised ones: the same capture, lowering
    # and DeepSpeed wrapping, but g++ builds them in about half the time (a cold compile cache:
    # 60 s against 36 s for this process). Nothing here measures the kernels' speed.
    torch._inductor.config.cpp.vec_isa_ok = False
    cfg = preset("debug", depth=2)
    out = {}
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")                # every warning the engines raise, each time
        for compile_, stage, micro_batch in variants:
            torch.manual_seed(0)
            net = MMJiT(cfg)
            final = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]     # the zero-initialised output layer
            torch.nn.init.normal_(final.weight, std=0.02)        # a non-zero output, so every weight gets a gradient
            weights = net.state_dict()
            optim = OptimConfig(lr=1e-3, warmup_steps=0, steps=3, zero_stage=stage, compile=compile_, micro_batch=micro_batch)
            engine, precision = build_engine(cfg, optim, 4, torch.device("cpu"), weights)
            step = TrainStep(engine, precision, DenoiserConfig(), optim, None, seed=0)
            g = torch.Generator().manual_seed(1)
            x = torch.randint(0, 256, (4, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8, generator=g)
            text = torch.randn(4, cfg.text_length, cfg.text_dim, generator=g)
            mask = torch.arange(cfg.text_length)[None] < torch.tensor([[5], [9], [30], [64]])
            valid = torch.tensor([True, True, False, True])                # a row that failed to decode weighs 0
            losses, norms = [], []
            for i in range(3):
                losses.append(step(i, x, text, mask, positions=[4 * i + j for j in range(4)], valid=valid)["loss"].item())
                norms.append(step.grad_norm())                             # before clipping: sees how gradients were scaled
            compiled = getattr(engine, "is_compiled", False)
            assert engine.gradient_accumulation_steps() == 4 // (micro_batch or 4)
            weights_now, moments = full_state(engine)
            state = {k: v.numpy() for k, v in weights_now.items()}             # consolidated fp32 weights
            out[(compile_, stage, micro_batch)] = (losses, state, compiled, norms)
            # A resume's optimiser state: a new engine of the same settings filled by load_moments,
            # as a restarted worker's is. Its state is laid out as torch's own steps left this one's,
            # holds the moments that went in (other values than this engine's, so a fill that went
            # astray cannot pass), and full_state reads them back.
            def layout(e):
                return sorted((k, str(v.dtype), v.device.type, tuple(v.shape))
                              for s in e.optimizer.optimizer.state.values() for k, v in s.items())

            def totals(e):
                return {k: sum(float(s[k].double().sum()) for s in e.optimizer.optimizer.state.values()) for k in ("exp_avg", "exp_avg_sq")}

            own, target = layout(engine), {k: v * 2 + 1 for k, v in moments.items()}
            engine.destroy()
            engine, _ = build_engine(cfg, optim, 4, torch.device("cpu"), weights)
            load_moments(engine, target, 3)
            filled, again = totals(engine), full_state(engine)[1]
            out.setdefault("moments reloaded", []).append((
                own == layout(engine),
                all(abs(filled[k] - sum(float(v.double().sum()) for n, v in target.items() if n.startswith(k + "/"))) < 1e-6 * (1 + abs(filled[k]))
                    for k in filled),
                again.keys() == target.keys() and all(torch.equal(again[n], target[n]) for n in target),
                sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values()})))
            engine.destroy()
            out.setdefault("inductor after each engine", []).append("torch._inductor.compile_fx" in sys.modules)
    out["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in shown})
    # DeepSpeed's Muon kernels (imported by every engine) are compiled at their first call: torch.compile
    # gets the plain function then, and the result is the function's own.
    from deepspeed.runtime.zero.muon import original_muon

    newton_schulz, compiled_fns = original_muon.zeropower_via_newtonschulz5, []
    real_compile = torch.compile
    torch.compile = lambda fn: compiled_fns.append(fn) or fn
    try:
        g = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
        result = newton_schulz(g, steps=3)
        newton_schulz(g, steps=3)
    finally:
        torch.compile = real_compile
    out["muon"] = (compiled_fns == [newton_schulz.__wrapped__], torch.equal(result, newton_schulz.__wrapped__(g, steps=3)))
    queue.put(out)


@pytest.fixture(scope="module")
def engines():
    """{(compile, stage, micro batch): (losses, weights, compiled, grad norms)}, from one child process:
    the one-process gloo group and DeepSpeed's engine state stay out of the pytest process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_steps, args=(VARIANTS, queue))
    proc.start()
    deadline = time.monotonic() + 600
    while True:                                   # a child that dies fails the test now, not at the timeout
        try:
            result = queue.get(timeout=2)
            break
        except queue_lib.Empty:
            assert proc.is_alive(), f"training child exited with code {proc.exitcode} before reporting"
            assert time.monotonic() < deadline, "training child took over 10 minutes"
    proc.join(timeout=60)
    assert proc.exitcode == 0
    return result


def test_compiled_engine_trains_like_the_eager_one(engines):
    # ZeRO-1 and ZeRO-2 compiled against the eager ZeRO-2 engine (one process: the stages only
    # differ in how they partition, so the numbers must agree).
    eager_losses, eager_state, eager_compiled, _ = engines[(False, 2, 0)]
    assert not eager_compiled and eager_losses[-1] != eager_losses[0]     # the optimiser really stepped
    for stage in (1, 2):
        losses, state, compiled, _ = engines[(True, stage, 0)]
        assert compiled                                              # the flag reached DeepSpeed
        assert state.keys() == eager_state.keys()                    # Module.compile keeps the parameter names
        assert losses == pytest.approx(eager_losses, rel=1e-4), stage
        for name, value in state.items():
            assert abs(value - eager_state[name]).max() < 1e-4, (stage, name)


def test_steps_raise_no_deprecation_from_deepspeeds_gathers(engines):
    # DeepSpeed's ZeRO gathers through torch's deprecated all_gather_into_tensor; build_engine keeps
    # that FutureWarning out of every worker's log (the child records every warning its engines raise).
    assert not [w for w in engines["warnings"] if "all_gather_into_tensor" in w], engines["warnings"]


def test_an_eager_engine_leaves_torchinductor_unloaded_and_muon_compiles_at_first_call(engines):
    # The first engine is eager (ZeRO-2): building it and stepping loaded DeepSpeed's Muon module
    # without TorchInductor (jobs/train/step.py, import_muon_compiling_on_first_call); the compiled
    # variants after it load TorchInductor themselves.
    assert VARIANTS[0] == (False, 2, 0)
    assert engines["inductor after each engine"] == [False, True, True, True, True]
    compiled_once, same_result = engines["muon"]
    assert compiled_once and same_result


def test_resumed_adam_state_is_laid_out_as_torchs_own_and_reads_back(engines):
    # Every variant (ZeRO 1, 2 and 3, compiled or not; the optimiser is torch's fused AdamW): a new
    # engine filled by load_moments with other moments than three steps left has its state laid out
    # as torch's steps lay it out (dtypes, devices, shapes), holds those moments, and full_state
    # reads them back exactly.
    assert engines["moments reloaded"] == [(True, True, True, [3.0])] * len(VARIANTS)


def test_gradient_accumulation_takes_the_same_step_as_the_whole_batch(engines):
    # The batch of 4 in 2 passes of 2 (ZeRO-2) and 4 passes of 1 (ZeRO-3): every loss is a mean
    # over its micro batch and DeepSpeed divides each pass's gradient by the number of passes, so
    # the gradient (its norm) and the update are the whole batch's, up to summation order.
    whole_losses, whole_state, _, whole_norms = engines[(False, 2, 0)]
    for stage, micro in ((2, 2), (3, 1)):
        losses, state, _, norms = engines[(False, stage, micro)]
        assert losses == pytest.approx(whole_losses, rel=1e-4), (stage, micro)
        assert norms == pytest.approx(whole_norms, rel=1e-4), (stage, micro)
        for name, value in state.items():
            assert abs(value - whole_state[name]).max() < 1e-4, (stage, micro, name)
    with pytest.raises(ValueError, match="optim.micro_batch 3 must divide the per-worker batch 4"):
        OptimConfig(micro_batch=3).accumulation(4)
    with pytest.raises(ValueError, match="must be >= 0"):
        OptimConfig(micro_batch=-1)


def test_compile_setting_is_checked():
    assert OptimConfig().compile == "auto"
    with pytest.raises(ValueError, match="optim.compile must be true, false or auto"):
        OptimConfig(compile="yes")
    with pytest.raises(ValueError, match="does not work with optim.zero_stage=3"):
        OptimConfig(compile=True, zero_stage=3)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")          # devices as values: nothing runs on them
    assert resolve_compile(OptimConfig(), cuda) and not resolve_compile(OptimConfig(), cpu)
    assert not resolve_compile(OptimConfig(zero_stage=3), cuda)    # auto: ZeRO-3 runs eager
    assert resolve_compile(OptimConfig(compile=True), cpu) and not resolve_compile(OptimConfig(compile=False), cuda)


def test_learning_rate_warms_up_holds_then_decays_over_the_last_steps():
    constant = OptimConfig(lr=1.0, warmup_steps=4, steps=20)
    assert [lr_at(s, constant) for s in (0, 3, 19)] == [0.25, 1.0, 1.0]    # MiniT2I: constant after warmup
    wsd = OptimConfig(lr=1.0, warmup_steps=4, steps=20, decay_steps=10, decay_to=0.1)
    rates = [lr_at(s, wsd) for s in range(20)]
    assert rates[:10] == [lr_at(s, constant) for s in range(10)]        # the stable phase is the constant run's
    assert rates[10] == pytest.approx(1.0 - 0.09) and rates[19] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(rates[9:], rates[10:]))            # falls at every decaying step
    # a decay longer than the warmup's end: the lower of the two ramps
    assert lr_at(0, OptimConfig(lr=1.0, warmup_steps=4, steps=4, decay_steps=4)) == 0.25
    with pytest.raises(ValueError, match="optim.decay_steps must be between 0 and optim.steps"):
        OptimConfig(steps=10, decay_steps=11)
    with pytest.raises(ValueError, match="optim.decay_to must be a fraction"):
        OptimConfig(decay_to=1.5)


def test_activation_checkpointing_gives_the_same_gradients():
    from jobs.train.step import apply_activation_checkpointing
    from model.mmjit import MMJiT, preset

    torch.manual_seed(0)
    plain = MMJiT(preset("debug"))
    final = [m for m in plain.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(final.weight, std=0.02)
    ckpt = MMJiT(preset("debug"))
    ckpt.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(ckpt)
    assert ckpt.state_dict().keys() == plain.state_dict().keys()
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 64, 64, generator=g)
    mask = torch.arange(64)[None] < torch.tensor([[10], [64]])
    for net in (plain, ckpt):
        net(x, text, mask).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-7), name
