"""The training loop: build everything from a ``RunConfig``, optionally resume, train, export.

Reads top to bottom (``Trainer.run``):

1. checks that fail fast, before any step: output dir writable, dataset present, data shape == model;
2. builds the model (registry name + overrides, shapes from the dataset), objective, EMA (fp32), AdamW
   with the model's parameter groups, warmup + constant/cosine LR, the per-process batch stream;
3. resumes model, EMA, optimizer, scheduler, step, data position and every RNG from a checkpoint;
4. each step: ``grad_accum`` micro-batches of ``L = L_diffusion + sum(MoE aux terms)`` (docs/spec/race-dit.md
   sections 4-5; the MoE layers record into a ``ForwardAux``), backward, global-norm clip, AdamW step,
   EMA update; the loss is averaged over processes before it is checked for NaN/inf and logged;
5. every N steps: logged scalars, a labelled sample grid from the EMA model, routing metrics and the
   layer x timestep heatmap (MoE), a checkpoint;
6. at the end: a checkpoint, the EMA model exported with ``sampling.json`` (what ``sample.py`` reads), a
   final grid, the loss curve and, for the digits demo, the offline quality report.

The loop only trains; what it calls lives beside what it belongs to: the sample grids and the samples of
the time budget and the report in ``racedit/sampling/preview.py``, the export in
``racedit/training/export.py``, the report in ``racedit/metrics/demo.py``, the time limits in
``racedit/training/budget.py``, the resume rules in ``racedit/training/resume.py``.

Determinism: model init draws from ``seed``; process ``r`` draws its diffusion noise from a private
generator seeded ``seed + r`` and its label dropout from the global RNG seeded ``seed + r``; the data
order comes from ``seed`` and the epoch (``BatchStream``). All of these are checkpointed, so on CPU a
resumed run is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs

from racedit.config.core import ConfigError, to_dict
from racedit.data import build_dataset
from racedit.diffusion import build_objective
from racedit.distributed import launched
from racedit.interfaces import ForwardAux
from racedit.metrics.demo import demo_report
from racedit.models import DiT, ModelConfig
from racedit.models.loading import model_kwargs
from racedit.models.registry import ModelSection, model_name
from racedit.moe import RoutingStats, aux_losses
from racedit.progress import progress as progress_bar
from racedit.progress import say
from racedit.sampling.preview import Preview
from racedit.training import checkpoint as ckpt
from racedit.training import resume as resuming
from racedit.training import sharded
from racedit.training.budget import RunBudget, Tail, sampling_batches, time_sampling_batch
from racedit.training.config import RunConfig
from racedit.training.data import BatchStream
from racedit.training.ema import EMA
from racedit.training.export import export_model, finish_export
from racedit.training.host_memory import retain_freed_memory
from racedit.training.logging import (
    JsonlWriter,
    ScalarWindow,
    flat_hparams,
    plot_loss_curve,
    read_jsonl,
    trim_after,
)
from racedit.training.optim import build_adamw, keep_impl
from racedit.vae import VAEError


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or inf; training stopped before applying the step."""


ResumeError = resuming.ResumeError  # re-exported: a run cannot start or resume as asked
PROG = "racedit-train"  # the prefix of the trainer's messages
FRESH_START = (None, "", "none", "never")  # values of --resume that mean "start from step 0"


# ----------------------------------------------------------------------------- building blocks


def check_output_dir(path: Path) -> Path:
    """Create ``path`` and prove it is writable, or say which directory is not and why."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"output directory {str(path)!r} is not writable ({err.strerror or err}); "
            "choose another with train.output_dir=PATH"
        ) from None
    return path


def resolve_run_model(model_section: ModelSection, dataset: Any, objective_kind: str) -> ModelConfig:
    """The ``model:`` section -> ModelConfig. ``input_size``, ``in_channels`` and ``num_classes`` default to
    the dataset's; ``learn_sigma`` defaults to the objective's (DDPM learns sigma, flow matching does not).
    A dataset whose sample shape differs from explicitly given model sizes is an error naming both."""
    return model_section.bind(dataset.sample_shape, dataset.num_classes, objective_kind == "ddpm")


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warmup, then constant or cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    export_dir: Path | None  # set on the main process, which wrote the export; None on the others
    last_checkpoint: Path | None
    final_loss: float | None
    skipped_steps: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    stopped_early: str | None = None  # why training ended before train.max_steps (a time limit), or None


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run. ``Trainer(cfg).run(resume="auto")``; see the module docstring for the order."""

    def __init__(self, cfg: RunConfig, resume: str | None = None, overwrite: bool = False):
        self.cfg = cfg
        self.resume_arg = resume
        self.overwrite = overwrite  # move another run's checkpoints aside instead of refusing to start
        self.run_id: str | None = None  # this run's lineage id (new on a fresh start, kept on resume)
        self.lineage: set[str | None] = set()  # other ids whose checkpoints count as this run's (rotation)
        self.out = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        # Built by setup() (a subclass or a test may set up without running):
        self.accelerator: Accelerator | None = None
        self.rank, self.world = 0, 1
        self.device = torch.device("cpu")
        self.dist: ckpt.Distributed | None = None
        self.micro_batch = 0
        self.dataset: Any = None
        self.model_cfg: ModelConfig | None = None
        self.objective: Any = None
        self.preview: Preview | None = None  # sample grids, the budget's cost probe, the demo report
        self.ema: EMA | None = None
        self.fsdp = cfg.train.distributed == "fsdp"
        self.optimizer_impl: str | None = None
        self.host_memory: str | None = None  # what train.retain_host_memory did (CPU runs)
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.stream: BatchStream | None = None
        self.noise: torch.Generator | None = None  # this process's diffusion noise
        self.model: torch.nn.Module | None = None  # as prepared by Accelerate (DDP / compiled)
        self.optimizer: torch.optim.Optimizer | None = None
        self.raw_model: DiT | None = None
        self.routing: RoutingStats | None = None  # MoE models: routing statistics per layer x timestep
        self.resumed_from: Path | None = None
        # The run's progress (checkpointed, or restored on resume):
        self.step = 0
        self.skipped = 0
        self.consecutive_skips = 0
        self.last_checkpoint: Path | None = None
        # Built by run():
        self.metrics: JsonlWriter | None = None
        self.rank_log: JsonlWriter | None = None
        self.budget: RunBudget | None = None
        self.stopped_early: str | None = None  # why training ended before train.max_steps, or None

    # ------------------------------------------------------------------ setup

    def log(self, message: str) -> None:
        """A message from the main process, on stderr (tqdm-safe)."""
        if self.accelerator.is_main_process:
            say(PROG, message)

    def setup(self) -> None:
        cfg, tc = self.cfg, self.cfg.train
        trackers = [t for t in self.cfg.log.trackers if t]
        for t in trackers:
            if t not in ("tensorboard", "wandb"):
                raise ConfigError(f"log.trackers: unknown tracker {t!r}; use tensorboard and/or wandb")
        if not launched():
            # Accelerate's state is a process-wide singleton: let one process run several trainers in turn
            # (tests, ablation sweeps) with different precision settings.
            AcceleratorState._reset_state()
        # Accelerate only forms a CPU process group (gloo) under torchrun when told cpu=True.
        cpu_ddp = not torch.cuda.is_available() and launched()
        self.accelerator = Accelerator(
            cpu=cpu_ddp,
            mixed_precision=tc.mixed_precision,
            log_with=trackers or None,
            project_dir=str(self.out / "logs"),
            # static_graph: the PLR target heads get their gradient from a loss computed outside the
            # model's output (DDP would otherwise mark them unused in forward, then ready again in backward),
            # and gradient checkpointing re-enters blocks; the set of parameters used is the same every step.
            kwargs_handlers=[DistributedDataParallelKwargs(static_graph=True)],
        )
        acc = self.accelerator
        if acc.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise ConfigError(
                f"the trainer does not support {acc.distributed_type.name} through Accelerate's plugins: it shards "
                "with torch FSDP2 itself when the run config says train.distributed=fsdp. Launch with "
                "configs/accelerate/fsdp.yaml (or multi_gpu.yaml) and set train.distributed=fsdp"
            )
        self.rank, self.world = acc.process_index, acc.num_processes
        self.device = acc.device
        if tc.num_threads is not None:
            torch.set_num_threads(tc.num_threads)
        if tc.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # 1. checks that fail before any step
        if acc.is_main_process:
            check_output_dir(self.out)
        acc.wait_for_everyone()
        self.dist = ckpt.Distributed(acc.process_index, acc.num_processes, acc.wait_for_everyone)
        if self.resume_arg in FRESH_START:  # a fresh start: the folder must not hold a run
            resuming.claim_output(
                self.out, self.ckpt_dir, resumed=None, overwrite=self.overwrite, log=self.log, dist=self.dist
            )
        per_step = tc.global_batch_size // self.world
        if tc.global_batch_size % (self.world * tc.grad_accum):
            raise ConfigError(
                f"train.global_batch_size {tc.global_batch_size} is not divisible by processes x grad_accum "
                f"= {self.world} x {tc.grad_accum}"
            )
        self.micro_batch = per_step // tc.grad_accum

        self.dataset = build_dataset(cfg.data, split="train")
        self.model_cfg = resolve_run_model(cfg.model, self.dataset, cfg.diffusion.objective)
        self.objective = build_objective(cfg.diffusion, learn_sigma=self.model_cfg.learn_sigma)
        self.preview = Preview(
            cfg.sample, self.objective, self.dataset, self.model_cfg.num_classes, self.device
        )

        # 2. model, EMA, optimizer, schedule, data (same init on every process)
        torch.manual_seed(tc.seed)
        model = DiT(**model_kwargs(self.model_cfg)).to(self.device)
        if tc.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.ema = EMA(model, tc.ema_decay, warmup=tc.ema_warmup)
        if self.fsdp:  # shard model and EMA (FSDP2 per block) before the optimizer sees the parameters
            reason = sharded.check_config(tc.mixed_precision)
            if reason:
                raise ConfigError(reason)
            sharded.shard(model, self.device, tc.fsdp_reshard_after_forward)
            sharded.shard(self.ema.model, self.device)
        self.host_memory = (
            retain_freed_memory() if tc.retain_host_memory and self.device.type == "cpu" else None
        )
        optimizer, self.optimizer_impl = build_adamw(
            model.optimizer_param_groups(tc.weight_decay),
            lr=tc.lr,
            betas=(tc.adam_beta1, tc.adam_beta2),
            eps=tc.adam_eps,
            impl=tc.optimizer_impl,
            device=self.device,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_lambda(s, tc.warmup_steps, tc.max_steps, tc.lr_schedule, tc.min_lr_ratio),
        )
        self.stream = BatchStream(
            self.dataset,
            self.micro_batch,
            seed=tc.seed,
            rank=self.rank,
            world_size=self.world,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        # Per-process randomness: label dropout (global RNG) and diffusion noise (private generator).
        torch.manual_seed(tc.seed + self.rank)
        np.random.seed(tc.seed + self.rank)  # noqa: NPY002 (seed the legacy global RNG others use)
        random.seed(tc.seed + self.rank)
        self.noise = torch.Generator(device=self.device).manual_seed(tc.seed + self.rank)

        # 3. resume (before Accelerate wraps anything)
        self.resumed_from = self.resume(model, optimizer)
        self.last_checkpoint = self.resumed_from

        if self.fsdp:
            sharded.autocast_forward(model, tc.mixed_precision, self.device)
        if tc.compile:
            model = torch.compile(model)
        if self.fsdp:  # already sharded: Accelerate must not wrap it in DDP
            self.model, self.optimizer = model, optimizer
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        raw = acc.unwrap_model(self.model)
        self.raw_model: DiT = getattr(raw, "_orig_mod", raw)  # the DiT itself, under torch.compile too
        if self.raw_model.arch.moe is not None:
            dc = cfg.diffusion  # the model's time axis: DDPM steps, or flow time x time_scale
            span = dc.num_timesteps if dc.objective == "ddpm" else dc.time_scale
            self.routing = RoutingStats(num_timesteps=int(span))
        counts = self.raw_model.param_counts()
        self.log(
            f"model: {model_name(self.model_cfg)} ({counts['block_params_total'] / 1e6:.2f}M block params, "
            f"{counts['block_params_activated'] / 1e6:.2f}M activated), {self.objective.describe()}, "
            f"{len(self.dataset)} training samples of shape {tuple(self.dataset.sample_shape)}, "
            f"{self.world} process(es) x {self.micro_batch} x {tc.grad_accum} accumulation = "
            f"{tc.global_batch_size} per step, AdamW {self.optimizer_impl} (train.optimizer_impl={tc.optimizer_impl})"
        )
        if self.host_memory:
            self.log(f"{self.host_memory} (train.retain_host_memory=true)")

    def resume(self, model: DiT, optimizer: torch.optim.Optimizer) -> Path | None:
        """Restore everything from the chosen checkpoint (rules: ``racedit/training/resume.py``)."""
        configured = resuming.optimizer_hyperparameters(optimizer)  # this run's, before any load

        def try_load(path: Path) -> tuple[ckpt.LoadedCheckpoint, list[str]]:
            if sharded.is_sharded(path) != self.fsdp:
                written = "fsdp" if sharded.is_sharded(path) else "ddp"
                raise ResumeError(
                    f"{path} was written with train.distributed={written}; resume it with "
                    f"train.distributed={written}"
                )
            loaded = ckpt.read_checkpoint(path, self.rank)
            changes = resuming.check_settings(
                path, yaml.safe_load(loaded.config_yaml), to_dict(self.cfg), to_dict(self.model_cfg)
            )
            if not self.fsdp:  # a sharded checkpoint's tensors are checked by DCP when they load
                resuming.check_loadable(loaded, model, optimizer)
            return loaded, changes

        arg = self.resume_arg
        found = None
        if arg == "auto":
            found = resuming.find_checkpoint(self.ckpt_dir, try_load, self.log, self.dist)
        elif arg not in FRESH_START:
            found = resuming.load_explicit(Path(arg), try_load)
        if arg not in FRESH_START:  # (a fresh start claimed the folder in setup)
            resuming.claim_output(
                self.out,
                self.ckpt_dir,
                resumed=found.path if found else None,
                overwrite=self.overwrite,
                log=self.log,
                dist=self.dist,
            )
        if found is None:
            self.run_id = resuming.shared_run_id(self.dist)
            return None
        loaded, path = found.loaded, found.path
        if self.fsdp:  # DCP reshards: the checkpoint may come from any number of processes
            sharded.load(path, model, optimizer, self.ema.model)
        else:
            model.load_state_dict(loaded.model, strict=True)
            self.ema.load_state_dict(loaded.ema)
            optimizer.load_state_dict(loaded.optimizer)
        keep_impl(optimizer, self.optimizer_impl)
        self.scheduler.load_state_dict(loaded.scheduler)
        resuming.reapply_hyperparameters(optimizer, self.scheduler, configured)
        state = loaded.state
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.stream.load_state_dict(state["data"])
        self.run_id = state.get("run_id") or resuming.shared_run_id(self.dist)
        if "run_id" not in state:  # written before run ids: the run continues that checkpoint's lineage
            self.lineage = {None}
        if loaded.rng is not None and int(state.get("world_size", 1)) == self.world:
            ckpt.set_rng_state(loaded.rng, self.noise)
        else:
            self.log(
                f"checkpoint was written by {state.get('world_size')} process(es), this run has {self.world}: "
                "RNG streams restart from the seed (the run continues, but not bitwise as it would have)"
            )
        for change in found.changes:
            self.log(f"changed on resume: {change}")
        self.log(f"resumed from {path} at step {self.step}")
        return path

    # ------------------------------------------------------------------ one step

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch: diffusion loss + the MoE auxiliary terms (weights from the MoE config)."""
        aux = ForwardAux() if self.raw_model.arch.moe is not None else None
        out = self.objective.training_loss(self.model, x, y, aux=aux, generator=self.noise)
        terms = {"loss_diffusion": out.loss.detach(), **{k: v.detach() for k, v in out.terms.items()}}
        total = out.loss
        if aux is not None:
            aux_terms = aux_losses(aux, self.raw_model.patchify(out.target), self.raw_model.arch.moe)
            for name, value in aux_terms.items():
                total = total + value
                terms[f"loss_{name}"] = value.detach()
            if self.routing is not None:  # before backward: checkpointed recomputation appends records again
                self.routing.update(ForwardAux(t=aux.t, layers=list(aux.layers)))
        return total, terms

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step; returns the scalars averaged over processes (None when skipped)."""
        tc = self.cfg.train
        acc = self.accelerator
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        for micro in range(tc.grad_accum):
            x, y = next(self.stream)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro == tc.grad_accum - 1
            # DDP all-reduces every micro-batch's gradient: torch's reducer asserts
            # (expect_autograd_hooks_) when no_sync is used with the static graph this trainer needs (see
            # __init__). Exact, since the accumulated part is already equal on every process; it costs
            # grad_accum x the gradient communication. FSDP skips the reduction until the last micro-batch.
            sync = contextlib.nullcontext()
            if self.fsdp:
                sync = sharded.gradient_sync(self.raw_model, enabled=last)
            with sync:
                loss, terms = self.compute_loss(x, y)
                acc.backward(loss / tc.grad_accum)
            terms = {"loss": loss.detach(), **terms}
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.float() / tc.grad_accum
        names = sorted(sums)
        local = torch.stack([sums[k] for k in names])  # (T,) this process's means
        gathered = acc.gather(local[None])  # (world, T)
        scalars = dict(zip(names, gathered.mean(0).tolist()))
        if self.cfg.log.per_rank:
            self.rank_log.write(
                {"step": self.step + 1, "rank": self.rank, **dict(zip(names, local.tolist()))}
            )
        # The global gradient norm (after DDP's all-reduce): the same on every process.
        clip = tc.max_grad_norm if tc.max_grad_norm is not None else float("inf")
        if self.fsdp:
            grad_norm = sharded.clip_grad_norm_(self.model.parameters(), clip)
        else:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), clip)
        scalars["grad_norm"] = float(grad_norm)
        # fp16: an inf gradient norm is the loss scaler's overflow signal (it skips that step itself).
        grad_ok = math.isfinite(scalars["grad_norm"]) or tc.mixed_precision == "fp16"
        if not (math.isfinite(scalars["loss"]) and grad_ok):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss = {scalars['loss']}, gradient norm = {scalars['grad_norm']}"
            if tc.nonfinite == "stop":
                last = ckpt.list_checkpoints(self.ckpt_dir)
                raise NonFiniteLossError(
                    f"non-finite training step {self.step + 1} ({what}; terms "
                    f"{ {k: v for k, v in scalars.items() if k.startswith('loss_')} }). Training stopped before "
                    f"applying it; the last good checkpoint is {last[0] if last else 'none (none was written yet)'}. "
                    "Lower train.lr, set train.max_grad_norm, or set train.nonfinite=skip to skip such steps"
                )
            self.skipped += 1
            self.consecutive_skips += 1
            self.log(f"step {self.step + 1}: {what}; skipped ({self.skipped} so far)")
            if self.consecutive_skips > tc.max_skipped:
                raise NonFiniteLossError(
                    f"{self.consecutive_skips} non-finite steps in a row (train.max_skipped = {tc.max_skipped}); "
                    "the run has diverged. Lower train.lr or set train.max_grad_norm"
                )
            self.scheduler.step()
            self.step += 1
            return None
        self.consecutive_skips = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.raw_model, self.step)
        self.step += 1
        scalars["lr"] = self.scheduler.get_last_lr()[0]
        return scalars

    # ------------------------------------------------------------------ periodic work

    def save(self) -> Path:
        acc = self.accelerator
        optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        config_yaml = yaml.safe_dump(
            {"run": to_dict(self.cfg), "model_resolved": to_dict(self.model_cfg)}, sort_keys=False
        )
        write_shards = None
        if self.fsdp:

            def write_shards(tmp: Path) -> None:
                sharded.save(tmp, self.raw_model, optimizer, self.ema.model)

        path = ckpt.save_checkpoint(
            self.ckpt_dir,
            self.step,
            model=self.raw_model,
            ema_model=self.ema.model,
            optimizer_state={} if self.fsdp else optimizer.state_dict(),
            sharded=write_shards,
            scheduler_state=self.scheduler.state_dict(),
            rng=ckpt.rng_state(self.noise),
            state={"data": self.stream.state_dict(), "skipped": self.skipped, "time": time.time()},
            config_yaml=config_yaml,
            keep_last=self.cfg.train.keep_last,
            dist=ckpt.Distributed(acc.process_index, acc.num_processes, acc.wait_for_everyone),
            run_id=self.run_id,
            lineage=self.lineage,
        )
        self.last_checkpoint = path
        return path

    def write_grid(self, name: str) -> Path | None:
        """A labelled grid ``samples/<name>.png`` from the EMA model, written by the main process; None when
        the VAE is unavailable. Every process calls it: under FSDP all sample the same grid in lockstep from
        the sharded EMA model (one unit's full weights at a time, ``sharded.lockstep``)."""
        main = self.accelerator.is_main_process
        path = self.out / "samples" / f"{name}.png"
        if not self.fsdp:
            return self.preview.write_grid(self.ema.model, path, log=self.log) if main else None
        with sharded.lockstep(self.ema.model) as model:
            return self.preview.write_grid(model, path, log=self.log, write=main)

    def log_routing(self) -> dict[str, float]:
        if self.routing is None or not self.routing.layers:
            return {}
        scalars = self.routing.compute()
        if self.accelerator.is_main_process:
            self.routing.save_heatmap(
                self.out / "routing" / f"heatmap_{self.step:08d}.png",
                title=f"experts per token, layer x timestep (step {self.step})",
            )
        self.routing.reset()
        return {k: v for k, v in scalars.items() if "/layer" not in k}

    # ------------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        self.setup()
        cfg, tc, lc = self.cfg, self.cfg.train, self.cfg.log
        acc = self.accelerator
        main = acc.is_main_process
        metrics_path = self.out / "logs" / "metrics.jsonl"
        if main and self.step == 0 and metrics_path.exists():
            metrics_path.unlink()
        elif main:
            trim_after(metrics_path, self.step)
        self.metrics = JsonlWriter(metrics_path, enabled=main)
        self.rank_log = JsonlWriter(self.out / "logs" / f"rank{self.rank}.jsonl", enabled=lc.per_rank)
        if lc.trackers:
            acc.init_trackers(lc.project, config=flat_hparams(to_dict(cfg)))
        window = ScalarWindow()
        bar = progress_bar(
            total=tc.max_steps,
            initial=self.step,
            disable=not (main and lc.progress),
            desc="train",
            dynamic_ncols=True,
        )
        self.budget = self.make_budget()
        t_window, steps_window = time.perf_counter(), 0
        last_scalars: dict[str, float] = {}
        self.budget.start_training()
        try:
            while self.step < tc.max_steps:
                if self.budget.active and (reason := self.budget_stop()) is not None:
                    self.log(f"training stopped at step {self.step} of {tc.max_steps}: {reason}")
                    self.stopped_early = reason
                    break
                scalars = self.train_step()
                bar.update(1)
                if scalars is not None:
                    window.add(scalars)
                    steps_window += 1
                step = self.step
                if step % lc.every == 0 or step == tc.max_steps:
                    logged = window.pop()
                    elapsed = time.perf_counter() - t_window
                    logged["images_per_s"] = steps_window * tc.global_batch_size / max(elapsed, 1e-9)
                    logged["skipped_steps"] = self.skipped
                    if self.routing is not None and (
                        step % lc.moe_metrics_every == 0 or step == tc.max_steps
                    ):
                        logged.update(self.log_routing())
                    acc.log(logged, step=step)
                    self.metrics.write({"step": step, **logged})
                    if "loss" in logged:
                        # refresh=False: the bar redraws on its own schedule (rarely off a terminal)
                        bar.set_postfix(
                            loss=f"{logged['loss']:.4f}", img_s=f"{logged['images_per_s']:.0f}", refresh=False
                        )
                    last_scalars = logged
                    t_window, steps_window = time.perf_counter(), 0
                if cfg.sample.every and step % cfg.sample.every == 0 and step < tc.max_steps:
                    self.write_grid(f"step_{step:08d}")
                if step % tc.checkpoint_every == 0 and step < tc.max_steps:
                    self.save()
                self.budget.step_done()
            bar.close()
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(
                ckpt.checkpoint_name(self.step)
            ):
                self.save()
            result = self.finish(last_scalars)
        finally:
            bar.close()
            for tracker in acc.trackers:  # not acc.end_training(): the caller owns the process group
                tracker.finish()
        return result

    def make_budget(self) -> RunBudget:
        """The run's time limits; with ``train.time_budget_minutes`` the main process measures what the
        final sampling will cost (``racedit.training.budget``) before the first step (FSDP: every process
        samples the probe in lockstep with it, the sharded EMA model's forward being a collective)."""
        tc, sc = self.cfg.train, self.cfg.sample
        main = self.accelerator.is_main_process
        budget = RunBudget(tc.time_budget_minutes, tc.time_limit_minutes)
        if budget.deadline is None or not (main or self.fsdp):
            return budget
        num_classes = self.model_cfg.num_classes
        counts = [
            len(self.preview.grid_labels()) if sc.final_grid else 0,
            sc.report_per_class * num_classes,  # the demo report (Trainer.finish)
        ]
        batches = sampling_batches(counts, sc.batch_size)
        labels = [i % num_classes for i in range(min(sc.batch_size, max(counts)))]
        seconds = 0.0
        if batches:
            together = (
                sharded.lockstep(self.ema.model) if self.fsdp else contextlib.nullcontext(self.ema.model)
            )
            try:
                with together as model:
                    seconds = time_sampling_batch(
                        lambda k: self.preview.images(model, labels, sc.seed, steps=k), sc.steps
                    )
            except VAEError:  # latents without the VAE: the final grid is skipped too
                batches = 0
        if not main:  # (FSDP) this process took part in the main process's probe
            return budget
        budget.tail = Tail(sampling_batches=batches, seconds_per_batch=seconds)
        self.log(
            f"train.time_budget_minutes = {tc.time_budget_minutes:g}: {budget.elapsed():.0f} s used by start-up; "
            f"after training, {batches:.1f} sampling batches at {seconds:.1f} s each (measured) + "
            f"{budget.tail.fixed_seconds:.0f} s for export and report, kept with a margin"
        )
        return budget

    def budget_stop(self) -> str | None:
        """The main process's decision, taken by every process so that all stop at the same step."""
        reason = self.budget.stop_reason()
        flag = torch.tensor([float(reason is not None)], device=self.device)
        if self.accelerator.reduce(flag, "max").item() > 0:
            return reason or "the main process ran out of time"
        return None

    def finish(self, last_scalars: dict[str, float]) -> TrainResult:
        """Export the EMA model (+ sampling.json), the final grid, the loss curve and the demo report."""
        acc = self.accelerator
        export_dir, report = None, {}
        sc = self.cfg.sample
        if self.fsdp:  # streamed one tensor at a time
            from racedit.training.sharded import save_full

            export_dir = save_full(
                self.ema.model, lambda: DiT(**model_kwargs(self.model_cfg)), self.out / "final"
            )
        if acc.is_main_process:
            if self.fsdp:  # the weights are written: add sampling.json and the manifest
                export_dir = finish_export(export_dir, self.dataset, self.cfg.diffusion, self.model_cfg)
            else:
                export_dir = export_model(
                    self.ema.model, self.out / "final", self.dataset, self.cfg.diffusion, self.model_cfg
                )
            self.log(f"exported the EMA model to {export_dir} (racedit-sample / sample.py reads it)")
        grid = self.write_grid("final") if sc.final_grid else None  # every process (FSDP: in lockstep)
        if acc.is_main_process:
            if grid is not None:
                self.log(f"sample grid: {grid}")
            if self.cfg.log.loss_curve:
                curve = plot_loss_curve(
                    read_jsonl(self.out / "logs" / "metrics.jsonl"), self.out / "logs" / "loss.png"
                )
                if curve is not None:
                    self.log(f"loss curve: {curve}")
        if sc.report_per_class > 0:
            report = self.report()
        acc.wait_for_everyone()
        return TrainResult(
            step=self.step,
            output_dir=self.out,
            export_dir=export_dir if acc.is_main_process else None,
            last_checkpoint=self.last_checkpoint,
            final_loss=last_scalars.get("loss"),
            skipped_steps=self.skipped,
            report=report,
            stopped_early=self.stopped_early,
        )

    def report(self) -> dict[str, Any]:
        """The demo report from the EMA model, written by the main process ({} on the others). Every process
        calls it: under FSDP the others sample in lockstep whatever the report asks (``sharded.sampled_by_main``),
        so the full model is never gathered."""
        sc = self.cfg.sample

        def write(sample_fn: Any) -> dict[str, Any]:
            return demo_report(
                self.cfg.data,
                sample_fn,
                per_class=sc.report_per_class,
                seed=sc.seed + 10_000,
                out_dir=self.out / "report",
                log=self.log,
                training=self.training_summary(),
            )

        if not self.fsdp:
            if not self.accelerator.is_main_process:
                return {}
            return write(lambda labels, seed: self.preview.images(self.ema.model, labels, seed))
        with sharded.sampled_by_main(self.ema.model, self.preview.images, self.device) as sample_fn:
            return write(sample_fn) if sample_fn is not None else {}

    def training_summary(self) -> dict[str, Any]:
        """How the training went, for the demo report: steps done and why it stopped."""
        tc = self.cfg.train
        return {
            "steps": self.step,
            "max_steps": tc.max_steps,
            "stopped_early": self.stopped_early,
            "time_budget_minutes": tc.time_budget_minutes,
            "process_started_at": self.budget.start,
        }


def train(cfg: RunConfig, resume: str | None = None, overwrite: bool = False) -> TrainResult:
    """Run ``cfg`` (optionally resuming: "auto", a checkpoint directory, or None); ``overwrite`` moves
    another run's checkpoints in ``train.output_dir`` aside instead of refusing to start."""
    return Trainer(cfg, resume, overwrite).run()
