"""Triton-vs-reference checks run under TRITON_INTERPRET=1 in a subprocess (docs/spec/kernels.md,
"Testing without a GPU").

Usage: ``python tests/kernels/interp_checks.py GROUP`` (GROUP: routing, edges, ffn, ffn_bf16, layer). The
interpreter must be switched on before the kernels are defined, and an out-of-bounds access can kill
the process, so pytest runs each group here in its own interpreter and reads the exit status.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from racedit.kernels import dispatch, reference  # noqa: E402
from racedit.kernels import triton_experts as TX  # noqa: E402

torch.set_num_threads(1)
INT_FIELDS = ("counts", "offsets", "sorted_token", "sorted_expert", "slot")


def same_plan(got: reference.RoutePlan, want: reference.RoutePlan, what: str) -> None:
    for f in INT_FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype == torch.long, f"{what}: {f} dtype {a.dtype} vs {b.dtype}"
        assert torch.equal(a, b), f"{what}: {f} differs\n{a}\n{b}"
    assert got.sorted_gate.dtype == want.sorted_gate.dtype, what
    assert torch.equal(got.sorted_gate, want.sorted_gate), f"{what}: sorted_gate differs"
    if want.kth is not None:
        assert got.kth is not None and got.kth.dtype == want.kth.dtype, what
        assert torch.equal(got.kth, want.kth), f"{what}: kth {got.kth} vs {want.kth}"


def oracle_mask(scores: torch.Tensor, k: int, ties: str) -> torch.Tensor:
    """Independent of both implementations: numpy lexsort on (-value, flat index)."""
    v = scores.double().flatten().numpy()
    order = np.lexsort((np.arange(v.size), -v))
    mask = np.zeros(v.size, dtype=bool)
    mask[order[:k]] = True
    if ties == "all":
        mask |= v >= v[order[k - 1]]
    return torch.from_numpy(mask).view(scores.shape)


def race_case(scores: torch.Tensor, k: int, ties: str, what: str) -> None:
    got = dispatch.race_plan(scores, k_total=k, ties=ties, impl="triton")
    want = reference.race_plan(scores, k_total=k, ties=ties)
    same_plan(got, want, what)
    assert torch.equal(got.mask(), oracle_mask(scores, k, ties)), f"{what}: selection differs from the oracle"
    if ties == "index":
        assert got.sorted_token.numel() == k, what


def group_routing() -> None:
    g = torch.Generator().manual_seed(0)
    cases = [(2048, 16, 4, torch.float32, "index"), (2048, 16, 4, torch.float32, "all")]
    cases += [(300, 5, 2, dt, ties) for dt in (torch.float32, torch.bfloat16) for ties in ("index", "all")]
    cases += [(129, 6, 3, torch.float32, "index"), (64, 3, 1, torch.bfloat16, "index")]
    for T, E, k, dtype, ties in cases:
        s = torch.randn(T, E, generator=g).to(dtype)
        race_case(s, k * T, ties, f"random T={T} E={E} k={k} {dtype} {ties}")
    # threshold and mask modes (3 launches, data-dependent K)
    s = torch.randn(333, 7, generator=g)
    for tau in (0.5, torch.tensor(-0.25), torch.tensor(10.0)):
        same_plan(
            dispatch.race_plan(s, tau=tau, impl="triton"), reference.race_plan(s, tau=tau), f"threshold {tau}"
        )
    sb = s.bfloat16()
    same_plan(
        dispatch.race_plan(sb, tau=0.1, impl="triton"), reference.race_plan(sb, tau=0.1), "threshold bf16"
    )
    for p in (0.0, 0.3, 1.0):
        m = torch.rand(333, 7, generator=g) < p
        same_plan(dispatch.plan_from_mask(m, s, impl="triton"), reference.plan_from_mask(m, s), f"mask p={p}")
    check_launches()
    print("OK routing")


def check_launches() -> None:
    """Threshold and mask modes: exactly 3 kernel launches (count, scan, scatter) and no torch fills."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    class RecordOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside:  # the interpreter's own host copies during a launch do not count
                ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    launches: list[str] = []
    inside: list[bool] = []
    original = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        inside.append(True)
        try:
            return original(self, *args, **kwargs)
        finally:
            inside.pop()

    s = torch.randn(100, 6)
    tau = torch.tensor([0.3])  # the layer's fp32 buffer
    m = s > 0
    InterpretedFunction.run = counting_run
    try:
        for call in (
            lambda: dispatch.race_plan(s, tau=tau, impl="triton"),
            lambda: dispatch.plan_from_mask(m, s, impl="triton"),
        ):
            launches.clear()
            ops: list[str] = []
            with torch.no_grad(), RecordOps():
                call()
            assert launches == ["_count_kernel", "_scan_kernel", "_scatter_kernel"], launches
            compute = [
                op for op in ops if any(w in op for w in ("fill", "zero", "stack", "cat", "copy", "add"))
            ]
            assert not compute, f"torch work outside the 3 launches: {compute}"
    finally:
        InterpretedFunction.run = original


def group_edges() -> None:
    g = torch.Generator().manual_seed(1)
    T, E = 700, 6  # two token blocks at E=6 (BT=512): ties cross a block boundary
    ties_src = torch.randint(0, 4, (T, E), generator=g).float() - 1.5  # heavy ties, negatives
    zeros = torch.where(torch.rand(T, E, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    zeros[::7, 1] = -1.0
    hot = torch.randn(T, E, generator=g)
    hot[:, 2] += 100.0  # one hot expert takes every token, the others are empty at K = T
    inf = torch.randn(T, E, generator=g)
    inf[5, :] = float("inf")
    inf[9, :] = float("-inf")
    cases = {
        "ties straddle the cut": (ties_src, {"index": (1, 333, 2101, T * E), "all": (5, 2101)}),
        "all equal": (torch.full((T, E), 0.25), {"index": (1, 1401, T * E), "all": (1401,)}),
        "+0/-0": (zeros, {"index": (3, 1000), "all": (1000,)}),
        "negative": (-torch.rand(T, E, generator=g) - 1.0, {"index": (2 * T,), "all": ()}),
        "one hot expert": (hot, {"index": (T,), "all": (T,)}),
        "+-inf": (inf, {"index": (4, T * E - 3), "all": (4,)}),
    }
    for what, (scores, ks) in cases.items():
        for ties, k_list in ks.items():
            for k in k_list:
                race_case(scores, k, ties, f"{what} k={k} {ties}")
    plan = dispatch.race_plan(ties_src, k_total=T, impl="triton")
    assert plan.counts.sum().item() == T and plan.offsets[-1].item() == T
    for e in range(E):  # tokens ascending inside each expert group
        grp = plan.sorted_token[plan.offsets[e] : plan.offsets[e + 1]]
        assert torch.all(grp[1:] > grp[:-1])
    one = torch.randn(50, 1, generator=g)  # E = 1
    race_case(one, 7, "index", "E=1")
    for bad in (0, T * E + 1):
        try:
            dispatch.race_plan(ties_src, k_total=bad, impl="triton")
        except ValueError:
            pass
        else:
            raise AssertionError(f"k_total={bad} accepted")
    nan = torch.randn(40, 5, generator=g)
    nan[3, 2] = float("nan")
    for kwargs in (dict(k_total=10), dict(k_total=10, ties="all"), dict(tau=0.0)):
        try:
            dispatch.race_plan(nan, impl="triton", **kwargs)
        except ValueError as err:
            assert "NaN" in str(err)
        else:
            raise AssertionError(f"NaN scores accepted with {kwargs}")
    print("OK edges")


def make_params(T, D, E, H, dtype, g):
    x = torch.randn(T, D, generator=g)
    s = torch.randn(T, E, generator=g)
    w1 = torch.randn(E, D, H, generator=g) / D**0.5
    b1 = 0.1 * torch.randn(E, H, generator=g)
    w2 = torch.randn(E, H, D, generator=g) / H**0.5
    b2 = 0.1 * torch.randn(E, D, generator=g)
    return [p.to(dtype) for p in (x, s, w1, b1, w2, b2)]


def run_ffn(params, grad_out, impl, route):
    ps = [p.detach().clone().requires_grad_() for p in params]
    x, s, w1, b1, w2, b2 = ps
    plan = route(s, impl)
    out = dispatch.expert_ffn(x, plan, w1, b1, w2, b2, impl=impl)
    (out.float() * grad_out.float()).sum().backward()
    return [out.detach()] + [p.grad for p in ps]


def compare_ffn(params, route, atol, rtol, what, ref_params=None):
    g = torch.Generator().manual_seed(5)
    grad_out = torch.randn(params[0].shape, generator=g).to(params[0].dtype)
    got = run_ffn(params, grad_out, "triton", route)
    want = run_ffn(ref_params or params, grad_out, "torch", route)
    names = ("out", "dx", "dscores", "dw1", "db1", "dw2", "db2")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, (what, name)
        scale = b.float().abs().max().item() + 1e-6
        err = (a.float() - b.float()).abs().max().item()
        assert err <= atol + rtol * scale, f"{what}: {name} max err {err:.3e} (scale {scale:.3e})"


def group_ffn() -> None:
    g = torch.Generator().manual_seed(2)
    race = lambda k: lambda s, impl: dispatch.race_plan(s, k_total=k, impl=impl)  # noqa: E731
    for T, D, E, H, k in [(96, 32, 5, 48, 2), (130, 32, 8, 64, 3), (64, 16, 3, 16, 1)]:
        params = make_params(T, D, E, H, torch.float32, g)
        compare_ffn(params, race(k * T), 1e-5, 1e-5, f"fp32 T={T} D={D} E={E} H={H}")
    params = make_params(80, 32, 4, 32, torch.float32, g)
    params[1][:, 1] -= 100.0  # expert 1 never chosen: empty group, zero weight gradients
    compare_ffn(params, race(80), 1e-5, 1e-5, "empty expert")
    none = lambda s, impl: dispatch.plan_from_mask(torch.zeros_like(s, dtype=torch.bool), s, impl=impl)  # noqa: E731
    compare_ffn(params, none, 0.0, 0.0, "no pair routed")
    thr = lambda s, impl: dispatch.race_plan(s, tau=0.3, impl=impl)  # noqa: E731
    compare_ffn(params, thr, 1e-5, 1e-5, "threshold plan")
    # combine alone against the reference, with unrouted tokens
    s = torch.randn(50, 6, generator=g)
    s[7] = -10.0
    plan = reference.race_plan(s, k_total=60)
    y = torch.randn(60, 24, generator=g)
    out = TX.combine(y, plan.slot)
    # float32 sums of at most E = 6 terms of O(1), in the same ascending-e order but fused differently: ~1e-7
    assert torch.allclose(out, reference.combine(y, plan), atol=1e-6) and torch.equal(out[7], torch.zeros(24))
    print("OK ffn")


def group_ffn_bf16() -> None:
    g = torch.Generator().manual_seed(3)
    race = lambda s, impl: dispatch.race_plan(s, k_total=2 * 96, impl=impl)  # noqa: E731
    params = make_params(96, 64, 6, 64, torch.bfloat16, g)
    # bf16 Triton (fp32 accumulation) against the fp32 reference on the same bf16-rounded inputs
    compare_ffn(params, race, 2e-2, 2e-2, "bf16 vs fp32 reference", ref_params=[p.float() for p in params])
    print("OK ffn_bf16")


def group_ffn_autocast() -> None:
    """Under bf16 autocast the Triton path computes in bf16, as the reference's per-expert addmm does (autocast
    casts those; the dispatch casts x for the kernels): bf16 output, float32 gradients for float32 inputs, and
    the reference's values under the same autocast within bf16 rounding (both round operands and intermediates to
    bf16 at different points, 2^-8 relative each: 2e-2 of the largest magnitude, as group ffn_bf16)."""
    g = torch.Generator().manual_seed(4)
    params = make_params(64, 32, 4, 32, torch.float32, g)
    grad_out = torch.randn(64, 32, generator=g)
    results = {}
    for impl in ("triton", "torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[impl] = run_ffn(
                params, grad_out, impl, lambda s, i: dispatch.race_plan(s, k_total=128, impl=i)
            )
    got, want = results["triton"], results["torch"]
    assert got[0].dtype == want[0].dtype == torch.bfloat16, (got[0].dtype, want[0].dtype)
    assert all(a.dtype == torch.float32 for a in got[1:]), [a.dtype for a in got[1:]]
    for name, a, b in zip(("out", "dx", "dscores", "dw1", "db1", "dw2", "db2"), got, want):
        scale = b.float().abs().max().item() + 1e-6
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 2e-2 + 2e-2 * scale, f"autocast: {name} max err {err:.3e} (scale {scale:.3e})"
    print("OK ffn_autocast")


def group_layer() -> None:
    """The MoE layer (the kernels' one consumer) through impl="triton" equals impl="torch"."""
    from racedit.moe import MoEConfig, MoEFeedForward

    for router in ("race", "token"):
        results = {}
        for impl in ("torch", "triton"):
            torch.manual_seed(0)
            cfg = MoEConfig(num_experts=6, k=2, router=router, impl=impl)
            layer = MoEFeedForward(32, 128, cfg, 0, 16).train()
            h = torch.randn(2, 24, 32, requires_grad=True)
            y = layer(h)
            y.square().sum().backward()
            results[impl] = [y.detach(), h.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
        assert len(results["torch"]) == len(results["triton"]) > 2
        for a, b in zip(results["torch"], results["triton"]):
            # float32: Triton's tiled GEMM reductions (D = 32, H = 128 terms) against per-expert addmm, then
            # through the router's backward: a few 1e-6 relative; 1e-4 leaves margin
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"MoE layer ({router}) differs between impls"
    print("OK layer")


GROUPS = {
    "routing": group_routing,
    "edges": group_edges,
    "ffn": group_ffn,
    "ffn_bf16": group_ffn_bf16,
    "ffn_autocast": group_ffn_autocast,
    "layer": group_layer,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(GROUPS):
        GROUPS[name]()
