"""Two CPU processes (torchrun, gloo): identical weights on both ranks, the logged loss is the mean over
ranks, and the race threshold moves with the K-th value of the global batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import run_python, tiny_run, write_config

SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
from safetensors.torch import save_file
from racedit.models import ForwardAux
from racedit.moe.layer import MoEFeedForward
from racedit.training.config import load_run_config
from racedit.training.loop import Trainer

cfg = load_run_config(sys.argv[1])
tr = Trainer(cfg)
tr.run()
rank = tr.accelerator.process_index
out = tr.out
save_file({k: v.contiguous() for k, v in tr.raw_model.state_dict().items()}, out / f"weights_rank{rank}.safetensors")
save_file({k: v.contiguous() for k, v in tr.ema.model.state_dict().items()}, out / f"ema_rank{rank}.safetensors")

# One more training-mode forward on rank-specific inputs: tau must move towards the global K-th score.
model = tr.raw_model.train()
layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
before = [float(m.threshold.tau) for m in layers]
g = torch.Generator().manual_seed(100 + rank)
n = 3 + rank  # unequal token counts per rank
x = torch.randn(n, 1, 8, 8, generator=g)
t = torch.rand(n, generator=g) * 1000
y = torch.randint(0, 10, (n,), generator=g)
aux = ForwardAux()
model(x, t, y, aux=aux)
report = []
for m, b, rec in zip(layers, before, aux.layers):
    scores = rec.logits.detach().float().reshape(-1)  # identity gating: scores = logits
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(2)]
    dist.all_gather(sizes, torch.tensor([scores.numel()]))
    padded = torch.full((int(max(s.item() for s in sizes)),), float("-inf"))
    padded[: scores.numel()] = scores
    parts = [torch.empty_like(padded) for _ in range(2)]
    dist.all_gather(parts, padded)
    allscores = torch.cat(parts)
    tokens = sum(int(s.item()) for s in sizes) // m.num_experts
    k = m.cfg.k
    kth_global = torch.topk(allscores, k * tokens).values[-1].item()
    kth_local = torch.topk(scores, k * (scores.numel() // m.num_experts)).values[-1].item()
    a = m.cfg.threshold_decay
    report.append({"tau": float(m.threshold.tau), "before": b, "global": kth_global, "local": kth_local, "a": a})
(out / f"tau_rank{rank}.json").write_text(json.dumps(report))

from racedit.distributed import exit_command, teardown
teardown()  # as the racedit-train command does
exit_command(0)  # and leaves as it does (os._exit under torchrun)
"""


@pytest.mark.timeout(900)  # a bound on a hang, not a timing check
def test_two_process_cpu_run(tmp_path: Path) -> None:
    cfg = tiny_run(tmp_path / "run", train={"max_steps": 4, "checkpoint_every": 2}, log={"per_rank": True})
    config = write_config(tmp_path / "run.yaml", cfg)
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    r = run_python(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port, chosen by the rendezvous
            "--nproc_per_node",
            "2",
            str(script),
            str(config),
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "terminate called" not in r.stderr  # the process group was torn down, not aborted at exit
    out = tmp_path / "run"
    from safetensors.torch import load_file

    # 1. both ranks hold bitwise identical weights and EMA
    for kind in ("weights", "ema"):
        w0, w1 = (load_file(out / f"{kind}_rank{i}.safetensors") for i in (0, 1))
        assert w0.keys() == w1.keys()
        for k in w0:
            assert torch.equal(w0[k], w1[k]), f"{kind} {k} differs between ranks"
    # 2. the logged loss is the mean of the two ranks' own losses (and they differ: different data)
    logged = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    per_rank = [
        {r["step"]: r for r in map(json.loads, (out / "logs" / f"rank{i}.jsonl").read_text().splitlines())}
        for i in (0, 1)
    ]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for rec in logged:
        l0, l1 = per_rank[0][rec["step"]]["loss"], per_rank[1][rec["step"]]["loss"]
        assert l0 != l1
        # float32 all-reduce mean of two values vs a float64 mean of their logged copies: a few ulp (6e-8)
        assert rec["loss"] == pytest.approx((l0 + l1) / 2, rel=1e-6, abs=1e-7)
        for term in ("loss_diffusion", "loss_plr", "loss_rsl"):
            mean = (per_rank[0][rec["step"]][term] + per_rank[1][rec["step"]][term]) / 2
            assert rec[term] == pytest.approx(mean, rel=1e-5, abs=1e-8)
    # 3. tau <- a * tau + (1 - a) * T_K with T_K of the union of both ranks' scores
    reports = [json.loads((out / f"tau_rank{i}.json").read_text()) for i in (0, 1)]
    assert len(reports[0]) == 2
    for layer0, layer1 in zip(*reports):
        assert layer0["tau"] == layer1["tau"] and layer0["global"] == layer1["global"]
        for rep in (layer0, layer1):
            expected = rep["a"] * rep["before"] + (1 - rep["a"]) * rep["global"]
            # one float32 EMA step recomputed in float64: within a few float32 ulp
            assert rep["tau"] == pytest.approx(expected, rel=1e-6, abs=1e-7)
        assert layer0["local"] != layer1["local"]  # a per-rank K-th value would have split the ranks
    # 4. the run's checkpoint holds one RNG file per process
    assert sorted(p.name for p in (out / "checkpoints" / "step_00000004" / "rng").iterdir()) == [
        "rank_00000.pt",
        "rank_00001.pt",
    ]
    assert sys.executable  # the processes ran under this interpreter


@pytest.mark.timeout(900)  # a bound on a hang, not a timing check
def test_two_process_gradient_accumulation(tmp_path: Path) -> None:
    """DDP with grad_accum > 1 trains (torch's reducer used to assert under no_sync with the static graph)
    and keeps both ranks' weights bitwise identical."""
    cfg = tiny_run(tmp_path / "run", train={"max_steps": 2, "grad_accum": 2, "checkpoint_every": 2})
    config = write_config(tmp_path / "run.yaml", cfg)
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    r = run_python(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(config)]
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    from safetensors.torch import load_file

    w0, w1 = (load_file(tmp_path / "run" / f"weights_rank{i}.safetensors") for i in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    logged = [json.loads(x) for x in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2] and all(
        torch.isfinite(torch.tensor(r["loss"])) for r in logged
    )
