"""Every GPU figure the README promises, from one command that fits a short GPU window.

    python -m bench.gpu --out DIR        # one H100/H200: <= 8 minutes, writes DIR/gpu.json and DIR/gpu.md
    python -m bench.gpu --smoke          # the same code end to end on CPU at tiny shapes (Triton interpreted)

Parts, in order, each stopped at its time budget (what it measured by then is kept, and the part is marked
``budget``), so the command always finishes and always writes its report:

1. ``tests``: the GPU tests (``pytest -m gpu``) in a subprocess;
2. ``routing``: the fused race plan (exact K and threshold) as a share of the MoE layer's forward;
3. ``gemm``: the Triton grouped GEMMs in TFLOP/s against cuBLAS dense GEMMs of the same FLOPs and against
   ``torch._grouped_mm``;
4. ``moe_layer``: the MoE layer (Triton) against a dense MLP of equal activated FLOPs, forward + backward;
5. ``train_step``: images/s and peak memory of DiT-XL/2 and RaceDiT-XL/2-4in32 training steps (bf16 autocast,
   fused AdamW), eager and ``torch.compile``d;
6. ``sampling``: images/s of DiT-XL/2 (250 DDPM steps, CFG 1.5) and RaceDiT-XL/2-4in32 with threshold routing
   (latents; the VAE decode is not included);
7. ``convergence``: 200 training steps of a small Race-DiT on random latents with the Triton path and with the
   reference path from the same seed: the losses agree within a stated tolerance and decrease.

The targets (routing <= 2% of the MoE forward, grouped GEMM >= 70% of cuBLAS, RaceDiT-XL/2-4in32 step
<= 1.15x DiT-XL/2) are printed next to the measured values; nothing here is estimated.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PartTimeout(Exception):
    """A part ran past its budget."""


@dataclass
class Shapes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    device: str
    dtype: str  # "bfloat16" on the GPU; "float32" in the smoke run (the interpreter's dtype)
    tests_path: str  # what pytest -m gpu collects
    moe_tokens: int  # T of the layer-level parts (DiT-XL/2 at 256 px: 256 tokens x 32 samples)
    moe_dim: int
    moe_experts: int
    moe_k: int
    model_kw: dict[str, Any]  # overrides of the XL models (none on the GPU)
    train_batch: int
    sample_batch: int
    sample_steps: int
    small_kw: dict[str, Any]  # the convergence run's small Race-DiT
    small_batch: int
    small_steps: int
    compile: bool
    repeats: int
    inner: int
    budgets: dict[str, float] = field(default_factory=dict)  # part -> seconds


GPU = Shapes(
    device="cuda",
    dtype="bfloat16",
    tests_path="tests",
    moe_tokens=32 * 256,
    moe_dim=1152,
    moe_experts=32,
    moe_k=4,
    model_kw={},
    train_batch=32,
    sample_batch=32,
    sample_steps=250,
    small_kw=dict(input_size=16, num_classes=10, in_channels=4),
    small_batch=64,
    small_steps=200,
    compile=True,
    repeats=10,
    inner=10,
    # 440 s of parts + start-up and imports: within 8 minutes on one H100/H200
    budgets=dict(tests=75, routing=25, gemm=35, moe_layer=25, train_step=150, sampling=60, convergence=70),
)
SMOKE = Shapes(
    device="cpu",
    dtype="float32",
    tests_path="tests/kernels/test_gpu.py",
    moe_tokens=16,
    moe_dim=16,
    moe_experts=4,
    moe_k=2,
    model_kw=dict(input_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=4),
    train_batch=2,
    sample_batch=2,
    sample_steps=2,
    small_kw=dict(input_size=4, num_classes=4, in_channels=4, hidden_size=16, depth=1, num_heads=2),
    small_batch=2,
    small_steps=4,
    compile=False,  # compiling costs minutes on 2 CPU cores; tests/training/test_compile.py covers it
    repeats=1,
    inner=1,
    # generous: the smoke run takes seconds of CPU, but a loaded machine stretches wall time
    budgets=dict(tests=120, routing=60, gemm=60, moe_layer=60, train_step=60, sampling=60, convergence=120),
)

MOE_TARGET_ROUTING_SHARE = 0.02
GEMM_TARGET_OF_DENSE = 0.70
TRAIN_TARGET_RATIO = 1.15


# ----------------------------------------------------------------------------- timing helpers


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict[str, Callable[[], object]], shapes: Shapes, deadline: float) -> dict[str, float]:
    """Median seconds per call, interleaved round-robin; stops adding rounds at ``deadline``."""
    import statistics

    for fn in fns.values():
        fn()  # warm-up (Triton autotuning, cuBLAS heuristics)
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(shapes.repeats):
        for name, fn in fns.items():
            _sync(shapes.device)
            t0 = time.perf_counter()
            for _ in range(shapes.inner):
                fn()
            _sync(shapes.device)
            samples[name].append((time.perf_counter() - t0) / shapes.inner)
        if time.perf_counter() > deadline:
            break
    return {n: statistics.median(s) for n, s in samples.items()}


def _dtype(shapes: Shapes):
    import torch

    return getattr(torch, shapes.dtype)


# ----------------------------------------------------------------------------- parts


def part_tests(shapes: Shapes, out: dict[str, Any], deadline: float) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", shapes.tests_path]
    out["command"] = " ".join(cmd[1:])
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=max(1.0, deadline - time.perf_counter())
        )
    except subprocess.TimeoutExpired:
        raise PartTimeout("pytest -m gpu ran past the budget") from None
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    out["returncode"] = proc.returncode  # 0 passed; 5 nothing collected/selected
    out["summary"] = lines[-1] if lines else proc.stderr.strip()[-500:]


def _moe_setup(shapes: Shapes):
    import torch

    from racedit.kernels import dispatch
    from racedit.models.ffn import Mlp
    from racedit.moe import MoEConfig, MoEFeedForward

    dev, dt = shapes.device, _dtype(shapes)
    T, D, E, k = shapes.moe_tokens, shapes.moe_dim, shapes.moe_experts, shapes.moe_k
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, k=k, impl="triton")
    layer = MoEFeedForward(D, 4 * D, cfg, 0, 16).to(dev, dt).train()
    dense = Mlp(D, 4 * D).to(dev, dt)
    h = torch.randn(1, T, D, device=dev, dtype=dt)
    with torch.no_grad():
        scores = layer.gating(layer.router(h.view(T, D))[1]).contiguous()  # (T, E)
        plan = dispatch.race_plan(scores, k_total=k * T, impl="triton")
    return layer, dense, h, scores, plan


def part_routing(shapes: Shapes, out: dict[str, Any], deadline: float) -> None:
    import torch

    from racedit.kernels import dispatch

    layer, _, h, scores, plan = _moe_setup(shapes)
    T, k = shapes.moe_tokens, shapes.moe_k
    tau = plan.kth.float()
    out["shape"] = dict(T=T, D=shapes.moe_dim, E=shapes.moe_experts, k=k, dtype=shapes.dtype)
    with torch.no_grad():
        t = timed(
            {
                "moe_forward": lambda: layer(h),
                "race_plan_exact_k": lambda: dispatch.race_plan(scores, k_total=k * T, impl="triton"),
                "race_plan_threshold": lambda: dispatch.race_plan(scores, tau=tau, impl="triton"),
                "torch_topk": lambda: torch.topk(scores.view(-1), k * T),
            },
            shapes,
            deadline,
        )
    out["seconds"] = t
    out["routing_share"] = t["race_plan_exact_k"] / t["moe_forward"]
    out["target_routing_share_max"] = MOE_TARGET_ROUTING_SHARE


def part_gemm(shapes: Shapes, out: dict[str, Any], deadline: float) -> None:
    import torch

    from racedit.kernels import grouped_mm, triton_experts

    layer, _, h, _, plan = _moe_setup(shapes)
    dev, dt = shapes.device, _dtype(shapes)
    T, D = shapes.moe_tokens, shapes.moe_dim
    w1, b1, w2, b2 = (p.detach() for p in (layer.w1, layer.b1, layer.w2, layer.b2))
    H, K = w1.shape[2], plan.num_pairs
    x = h.view(T, D)
    flops = 2 * 2 * K * D * H  # two GEMMs of K x D x H; a multiply-add is 2 FLOPs
    # cuBLAS dense GEMMs of the same FLOPs: (K, D) x (D, H) x (H, D)
    xd = torch.randn(K, D, device=dev, dtype=dt)
    wd1, wd2 = torch.randn(D, H, device=dev, dtype=dt), torch.randn(H, D, device=dev, dtype=dt)
    offs32 = plan.offsets[1:].to(torch.int32)
    rows = x.index_select(0, plan.sorted_token).contiguous()

    def triton_gemms() -> None:
        a, _, _ = triton_experts.grouped_gemm(
            x, w1, plan.offsets, K, a_idx=plan.sorted_token, bias=b1, gelu_fwd=True
        )
        triton_experts.grouped_gemm(a, w2, plan.offsets, K, bias=b2, gate=plan.sorted_gate)

    fns: dict[str, Callable[[], object]] = {
        "dense_cublas": lambda: (xd @ wd1) @ wd2,
        "triton_grouped": triton_gemms,
    }
    reason = grouped_mm.supports(x, w1)
    if reason is None:
        fns["torch_grouped_mm"] = lambda: torch._grouped_mm(
            torch._grouped_mm(rows, w1, offs=offs32), w2, offs=offs32
        )
    else:
        out["torch_grouped_mm"] = f"not run: {reason}"
    with torch.no_grad():
        t = timed(fns, shapes, deadline)
    out["shape"] = dict(pairs=K, D=D, H=H, E=shapes.moe_experts, dtype=shapes.dtype)
    out["seconds"] = t
    out["tflops"] = {n: flops / s / 1e12 for n, s in t.items()}
    out["triton_of_dense"] = t["dense_cublas"] / t["triton_grouped"]
    if "torch_grouped_mm" in t:
        out["triton_of_grouped_mm"] = t["torch_grouped_mm"] / t["triton_grouped"]
    out["target_of_dense_min"] = GEMM_TARGET_OF_DENSE


def part_moe_layer(shapes: Shapes, out: dict[str, Any], deadline: float) -> None:
    import torch

    layer, dense, h, _, _ = _moe_setup(shapes)
    cot = torch.randn_like(h)

    def fwd_bwd(module: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            torch.autograd.backward(module(h.detach().requires_grad_()), cot)
            module.zero_grad(set_to_none=True)

        return step

    t = timed({"dense_mlp": fwd_bwd(dense), "moe_triton": fwd_bwd(layer)}, shapes, deadline)
    out["seconds"] = t
    out["moe_over_dense"] = t["moe_triton"] / t["dense_mlp"]


def _train_step(name: str, shapes: Shapes, compiled: bool, batch: int, impl: str = "auto", **kw):
    """(step, model) for one training step of registry ``name`` (DDPM loss + MoE terms, fused AdamW)."""
    import torch

    import racedit
    from racedit.diffusion import DiffusionConfig, build_objective
    from racedit.models import ForwardAux
    from racedit.moe.losses import aux_losses
    from racedit.training.optim import build_adamw

    torch.manual_seed(0)
    overrides = {**kw}
    if name.startswith("RaceDiT"):
        overrides["moe"] = {**overrides.get("moe", {}), "impl": impl}
    model = racedit.build_model(name, **overrides).to(shapes.device).train()
    objective = build_objective(DiffusionConfig(objective="ddpm"), learn_sigma=model.arch.learn_sigma)
    opt, _ = build_adamw(model.optimizer_param_groups(0.0), lr=1e-4, device=shapes.device)
    net = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(1)
    C, S = model.arch.in_channels, model.arch.input_size
    x0 = torch.randn(batch, C, S, S, generator=g).to(shapes.device)
    y = torch.randint(0, model.arch.num_classes, (batch,), generator=g).to(shapes.device)
    autocast = shapes.dtype == "bfloat16"

    def forward(*args, **kwargs):  # autocast around the model only, as the trainer (Accelerate) does
        with torch.autocast(shapes.device, dtype=torch.bfloat16, enabled=autocast):
            return net(*args, **kwargs)

    def step(x0=x0, y=y) -> float:
        aux = ForwardAux()
        lo = objective.training_loss(forward, x0, y, aux=aux)
        loss = lo.loss
        if model.arch.moe is not None:  # in float32: the co-selection counts of RSL stay exact
            loss = loss + sum(aux_losses(aux, model.patchify(lo.target), model.arch.moe).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, model


def part_train_step(shapes: Shapes, out: dict[str, Any], deadline: float) -> None:
    import torch

    from bench.common import peak_step_memory

    out["batch"] = shapes.train_batch
    out["dtype"] = "bf16 autocast" if shapes.dtype == "bfloat16" else "float32"
    modes = [False, True] if shapes.compile else [False]
    rows = out.setdefault("rows", {})
    for compiled in modes:  # eager rows first: they are the ones the target reads
        for name in ("DiT-XL/2", "RaceDiT-XL/2-4in32"):
            label = f"{name} {'compiled' if compiled else 'eager'}"
            step, _ = _train_step(name, shapes, compiled, shapes.train_batch, **shapes.model_kw)
            t = timed({label: step}, shapes, deadline)[label]
            mem = peak_step_memory(step, shapes.device)
            rows[label] = dict(images_per_s=shapes.train_batch / t, step_s=t, peak_mib=mem / 2**20)
            del step
            if shapes.device == "cuda":
                torch.cuda.empty_cache()
            if time.perf_counter() > deadline:
                raise PartTimeout(f"stopped after {label}")
        base, race = (
            rows.get(f"DiT-XL/2 {'compiled' if compiled else 'eager'}"),
            rows.get(f"RaceDiT-XL/2-4in32 {'compiled' if compiled else 'eager'}"),
        )
        if base and race:
            out[f"race_over_dense_{'compiled' if compiled else 'eager'}"] = race["step_s"] / base["step_s"]
    out["target_race_over_dense_max"] = TRAIN_TARGET_RATIO


def part_sampling(shapes: Shapes, out: dict[str, Any], deadline: float) -> None:
    import torch

    import racedit
    from racedit.diffusion import DiffusionConfig, build_objective
    from racedit.sampling import generate

    out.update(steps=shapes.sample_steps, cfg_scale=1.5, batch=shapes.sample_batch, sampler="ddpm")
    rows = out.setdefault("rows", {})
    for name in ("DiT-XL/2", "RaceDiT-XL/2-4in32"):
        torch.manual_seed(0)
        model = racedit.build_model(name, **shapes.model_kw).to(shapes.device)
        if model.arch.moe is not None:  # one training forward sets tau, so eval routes by threshold
            model.train()
            with torch.no_grad():
                S, C = model.arch.input_size, model.arch.in_channels
                x = torch.randn(shapes.sample_batch, C, S, S, device=shapes.device)
                model(
                    x,
                    torch.zeros(shapes.sample_batch, device=shapes.device),
                    torch.zeros_like(x[:, 0, 0, 0]).long(),
                )
        model.eval()
        objective = build_objective(DiffusionConfig(objective="ddpm"), learn_sigma=model.arch.learn_sigma)
        labels = list(range(shapes.sample_batch))
        labels = [c % model.arch.num_classes for c in labels]
        autocast = torch.bfloat16 if shapes.dtype == "bfloat16" else None
        _sync(shapes.device)
        t0 = time.perf_counter()
        generate(  # latents: their first 3 channels stand in for the image, the VAE decode is not timed
            model, labels, objective=objective, sampler="ddpm", steps=shapes.sample_steps, cfg_scale=1.5,
            batch_size=shapes.sample_batch, autocast_dtype=autocast, decode=lambda z: z[:, :3].clamp(-1, 1),
        )  # fmt: skip
        _sync(shapes.device)
        dt = time.perf_counter() - t0
        rows[name] = dict(images_per_s=shapes.sample_batch / dt, seconds=dt)
        if model.arch.moe is not None:
            rows[name]["threshold_routing"] = all(
                m.threshold.initialized for m in model.modules() if hasattr(m, "threshold")
            )
        del model
        if time.perf_counter() > deadline:
            raise PartTimeout(f"stopped after {name}")


# Tolerance of the Triton-vs-reference training run. Both paths compute the same float32 math in a different
# order (Triton tiles its GEMM reductions; TF32 is off for both), so the first steps agree to ~1e-5 relative;
# later, chaotic training dynamics amplify rounding, so only the smoothed curves are compared there.
CONVERGENCE_FIRST_STEPS = 10
CONVERGENCE_FIRST_RTOL = 1e-3  # per-step loss, first 10 steps: float32 reordering (~1e-5) with margin
CONVERGENCE_WINDOW_RTOL = 0.05  # mean loss of the last quarter: 5% (run-to-run spread of a 200-step run)


def part_convergence(shapes: Shapes, out: dict[str, Any], deadline: float) -> None:
    import torch

    if shapes.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    losses: dict[str, list[float]] = out.setdefault("losses", {})
    g = torch.Generator().manual_seed(0)
    kw = shapes.small_kw
    n_data = 8 * shapes.small_batch  # a fixed set of random latents, drawn in a fixed order
    data = torch.randn(n_data, kw["in_channels"], kw["input_size"], kw["input_size"], generator=g)
    labels = torch.randint(0, kw["num_classes"], (n_data,), generator=g)
    for impl in ("triton", "torch"):
        step, model = _train_step(
            "RaceDiT-S/2-2in8", dataclass_replace(shapes, dtype="float32"), False, shapes.small_batch,
            impl=impl, **kw,
        )  # fmt: skip
        torch.manual_seed(1)  # the noise and label dropout of every step: the same for both paths
        curve = losses.setdefault(impl, [])
        for i in range(shapes.small_steps):
            j = (i * shapes.small_batch) % n_data
            x0 = data[j : j + shapes.small_batch].to(shapes.device)
            y = labels[j : j + shapes.small_batch].to(shapes.device)
            curve.append(step(x0, y))
            if time.perf_counter() > deadline:
                raise PartTimeout(f"stopped at step {i + 1} of the {impl} run")
        del model
    tri, ref = losses["triton"], losses["torch"]
    first = min(CONVERGENCE_FIRST_STEPS, len(ref))
    quarter = max(1, len(ref) // 4)
    out["first_steps_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(tri[:first], ref[:first]))
    tail_t, tail_r = sum(tri[-quarter:]) / quarter, sum(ref[-quarter:]) / quarter
    out["last_quarter_rel_diff"] = abs(tail_t - tail_r) / abs(tail_r)
    out["loss_first_quarter"] = sum(ref[:quarter]) / quarter
    out["loss_last_quarter"] = tail_r
    out["tolerance"] = dict(
        first_steps=CONVERGENCE_FIRST_STEPS,
        first_rtol=CONVERGENCE_FIRST_RTOL,
        window_rtol=CONVERGENCE_WINDOW_RTOL,
    )
    out["agree"] = (
        out["first_steps_max_rel_diff"] <= CONVERGENCE_FIRST_RTOL
        and out["last_quarter_rel_diff"] <= CONVERGENCE_WINDOW_RTOL
    )
    out["loss_decreases"] = tail_r < out["loss_first_quarter"]


def dataclass_replace(shapes: Shapes, **changes: Any) -> Shapes:
    import dataclasses

    return dataclasses.replace(shapes, **changes)


PARTS: dict[str, Callable[[Shapes, dict[str, Any], float], None]] = {
    "tests": part_tests,
    "routing": part_routing,
    "gemm": part_gemm,
    "moe_layer": part_moe_layer,
    "train_step": part_train_step,
    "sampling": part_sampling,
    "convergence": part_convergence,
}


# ----------------------------------------------------------------------------- running and reporting


def run_part(name: str, shapes: Shapes) -> dict[str, Any]:
    """Run one part under its budget: a cooperative deadline inside, and a timer signal as the backstop."""
    budget = shapes.budgets[name]
    record: dict[str, Any] = {"budget_s": budget, "results": {}}
    start = time.perf_counter()
    deadline = start + budget

    def on_alarm(signum, frame):  # noqa: ARG001
        raise PartTimeout(f"ran past its {budget:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget + 5.0)  # cooperative checks first, the signal after 5 s
    try:
        PARTS[name](shapes, record["results"], deadline)
        record["status"] = "ok"
    except PartTimeout as err:
        record["status"] = "budget"
        record["note"] = str(err)
    except Exception as err:  # a failing part must not stop the others; the report says what failed
        if time.perf_counter() - start >= budget:  # the timer fired inside a library that wrapped it
            record["status"], record["note"] = "budget", f"ran past its {budget:.0f} s budget"
        else:
            record["status"], record["note"] = "error", f"{type(err).__name__}: {err}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    record["seconds"] = time.perf_counter() - start
    return record


def environment(shapes: Shapes) -> dict[str, Any]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "python": platform.python_version(),
        "host": platform.node(),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# racedit GPU check{' (SMOKE: CPU, tiny shapes, not GPU figures)' if report['smoke'] else ''}",
        "",
        f"Produced by `{report['command']}` on {env['device']}, {env['timestamp']}; torch {env['torch']}, "
        f"CUDA {env['cuda']}, Triton {env['triton']}{' (interpreted)' if env['triton_interpret'] else ''}, "
        f"Python {env['python']}. Total {report['seconds']:.0f} s.",
        "",
        "| part | status | seconds (budget) | key results |",
        "|---|---|---|---|",
    ]
    keys = {
        "tests": ["summary"],
        "routing": ["routing_share", "target_routing_share_max"],
        "gemm": ["tflops", "triton_of_dense", "triton_of_grouped_mm", "target_of_dense_min"],
        "moe_layer": ["moe_over_dense"],
        "train_step": ["race_over_dense_eager", "race_over_dense_compiled", "target_race_over_dense_max"],
        "sampling": ["rows"],
        "convergence": ["first_steps_max_rel_diff", "last_quarter_rel_diff", "agree", "loss_decreases"],
    }
    for name, rec in report["parts"].items():
        res = rec["results"]
        shown = []
        for k in keys.get(name, []):
            if k in res:
                v = res[k]
                if isinstance(v, dict):
                    v = ", ".join(
                        f"{a}: { ({x: _fmt(y) for x, y in b.items()} if isinstance(b, dict) else _fmt(b)) }"
                        for a, b in v.items()
                    )
                shown.append(f"{k} = {_fmt(v)}")
        note = f" ({rec['note']})" if rec.get("note") else ""
        lines.append(
            f"| {name} | {rec['status']}{note} | {rec['seconds']:.0f} ({rec['budget_s']:.0f}) | {'; '.join(shown)} |"
        )
    if "train_step" in report["parts"]:
        rows = report["parts"]["train_step"]["results"].get("rows", {})
        if rows:
            lines += ["", "| train step | images/s | step ms | peak MiB |", "|---|---|---|---|"]
            lines += [
                f"| {k} | {v['images_per_s']:.4g} | {1e3 * v['step_s']:.4g} | {v['peak_mib']:.5g} |"
                for k, v in rows.items()
            ]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="directory for gpu.json and gpu.md (default: runs/gpu-<time>)")
    p.add_argument(
        "--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreted: tests this script"
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before racedit.kernels (and triton) are imported
    import torch

    shapes = SMOKE if args.smoke else GPU
    if not args.smoke and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device; run it on a GPU, or use --smoke to test it on CPU", file=sys.stderr)
        return 2
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"bench.gpu: unknown --parts {unknown}; choose from {list(PARTS)}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out or f"runs/gpu-{stamp}")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join(["python -m bench.gpu", *(sys.argv[1:] if argv is None else argv)]),
        "smoke": args.smoke,
        "environment": environment(shapes),
        "parts": {},
    }
    from racedit.io import atomic_write_json, atomic_write_text

    for name in parts:
        print(f"[bench.gpu] {name} (budget {shapes.budgets[name]:.0f} s)", file=sys.stderr, flush=True)
        report["parts"][name] = run_part(name, shapes)
        report["seconds"] = time.perf_counter() - start
        atomic_write_json(out_dir / "gpu.json", report)  # after every part: a cut-off run keeps what it had
    report["seconds"] = time.perf_counter() - start
    atomic_write_json(out_dir / "gpu.json", report)
    atomic_write_text(out_dir / "gpu.md", markdown(report))
    print(markdown(report))
    print(f"[bench.gpu] wrote {out_dir / 'gpu.json'} and {out_dir / 'gpu.md'}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
