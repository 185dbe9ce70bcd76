"""FSDP training (train.distributed=fsdp) on two CPU processes (torchrun, gloo): it agrees with DDP, a run
killed with SIGKILL resumes bit for bit, and a checkpoint written by N processes resumes on M."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import run_python, tiny_run, write_config

import racedit
from racedit.testing import assert_bitwise
from racedit.training import checkpoint as ckpt
from racedit.training.sharded import read_full

# Runs the trainer like racedit-train; dumps the full (gathered) live and EMA weights after setup (resume
# checks) and at the end; with KILL_STEP set, every process SIGKILLs itself right after that checkpoint.
SCRIPT = r"""
import os, signal, sys
from pathlib import Path
from safetensors.torch import save_file
from racedit.training import checkpoint as ckpt
from racedit.training.config import load_run_config
from racedit.training.loop import Trainer

config, resume, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
kill_step = int(os.environ.get("KILL_STEP", "0"))
original = ckpt.save_checkpoint

def save_then_die(*args, **kwargs):
    path = original(*args, **kwargs)
    if args[1] == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: a hard crash right after the checkpoint
    return path

ckpt.save_checkpoint = save_then_die

def dump(tr, tag):
    if tr.fsdp:
        from racedit.training.sharded import full_state_dict
        model, ema = full_state_dict(tr.raw_model), full_state_dict(tr.ema.model)  # collective
    else:
        model, ema = tr.raw_model.state_dict(), tr.ema.model.state_dict()
    if tr.rank == 0:
        save_file({k: v.contiguous() for k, v in model.items()}, tr.out / f"{tag}_model.safetensors")
        save_file({k: v.contiguous() for k, v in ema.items()}, tr.out / f"{tag}_ema.safetensors")

class DumpingTrainer(Trainer):
    def setup(self):
        super().setup()
        dump(self, "setup")

tr = DumpingTrainer(load_run_config(config, overrides), None if resume == "none" else resume)
tr.run()
dump(tr, "end")
from racedit.distributed import exit_command, teardown
teardown()
exit_command(0)
"""


def launch(tmp: Path, cfg: dict, procs: int, resume: str = "none", *overrides: str):
    script = tmp / "fsdp_script.py"
    script.write_text(SCRIPT)
    config = write_config(tmp / f"{Path(cfg['train']['output_dir']).name}.yaml", cfg)
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), str(script)]
    return run_python([*args, str(config), resume, *overrides], timeout=400)


# Appended to every script run_on_processes runs: each process writes the script's ``result`` (a dict) as JSON
# and leaves the process group.
SCRIPT_END = r"""
with open(f"{sys.argv[1]}.rank{dist.get_rank()}.json", "w") as fh:
    json.dump(result, fh)
from racedit.distributed import exit_command, teardown
teardown()
exit_command(0)
"""


def run_on_processes(tmp_path: Path, source: str, timeout: int, nproc: int = 2) -> list[dict]:
    """Run a script under ``torchrun --nproc_per_node 2`` (or ``nproc``); it gets an output stem as its
    argument, sets ``result`` (a dict), and ``SCRIPT_END`` writes it to ``<stem>.rank<r>.json``; return every
    rank's results (the script must succeed)."""
    script = tmp_path / "processes.py"
    script.write_text(source + SCRIPT_END)
    out = tmp_path / "result"
    args = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(script),
        str(out),
    ]
    r = run_python(args, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return [json.loads(Path(f"{out}.rank{i}.json").read_text()) for i in range(nproc)]


def run_cfg(out: Path, distributed: str, **train: object) -> dict:
    # gradient checkpointing, a race threshold (PLR, RSL) and label dropout
    return tiny_run(out, train={"distributed": distributed, "gradient_checkpointing": True, **train})


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """One uninterrupted 6-step FSDP run on 2 processes (checkpoints at steps 3 and 6)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    r = launch(tmp, run_cfg(tmp / "straight", "fsdp"), 2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return tmp / "straight"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp_agrees_with_ddp(fsdp_run: Path, tmp_path: Path) -> None:
    r = launch(tmp_path, run_cfg(tmp_path / "ddp", "ddp"), 2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ddp = tmp_path / "ddp"
    # Same init, and the same data, noise and label dropout on each rank: the first step's forward is the same
    # computation, so its loss is bitwise equal. After that the runs differ only in rounding: DDP all-reduces
    # full gradients in buckets, FSDP reduce-scatters flattened shards (with two processes g0 + g1 rounds the
    # same either way), and the fused AdamW kernel (the CPU default) takes a vectorised body and a scalar tail
    # whose boundaries move with the tensor sizes (full tensors vs local shards), so an element's update may
    # differ by an ulp or two. Six steps of updates of size ~lr = 1e-3 with ~1e-7 relative error: at most
    # ~1e-9 absolute in a weight; we allow 1e-8 (plus 2 ulp of the weight itself), and 1e-6 relative on the
    # losses of later steps (they see weights that differ by that much).
    la, lb = losses(fsdp_run), losses(ddp)
    assert len(la) == len(lb) == 6
    assert la[0] == lb[0]
    assert la == pytest.approx(lb, rel=1e-6)
    for tag in ("end_model", "end_ema"):
        fa, fb = load_file(fsdp_run / f"{tag}.safetensors"), load_file(ddp / f"{tag}.safetensors")
        assert fa.keys() == fb.keys()
        for k in fa:
            torch.testing.assert_close(fa[k], fb[k], rtol=2.4e-7, atol=1e-8, msg=f"{tag} {k}")
    # the race thresholds moved (routing state is part of what must agree)
    model = load_file(fsdp_run / "end_model.safetensors")
    assert all(float(v) != 0.0 for k, v in model.items() if k.endswith("threshold.tau"))


@pytest.mark.timeout(900)  # a bound on a hang, not a timing check
@pytest.mark.parametrize(
    "name, scale, steps",
    # mHC's scales multiply its projection, which starts at 0: they get their first gradient once an update
    # has moved it, so one step more (its H_res scale stays near 0 for longer: the expanded streams are equal
    # copies until the writes differ, and mixing equal copies has no gradient; the post scale is checked)
    [("RaceDiT-S/2-2in8-DHCx2", "dynamic_alpha_scale", 2), ("RaceDiT-S/2-2in8-mHCx2", "post_scale", 3)],
)
def test_fsdp_with_scalar_parameters_agrees_with_ddp(
    tmp_path: Path, name: str, scale: str, steps: int
) -> None:
    # Dynamic hyper-connections and mHC have scalar parameters (the scales), which FSDP2 cannot shard: every
    # process keeps them whole and averages their gradients (one all-reduce each), and the clipping norm
    # counts them once. mHC adds its hand-written read / Sinkhorn / write nodes on gathered weights. Against
    # DDP as in test_fsdp_agrees_with_ddp (same tolerances, 2-3 steps instead of 6).
    runs = {}
    for kind in ("fsdp", "ddp"):
        out = tmp_path / kind
        cfg = run_cfg(out, kind, max_steps=steps, checkpoint_every=steps, max_grad_norm=0.05)
        cfg["model"] = {**cfg["model"], "name": name}
        r = launch(tmp_path, cfg, 2)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        runs[kind] = out
    la, lb = losses(runs["fsdp"]), losses(runs["ddp"])
    assert len(la) == len(lb) == steps and la[0] == lb[0]
    assert la == pytest.approx(lb, rel=1e-6)
    setup, end = (load_file(runs["fsdp"] / f"{tag}_model.safetensors") for tag in ("setup", "end"))
    scales = [k for k in end if k.endswith(scale)]
    assert scales and any(not torch.equal(setup[k], end[k]) for k in scales)  # the scalars trained
    for tag in ("end_model", "end_ema"):
        fa, fb = (load_file(runs[k] / f"{tag}.safetensors") for k in ("fsdp", "ddp"))
        assert fa.keys() == fb.keys()
        for k in fa:
            torch.testing.assert_close(fa[k], fb[k], rtol=2.4e-7, atol=1e-8, msg=f"{tag} {k}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp_sigkill_and_resume_is_bitwise(fsdp_run: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = run_cfg(tmp_path / "killed", "fsdp")
    monkeypatch.setenv("KILL_STEP", "3")
    r = launch(tmp_path, cfg, 2)
    assert r.returncode != 0  # torchrun reports the SIGKILLed workers
    out = tmp_path / "killed"
    assert ckpt.list_checkpoints(out / "checkpoints")[0].name == "step_00000003"
    assert not (out / "final").exists()
    monkeypatch.delenv("KILL_STEP")
    r = launch(tmp_path, cfg, 2, "auto")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "resumed from" in r.stderr + r.stdout
    # Same world, same shards, same reduction order: the resumed run is the uninterrupted one, bit for bit.
    a = read_full(fsdp_run / "checkpoints" / "step_00000006")
    b = read_full(out / "checkpoints" / "step_00000006")
    assert_bitwise(a, b, "checkpoint")
    assert_bitwise(load_file(fsdp_run / "end_ema.safetensors"), load_file(out / "end_ema.safetensors"), "ema")
    assert losses(fsdp_run) == losses(out)
    for step in ("step_00000003", "step_00000006"):
        ckpt.verify(out / "checkpoints" / step)  # the manifest covers the shards


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp_checkpoint_resumes_on_another_world_size(fsdp_run: Path, tmp_path: Path) -> None:
    # 2 -> 1: a copy of the 2-process run's step-3 checkpoint, resumed on one process, trains to step 4
    # (in bf16 autocast) and writes its own checkpoint.
    one = tmp_path / "one"
    shutil.copytree(fsdp_run / "checkpoints" / "step_00000003", one / "checkpoints" / "step_00000003")
    r = launch(tmp_path, run_cfg(one, "fsdp", max_steps=4, mixed_precision="bf16"), 1, "auto")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    saved = read_full(fsdp_run / "checkpoints" / "step_00000003")
    assert_bitwise(saved["model"], load_file(one / "setup_model.safetensors"), "2->1 model")
    assert_bitwise(saved["ema"], load_file(one / "setup_ema.safetensors"), "2->1 ema")
    logged = [json.loads(x) for x in (one / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == [4] and 0.0 < logged[0]["loss"] < 10.0
    # 1 -> 2: the one-process step-4 checkpoint resumed on two processes (nothing left to train)
    two = tmp_path / "two"
    shutil.copytree(one / "checkpoints" / "step_00000004", two / "checkpoints" / "step_00000004")
    r = launch(tmp_path, run_cfg(two, "fsdp", max_steps=4), 2, "auto")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    saved = read_full(one / "checkpoints" / "step_00000004")
    assert_bitwise(saved["model"], load_file(two / "setup_model.safetensors"), "1->2 model")
    assert_bitwise(saved["ema"], load_file(two / "setup_ema.safetensors"), "1->2 ema")
    assert (two / "final" / "model.safetensors").is_file()  # the export: full weights, save_pretrained
    # streamed one tensor at a time by sharded.save_full: every EMA tensor, bitwise, loadable as a DiT
    exported = load_file(two / "final" / "model.safetensors")
    assert_bitwise(saved["ema"], exported, "export")
    assert type(racedit.load_model(two / "final")).__name__ == "DiT"


def test_sharded_checkpoint_metadata_cannot_run_code(tmp_path: Path) -> None:
    import pickle

    from racedit.training.sharded import read_metadata_file

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps(Evil()))
    with path.open("rb") as fh, pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        read_metadata_file(fh)


@pytest.mark.timeout(900)  # a bound on a hang, not a timing check
def test_fsdp_gradient_accumulation_agrees_with_ddp(tmp_path: Path) -> None:
    # 2 processes x grad_accum 2 (micro-batches of 4): FSDP skips the reduce-scatter on the first micro-batch
    # (set_requires_gradient_sync) and reduce-scatters the accumulated gradient once; DDP all-reduces every
    # micro-batch. Both see the same micro-batches, noise and routing, so the first loss is bitwise equal (same
    # forward) and the gradients differ only in the order of their four-term sums (2 ranks x 2 micro-batches).
    # AdamW moves an element by at most ~lr = 1e-3 per step (|m_hat / sqrt(v_hat)| <= 1 early on); a rounding
    # difference in a gradient that is itself a near-cancellation (|g| near eps = 1e-8) changes that ratio by up
    # to ~1e-4 of itself, so two steps may differ by 2 x 1e-4 x lr = 2e-7 in a weight (seen: 3e-8).
    runs = {}
    for kind in ("fsdp", "ddp"):
        out = tmp_path / kind
        r = launch(tmp_path, run_cfg(out, kind, max_steps=2, grad_accum=2, checkpoint_every=2), 2)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        runs[kind] = out
    la, lb = losses(runs["fsdp"]), losses(runs["ddp"])
    assert len(la) == len(lb) == 2 and la[0] == lb[0]
    assert la == pytest.approx(lb, rel=1e-6)
    for tag in ("end_model", "end_ema"):
        fa, fb = (load_file(runs[k] / f"{tag}.safetensors") for k in ("fsdp", "ddp"))
        assert fa.keys() == fb.keys()
        for k in fa:
            torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=2e-7, msg=f"{tag} {k}")
    setup, end = (load_file(runs["fsdp"] / f"{tag}_model.safetensors") for tag in ("setup", "end"))
    assert any(not torch.equal(setup[k], end[k]) for k in end)  # it trained


COLLECTIVES_SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
torch.set_num_threads(1)
import racedit
from racedit.models import ForwardAux
from racedit.training import sharded

rank = dist.get_rank()
errors, counts = [], []
for name in ("RaceDiT-S/2-2in8", "DiT-S/2-HCx2"):  # a MoE model; a dense one with hyper-connections
    runs = {}
    for gloo in (True, False):
        torch.manual_seed(0)
        model = racedit.build_model(
            name, input_size=8, num_classes=10, hidden_size=32, depth=3, num_heads=2, in_channels=4
        ).train()
        with torch.no_grad():  # away from adaLN-Zero's init, where most gradients are exactly 0
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
        sharded.shard(model, torch.device("cpu"), gloo_collectives=gloo)
        g = torch.Generator().manual_seed(3 + rank)
        x, t = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g) * 1000
        y = torch.randint(0, 10, (4,), generator=g)
        torch.manual_seed(5 + rank)  # label dropout
        out = model(x, t, y, aux=ForwardAux())
        out.pow(2).mean().backward()
        grads = {n: p.grad.to_local().clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[gloo] = (out.detach(), grads)
    (out_a, grads_a), (out_b, grads_b) = runs[True], runs[False]
    if not torch.equal(out_a, out_b):
        errors.append(f"{name}: outputs differ")
    if grads_a.keys() != grads_b.keys() or not grads_a:
        errors.append(f"{name} gradients: {sorted(grads_a)} vs {sorted(grads_b)}")
    errors += [f"{name}: {n}" for n in grads_a if not torch.equal(grads_a[n], grads_b.get(n))]
    counts.append((len(grads_a), sum(bool(g.abs().sum() > 0) for g in grads_a.values())))
result = {"errors": errors, "counts": counts}
"""


@pytest.mark.timeout(900)  # a bound on a hang, not a timing check
def test_gloo_collectives_equal_fsdp2s_own(tmp_path: Path) -> None:
    # racedit.training.collectives carries FSDP2's all-gather and reduce-scatter as point-to-point exchanges
    # (the gather is data movement; with two processes both reductions sum g0 + g1 and halving is exact): a
    # forward and backward through the sharded model give bitwise the same output and the same local
    # gradient shards as FSDP2's own gloo calls.
    results = run_on_processes(tmp_path, COLLECTIVES_SCRIPT, timeout=400)
    assert results[0]["errors"] == results[1]["errors"] == []
    # every unit's parameters, embedders and final layer included; nearly all with a nonzero gradient shard
    for grads, nonzero in results[0]["counts"]:
        assert grads > 30 and nonzero > 0.8 * grads


EXCHANGE_SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
from racedit.training.collectives import ExchangeAllGather, ExchangeReduceScatter

rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
errors = []
for n in (1, 5, 4099):  # elements per shard: a single one, a few, an odd count
    g = torch.Generator().manual_seed(11 + rank)
    shard = torch.randn(n, generator=g)
    reference, ours = torch.empty(world * n), torch.empty(world * n)
    dist.all_gather_single(reference, shard)
    ours.view(world, n)[rank].copy_(shard)
    ExchangeAllGather()(ours, ours.view(world, n)[rank], group)  # FSDP2 gathers in place
    if not torch.equal(ours, reference):
        errors.append(f"all-gather n={n}")
    grads = torch.randn(world * n, generator=g)
    for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
        reference, ours = torch.empty(n), torch.empty(n)
        dist.reduce_scatter_single(reference, grads.clone(), op=op)
        ExchangeReduceScatter()(ours, grads.clone(), group, op)
        # bitwise with two addends (IEEE addition commutes); with more, only the order of the fp32 additions
        # may differ: within (world - 1) roundings of the sum of magnitudes
        total = torch.empty(world * world * n)  # every process's |grads|
        dist.all_gather_single(total, grads.abs())
        bound = (world - 1) * torch.finfo(torch.float32).eps * total.view(world, world, n)[:, rank].sum(0)
        if op == dist.ReduceOp.AVG:
            bound = bound / world
        exact = torch.equal(ours, reference)
        if (world == 2 and not exact) or not bool(((ours - reference).abs() <= bound).all()):
            errors.append(f"reduce-scatter {op} n={n}: max error {(ours - reference).abs().max().item()}")
result = {"errors": errors}
"""


@pytest.mark.timeout(600)  # a bound on a hang, not a timing check
@pytest.mark.parametrize("nproc", [2, 3])
def test_exchange_collectives_equal_gloos(tmp_path: Path, nproc: int) -> None:
    # the point-to-point all-gather equals gloo's bitwise; the reduce-scatter bitwise at 2 processes and
    # within the rounding of a reordered sum at 3 (where it adds more than two copies)
    results = run_on_processes(tmp_path, EXCHANGE_SCRIPT, timeout=300, nproc=nproc)
    assert all(r["errors"] == [] for r in results), results


LOCKSTEP_SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
torch.set_num_threads(1)
import racedit
from racedit.diffusion import DiffusionConfig, build_objective
from racedit.sampling.generate import sample_latents
from racedit.training import sharded

rank = dist.get_rank()


def build():
    return racedit.build_model(
        "RaceDiT-S/2-2in8", input_size=8, num_classes=10, hidden_size=32, depth=3, num_heads=2, in_channels=4
    )


torch.manual_seed(0)
model = build()
with torch.no_grad():  # away from adaLN-Zero's init, where every block is the identity
    for p in model.parameters():
        p.add_(torch.randn_like(p), alpha=0.05)
model = model.float().eval().requires_grad_(False)  # as the EMA copy is
sharded.shard(model, torch.device("cpu"))
shards = {n: p.to_local().clone() for n, p in model.named_parameters() if n != "pos_embed"}  # (kept whole)
objective = build_objective(DiffusionConfig(objective="flow"), learn_sigma=model.arch.learn_sigma)
labels = [0, 1, 2, 3, 4, 5]
kw = dict(objective=objective, sampler="heun", steps=3, cfg_scale=1.5, seed=7, batch_size=4)
with sharded.lockstep(model) as m:  # every process, the same calls
    together = sample_latents(m, labels, **kw)
errors = []
for n, p in model.named_parameters():  # resharded afterwards, shards untouched
    if not (hasattr(p, "to_local") and torch.equal(p.to_local(), shards[n])) and n != "pos_embed":
        errors.append(f"not resharded: {n}")
plain = sharded.full_model(model, build)  # the gathered reference (collective), main process only
result = {"errors": errors}
if rank == 0:
    reference = sample_latents(plain, labels, **kw)
    result["equal"] = torch.equal(together, reference)
    result["max_diff"] = float((together - reference).abs().max())
    result["spread"] = float(reference.std())
"""


@pytest.mark.timeout(900)  # a bound on a hang, not a timing check
def test_lockstep_sampling_equals_the_gathered_model(tmp_path: Path) -> None:
    # Sample grids under FSDP: every process runs the same sampling loop on the sharded EMA model, whose forward
    # all-gathers one unit at a time. The gathered weights are the full weights bit for bit and the forward is
    # the same float32 arithmetic on the same shapes, so the samples equal those of the full model gathered
    # onto the main process (the way grids were drawn before), bitwise; afterwards every unit is sharded again.
    results = run_on_processes(tmp_path, LOCKSTEP_SCRIPT, timeout=400)
    assert results[0]["errors"] == results[1]["errors"] == []
    assert results[0]["spread"] > 0.1  # real samples, not a constant
    assert results[0]["equal"], results[0]["max_diff"]


@pytest.mark.timeout(900)  # a bound on a hang, not a timing check
def test_fsdp_trainer_samples_its_grids_in_lockstep(tmp_path: Path) -> None:
    # The trainer's sampling under FSDP: a grid every step, the final grid, the demo report and
    # train.time_budget_minutes' probe of the sampling cost before the first step, all on the sharded EMA model
    # with every process taking part (the probe used to run on the main process alone, whose forward
    # all-gathers could not complete).
    out = tmp_path / "grids"
    cfg = run_cfg(out, "fsdp", max_steps=2, checkpoint_every=2, time_budget_minutes=60)
    cfg["sample"] = {**cfg["sample"], "every": 1, "final_grid": True, "report_per_class": 2}
    r = launch(tmp_path, cfg, 2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert (out / "samples" / "step_00000001.png").is_file()
    assert (out / "samples" / "final.png").is_file()
    assert "sampling batches at" in r.stderr  # the probe ran and was logged
    # the demo report: the main process scores samples the other process helped draw (sampled_by_main)
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["samples_per_class"] == 2 and 0.0 <= report["generated"]["accuracy"] <= 1.0


COMPILE_SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")
torch.set_num_threads(1)
import racedit
from racedit.diffusion import DiffusionConfig, build_objective
from racedit.models import ForwardAux
from racedit.moe.losses import aux_losses
from racedit.training import sharded

rank = dist.get_rank()
torch.manual_seed(0)
model = racedit.build_model(
    "RaceDiT-S/2-2in8", input_size=8, num_classes=10, hidden_size=32, depth=2, num_heads=2, in_channels=4
).train()
with torch.no_grad():  # away from adaLN-Zero's init, where most gradients are exactly zero on both paths
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
            p.normal_(0, 0.02)
sharded.shard(model, torch.device("cpu"))
objective = build_objective(DiffusionConfig(objective="flow"), learn_sigma=model.arch.learn_sigma)


def loss_of(net):
    g = torch.Generator().manual_seed(3 + rank)
    x0, y = torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    torch.manual_seed(5 + rank)  # label dropout draws from the global RNG
    aux = ForwardAux()
    out = objective.training_loss(net, x0, y, aux=aux, generator=torch.Generator().manual_seed(7 + rank))
    return out.loss + sum(aux_losses(aux, model.patchify(out.target), model.arch.moe).values())


start = {n: b.clone() for n, b in model.named_buffers()}
eager = loss_of(model)
eager.backward()
grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
buffers = {n: b.clone() for n, b in model.named_buffers()}
model.zero_grad(set_to_none=True)
for n, b in model.named_buffers():
    b.copy_(start[n])  # the same threshold state for the compiled step
compiled = loss_of(torch.compile(model, backend="aot_eager"))  # as train.compile=true wraps the sharded model
compiled.backward()
errors = []
try:
    # test_compile.py's tolerances (same float32 math, sums reordered by the compiler)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    nonzero = sum(bool(g.abs().sum() > 0) for g in grads.values())
    assert nonzero > 0.8 * len(grads), f"only {nonzero} of {len(grads)} gradients are nonzero"
    for n, p in model.named_parameters():
        if n in grads:
            # the reduce-scattered mean gradient, gathered
            torch.testing.assert_close(p.grad.full_tensor(), grads[n], rtol=1e-4, atol=1e-6, msg=n)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n  # the same threshold update (global K-th value, outside the graph)
    # still sharded (all but the frozen position embedding, which every process keeps whole)
    assert all(hasattr(p, "to_local") for p in model.parameters() if p.requires_grad)
except AssertionError as err:
    errors.append(str(err))
result = {"errors": errors, "loss": eager.item()}
"""


@pytest.mark.slow  # compiling takes most of a minute on 2 loaded cores (like test_compile.py)
@pytest.mark.timeout(900)  # a bound on a hang, not a timing check
def test_compiled_fsdp_step_matches_eager(tmp_path: Path) -> None:
    # train.compile=true under FSDP: torch.compile of the sharded model (FSDP2's hooks run eagerly, the blocks
    # are compiled; the race cut is a compiler-disabled collective). aot_eager runs the graph capture,
    # AOTAutograd and functionalisation inductor consumes, at a fraction of the compile time (test_compile.py).
    results = run_on_processes(tmp_path, COMPILE_SCRIPT, timeout=600)
    assert results[0]["errors"] == results[1]["errors"] == []
    assert (
        results[0]["loss"] != results[1]["loss"]
    )  # each rank its own data: the gradient mean is a real mean


def test_compiled_trainer_keeps_the_plain_model_for_ema_and_checkpoints(tmp_path: Path) -> None:
    # train.compile=true wraps the (sharded) model in torch.compile's OptimizedModule, whose parameter names
    # carry an "_orig_mod." prefix: the trainer must hand the DiT itself to the EMA update, the checkpoint and
    # the export (compiling is lazy, so setting up costs no compile).
    script = tmp_path / "setup_only.py"
    script.write_text(
        "import sys\n"
        "from racedit.models import DiT\n"
        "from racedit.training.config import load_run_config\n"
        "from racedit.training.loop import Trainer\n"
        "tr = Trainer(load_run_config(sys.argv[1]))\n"
        "tr.setup()\n"
        "assert type(tr.model).__name__ == 'OptimizedModule', type(tr.model)\n"
        "assert isinstance(tr.raw_model, DiT) and not hasattr(tr.raw_model, '_orig_mod')\n"
        "tr.ema.update(tr.raw_model, 0)  # names match the EMA copy's\n"
        "print('ok')\n"
    )
    for kind in ("fsdp", "ddp"):
        cfg = run_cfg(tmp_path / kind, kind, compile=True)
        config = write_config(tmp_path / f"{kind}.yaml", cfg)
        r = run_python([str(script), str(config)], timeout=300)
        assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
