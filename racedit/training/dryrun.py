"""``train_imagenet.py --dry-run``: everything a multi-day launch needs, checked in minutes on one machine.

Run the launch command with ``--dry-run`` (same config, same overrides). It prints what it checked and
a list of every problem a real run would fail on; exit code 0 only when that list is empty (else 2).
In order:

1. the resolved config, printed; the output directory writable; the batch divisible by processes x
   accumulation; the trackers importable; an existing run in ``train.output_dir`` vs ``--resume``;
2. the data: opened, one batch of the run's micro-batch read with the run's DataLoader workers, its
   shapes, dtype, finiteness and label range checked against the model the run builds;
3. the model: built (or, when its training state would not fit this machine, built on the meta device
   for the counts only, with the steps below run on a copy of ``max(2, moe.every)`` blocks at the same
   width, so the copy holds at least one MoE block);
4. two optimizer steps through the real trainer (``racedit.training.loop.Trainer``) with the run's
   precision, accumulation and loss terms, a checkpoint, the export, then a second trainer resumed from
   that checkpoint whose model, EMA, optimizer, scheduler, step and data position must equal the first;
5. one sample grid decoded through the configured VAE (a few sampler steps: it checks the decode path,
   not quality); a VAE that is not available locally is a problem, and the grid is skipped;
6. per-GPU memory of the model state under DDP and FSDP at the launch's world size, the measured step
   time, and the problems.

Everything is written into a temporary directory that is removed at the end; ``train.output_dir`` is
never created or touched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from racedit.config.core import ConfigError, to_dict
from racedit.training.config import RunConfig
from racedit.training.loop import Trainer

STATE_BYTES_PER_PARAM = {"params": 4, "grads": 4, "AdamW moments": 8, "EMA": 4}  # fp32 each
FIT_FRACTION = 1 / 3  # the full model is trained here when its state takes at most this share of memory
GRID_SAMPLER_STEPS = 2  # the dry run's grid checks the decode path, not sample quality
MAX_STEP_BATCH = 4  # samples per micro-batch in the dry run's steps (the run's own size if smaller)
LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")  # fmt: skip


@dataclass
class DryRunReport:
    """What the dry run found; ``problems`` is what a real run would fail on (exit 0 iff empty)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    world_size: int = 1
    params_total: int | None = None
    params_trainable: int | None = None
    full_model_run: bool | None = None  # False: steps ran on the reduced-depth copy
    step_times: list[float] = field(default_factory=list)
    checkpoint_ok: bool | None = None
    grid: Path | None = None
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # mode -> part -> bytes per GPU


def _gib(n: float) -> str:
    """Bytes in GiB (MiB below 1 GiB, so small models do not print as 0.00)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def available_memory() -> tuple[int, str]:
    """Bytes this machine can give the dry run, and where: the first GPU's free memory, else RAM."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free), f"GPU 0 ({torch.cuda.get_device_name(0)}) free memory"
    import psutil

    return int(psutil.virtual_memory().available), "available RAM"


def state_memory(params_total: int, params_trainable: int, world_size: int) -> dict[str, dict[str, int]]:
    """Per-GPU bytes of the model state: fp32 parameters, gradients, AdamW's two moments and the fp32 EMA.

    DDP keeps all of it on every GPU; FSDP shards each part over the ``world_size`` processes (its
    EMA is kept sharded too). Activations, DDP's gradient buckets and the CUDA context come on top."""
    parts = {
        "params": params_total * STATE_BYTES_PER_PARAM["params"],
        "grads": params_trainable * STATE_BYTES_PER_PARAM["grads"],
        "AdamW moments": params_trainable * STATE_BYTES_PER_PARAM["AdamW moments"],
        "EMA": params_total * STATE_BYTES_PER_PARAM["EMA"],
    }
    ddp = dict(parts, total=sum(parts.values()))
    sharded = {k: math.ceil(v / world_size) for k, v in parts.items()}
    fsdp = dict(sharded, total=sum(sharded.values()))
    return {"DDP": ddp, "FSDP": fsdp}


def memory_table(memory: dict[str, dict[str, int]], world_size: int) -> str:
    cols = ["params", "grads", "AdamW moments", "EMA", "total"]
    lines = [
        f"| per GPU, world size {world_size} | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for mode, parts in memory.items():
        lines.append(f"| {mode} | " + " | ".join(_gib(parts[c]) for c in cols) + " |")
    return "\n".join(lines)


def _writable_location(path: Path) -> str | None:
    """None when ``path`` exists as a writable directory or could be created; else the reason."""
    path = path.expanduser().resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


@contextlib.contextmanager
def _single_process_env():
    """Hide a launcher's variables so the in-process trainer runs as one plain process."""
    saved = {k: os.environ.pop(k) for k in LAUNCHER_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class DryRun:
    """One dry run of a run config; ``DryRun(cfg, ...).run()`` prints as it goes and returns the report."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume: str | None = None,
        overwrite: bool = False,
        world_size: int | None = None,
        config_path: str | None = None,
        stream: Any = None,
    ):
        self.cfg = cfg
        self.resume_arg = resume
        self.overwrite = overwrite
        self.config_path = config_path
        self.out = stream or sys.stdout
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        self.world_source = (
            "--world-size"
            if world_size
            else "this launch"
            if env_world > 1
            else "default; pass --world-size N"
        )
        self.report = DryRunReport(world_size=world_size or env_world)
        self.resume_path: Path | None = None
        self.vae_missing = False
        self.dataset: Any = None
        self.model_cfg: Any = None

    # ------------------------------------------------------------------ reporting

    def say(self, message: str = "") -> None:
        print(message, file=self.out, flush=True)

    def section(self, title: str) -> None:
        self.say(f"\n== {title} ==")

    def problem(self, message: str) -> None:
        self.report.problems.append(" ".join(message.split()))
        self.say(f"PROBLEM: {self.report.problems[-1]}")

    def warn(self, message: str) -> None:
        self.report.warnings.append(message)
        self.say(f"warning: {message}")

    # ------------------------------------------------------------------ the checks

    def check_config(self) -> None:
        cfg, tc, world = self.cfg, self.cfg.train, self.report.world_size
        self.section(f"resolved config ({self.config_path or 'defaults'})")
        self.say(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        self.section("launch")
        self.say(
            f"world size {world} ({self.world_source}), "
            f"global batch {tc.global_batch_size} = {world} process(es) x "
            f"{tc.global_batch_size // max(1, world * tc.grad_accum)} x {tc.grad_accum} accumulation"
        )
        if tc.global_batch_size % (world * tc.grad_accum):
            self.problem(
                f"train.global_batch_size {tc.global_batch_size} is not divisible by processes x grad_accum "
                f"= {world} x {tc.grad_accum}: set train.global_batch_size to a multiple of "
                f"{world * tc.grad_accum}"
            )
        reason = _writable_location(Path(tc.output_dir))
        if reason:
            self.problem(
                f"train.output_dir {tc.output_dir!r}: {reason}; choose another with train.output_dir=PATH"
            )
        for tracker in cfg.log.trackers:
            module = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}.get(tracker)
            if module is None:
                self.problem(f"log.trackers: unknown tracker {tracker!r}; use tensorboard and/or wandb")
                continue
            try:
                __import__(module)
            except Exception as err:  # noqa: BLE001 (any import failure means the tracker cannot start)
                self.problem(f"log.trackers: {tracker} cannot be imported ({type(err).__name__}: {err})")
        self.check_existing_run()

    def check_existing_run(self) -> None:
        """What the trainer's resume rules (racedit/training/resume.py) would decide, without moving a file."""
        from racedit.training import checkpoint as ckpt

        out = Path(self.cfg.train.output_dir)
        ckpt_dir = out / "checkpoints"
        found, corrupt = ckpt.list_checkpoints(ckpt_dir), ckpt.corrupt_checkpoints(ckpt_dir)
        arg = self.resume_arg
        below: Path | None = None  # the checkpoint the run would continue
        if arg == "auto":
            for path in found:
                try:
                    ckpt.verify(path)
                except ckpt.CheckpointCorrupt as err:
                    self.warn(
                        f"--resume auto would skip {path.name} ({err}) and keep it as corrupt-{path.name}"
                    )
                    continue
                below = path
                break
            self.say(
                f"--resume auto: {'continues ' + str(below) if below else 'no valid checkpoint, fresh start'}"
            )
        elif arg not in (None, "", "none", "never"):
            below = Path(arg)
            try:
                if not below.is_dir():
                    raise ckpt.CheckpointCorrupt(f"{below} is not a checkpoint directory")
                ckpt.verify(below)
            except ckpt.CheckpointCorrupt as err:
                self.problem(f"--resume {arg}: {err}")
                return
        if below is None:
            in_the_way = found + corrupt
        else:
            step = ckpt.checkpoint_step(below) if below.name.startswith(ckpt.CHECKPOINT_PREFIX) else -1
            in_the_way = [p for p in found if ckpt.checkpoint_step(p) > step and p != below]
        if in_the_way and self.overwrite:
            self.say(f"--overwrite: the run would move {len(in_the_way)} checkpoint(s) to {out}/old-<time>/")
        elif in_the_way:
            what = "starts fresh" if below is None else f"continues {below.name} below newer ones"
            self.problem(
                f"{ckpt_dir} holds {len(in_the_way)} checkpoint(s) ({in_the_way[0].name} ...) and this run "
                f"{what}: the run would refuse. Continue the newest with --resume auto, or use another "
                "train.output_dir=PATH or --overwrite (moves them aside, deletes nothing)"
            )
        elif below is None:
            self.say(f"fresh start in {out}")
        self.resume_path = below

    def check_data(self) -> None:
        from racedit.data import build_dataset
        from racedit.training.loop import resolve_run_model

        cfg, tc, world = self.cfg, self.cfg.train, self.report.world_size
        self.section("data")
        try:
            self.dataset = build_dataset(cfg.data, split="train")
        except (ValueError, OSError) as err:
            self.problem(f"data ({cfg.data.kind}, data.root={cfg.data.root!r}): {err}")
            return
        ds = self.dataset
        shape = tuple(int(v) for v in ds.sample_shape)
        self.say(
            f"{ds!r}" if cfg.data.kind == "latents" else f"{cfg.data.kind}: {len(ds)} samples of {shape}"
        )
        if getattr(ds, "space", "pixel") == "latent":
            vae = (getattr(ds, "meta", {}) or {}).get("vae", "stabilityai/sd-vae-ft-ema")
            missing = vae_unavailable(vae)
            if missing:
                self.vae_missing = True
                self.problem(missing)
            else:
                self.say(f"VAE {vae!r}: available on this machine")
        micro = max(1, tc.global_batch_size // max(1, world * tc.grad_accum))
        if len(ds) < micro * world:
            self.problem(
                f"the dataset has {len(ds)} samples, fewer than one global micro-batch ({micro} x {world} "
                "processes): the run cannot form a batch. Point data.root at the full dataset, or lower "
                "train.global_batch_size"
            )
        try:
            self.model_cfg = resolve_run_model(cfg.model, ds, cfg.diffusion.objective)
        except (ConfigError, ValueError) as err:
            self.problem(f"model vs data: {err}")
        n_read = min(micro, len(ds))
        pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(tc.seed))[:n_read].tolist()
        loader = torch.utils.data.DataLoader(
            ds, batch_size=n_read, sampler=pick, num_workers=cfg.data.num_workers
        )
        t0 = time.perf_counter()
        try:
            x, y = next(iter(loader))
        except Exception as err:  # noqa: BLE001 (a dataset that cannot be read is exactly what we look for)
            self.problem(f"reading one batch of {n_read} failed: {type(err).__name__}: {err}")
            return
        y = torch.as_tensor(y)
        seconds = time.perf_counter() - t0
        self.say(
            f"one batch of {n_read} read in {seconds:.2f} s with {cfg.data.num_workers} worker(s): x {x.dtype} "
            f"{tuple(x.shape)} mean {x.float().mean():.3f} std {x.float().std():.3f}; labels {y.dtype} "
            f"{int(y.min())}..{int(y.max())} of {ds.num_classes} classes"
        )
        if tuple(x.shape[1:]) != shape:
            self.problem(f"the batch has samples of shape {tuple(x.shape[1:])}, the dataset declares {shape}")
        if x.dtype != torch.float32 or not torch.isfinite(x).all():
            self.problem(f"the batch is not finite float32 (dtype {x.dtype}); re-extract the latents")
        if y.dtype != torch.int64 or int(y.min()) < 0 or int(y.max()) >= ds.num_classes:
            self.problem(f"labels {int(y.min())}..{int(y.max())} are outside 0..{ds.num_classes - 1}")
        all_labels = getattr(ds, "labels", None)  # latents: every label, from the index
        if all_labels is not None and len(all_labels):
            lo, hi = int(all_labels.min()), int(all_labels.max())
            if lo < 0 or hi >= ds.num_classes:
                self.problem(f"the dataset's labels span {lo}..{hi}, outside its {ds.num_classes} classes")
            else:
                self.say(f"all {len(all_labels)} labels are in 0..{ds.num_classes - 1}")
        if not 0.2 <= float(x.float().std()) <= 5.0:
            self.warn(
                f"the batch's std is {float(x.float().std()):.3g}, far from 1: check the latents' scaling "
                "factor with `racedit-extract stats`"
            )
        mc = self.model_cfg
        if mc is not None and self.resume_path is not None:
            from racedit.training.resume import ResumeError, check_settings

            saved = yaml.safe_load((self.resume_path / "config.yaml").read_text()) or {}
            try:
                for change in check_settings(self.resume_path, saved, to_dict(cfg), to_dict(mc)):
                    self.say(f"changed on resume: {change}")
            except ResumeError as err:
                self.problem(str(err))
        if mc is not None:
            self.say(
                f"model input: ({mc.in_channels}, {mc.input_size}, {mc.input_size}), {mc.num_classes} classes "
                f"(+1 null class for guidance) -> matches the data"
            )
            bad = [c for c in cfg.sample.classes if not 0 <= c < mc.num_classes]
            if bad:
                self.problem(
                    f"sample.classes {bad} are not classes of this dataset (0..{mc.num_classes - 1}): the first "
                    "sample grid would stop the run. Set sample.classes=[...] to classes of the data"
                )

    def check_model(self) -> RunConfig | None:
        """Counts from the full model (meta device when it would not fit); returns the config the steps run."""
        from racedit.models import DiT
        from racedit.models.loading import model_kwargs

        self.section("model")
        mc = self.model_cfg
        try:
            with torch.device("meta"):
                meta_model = DiT(**model_kwargs(mc))
        except (ConfigError, ValueError, TypeError) as err:
            self.problem(f"the model cannot be built: {type(err).__name__}: {err}")
            return None
        counts = meta_model.param_counts()
        total = counts["params_total"]
        trainable = sum(p.numel() for p in meta_model.parameters() if p.requires_grad)
        del meta_model
        self.report.params_total, self.report.params_trainable = total, trainable
        name = self.cfg.model.name
        need = total * sum(STATE_BYTES_PER_PARAM.values())
        avail, where = available_memory()
        self.say(
            f"{name}: depth {mc.depth}, width {mc.hidden_size}, {total:,} parameters ({trainable:,} trained; "
            f"blocks {counts['block_params_total'] / 1e6:,.1f}M total, {counts['block_params_activated'] / 1e6:,.1f}M "
            f"activated); training state {_gib(need)}; {where}: {_gib(avail)}"
        )
        run_cfg = copy.deepcopy(self.cfg)
        if need <= FIT_FRACTION * avail:
            self.report.full_model_run = True
            self.say("the full model fits: the steps below run on it")
            return run_cfg
        depth = 2 if mc.moe is None else max(2, mc.moe.every)
        self.report.full_model_run = False
        section = self.cfg.model
        run_cfg.model = dataclasses.replace(section, config=dataclasses.replace(section.config, depth=depth))
        self.say(
            f"the training state does not fit in {FIT_FRACTION:.2f} of {where}: counted on the meta device; the "
            f"steps below run on a copy with {depth} blocks at width {mc.hidden_size} (same blocks, same loss "
            "terms; depth is the only change)"
        )
        return run_cfg

    def run_steps(self, run_cfg: RunConfig, tmp: Path) -> None:
        """Two optimizer steps, a checkpoint and the export through the real trainer; resume and compare."""
        from racedit.training.loop import NonFiniteLossError, ResumeError

        tc = run_cfg.train
        self.section("2 optimizer steps, checkpoint, export")
        micro_run = max(1, self.cfg.train.global_batch_size // (self.report.world_size * tc.grad_accum))
        micro = max(1, min(micro_run, MAX_STEP_BATCH, len(self.dataset) // tc.grad_accum or 1))
        tc.output_dir = str(tmp / "run")
        tc.global_batch_size = micro * tc.grad_accum
        tc.max_steps = 2
        tc.checkpoint_every = 2
        tc.keep_last = 1
        tc.time_limit_minutes = None
        run_cfg.sample.every = 0
        run_cfg.sample.final_grid = False  # the grid below, with a few sampler steps
        run_cfg.sample.report_per_class = 0
        run_cfg.sample.steps = GRID_SAMPLER_STEPS
        run_cfg.log.trackers = []
        run_cfg.log.progress = False
        run_cfg.log.every = 1
        run_cfg.log.moe_metrics_every = 2
        precision = tc.mixed_precision
        self.say(
            f"micro-batch {micro} (the run's: {micro_run}) x {tc.grad_accum} accumulation, precision {precision}, "
            f"objective {run_cfg.diffusion.objective}, gradient checkpointing {tc.gradient_checkpointing}, "
            f"compile {tc.compile}"
        )
        first = _TimedTrainer(run_cfg)
        try:
            with _single_process_env():
                result = first.run()
        except (ConfigError, NonFiniteLossError, ValueError, RuntimeError, OSError) as err:
            self.problem(f"the training steps failed: {type(err).__name__}: {err}")
            return
        self.report.step_times = list(first.step_times)
        terms = sorted(k for k in first.last_scalars if k.startswith("loss"))
        self.say(
            "losses: "
            + "; ".join(
                f"step {i + 1}: " + ", ".join(f"{k} {s[k]:.4g}" for k in terms if k in s)
                for i, s in enumerate(first.scalars)
            )
        )
        self.say(
            "step time: "
            + ", ".join(f"step {i + 1} {t:.2f} s" for i, t in enumerate(first.step_times))
            + " (the first includes warm-up)"
        )
        if first.skipped:
            self.problem(f"{first.skipped} of the 2 steps had a non-finite loss or gradient norm")
        ckpt_path = result.last_checkpoint
        size = sum(f.stat().st_size for f in Path(ckpt_path).rglob("*") if f.is_file())
        self.say(f"checkpoint {ckpt_path.name}: {_gib(size)}; export: {result.export_dir}")
        self.first = first

        second = Trainer(copy.deepcopy(run_cfg), resume=str(ckpt_path))
        try:
            with _single_process_env():
                second.setup()
        except (ResumeError, ConfigError, RuntimeError, OSError) as err:
            self.report.checkpoint_ok = False
            self.problem(
                f"the checkpoint written by the dry run does not resume: {type(err).__name__}: {err}"
            )
            return
        diffs = compare_trainers(first, second)
        self.report.checkpoint_ok = not diffs
        if diffs:
            self.problem("checkpoint round trip: the resumed trainer differs in " + "; ".join(diffs))
        else:
            self.say(
                "checkpoint round trip ok: a trainer resumed from it has the same model, EMA, optimizer, "
                "scheduler, step and data position (bitwise)"
            )
        try:
            from racedit.models.loading import load_model

            exported = load_model(result.export_dir)
            if not _same_state(exported.state_dict(), first.ema.model.state_dict()):
                self.problem(f"the exported model in {result.export_dir} differs from the EMA model")
        except Exception as err:  # noqa: BLE001 (any failure to load the export is a problem to list)
            self.problem(f"the exported model does not load: {type(err).__name__}: {err}")
        del second

    def sample_grid(self, tmp: Path) -> None:
        self.section("sample grid")
        first = getattr(self, "first", None)
        if first is None:
            self.say("skipped: no trained model (see the problems above)")
            return
        if self.vae_missing:
            self.say("skipped: the VAE is not available (see the problems above)")
            return
        n = self.model_cfg.num_classes
        labels = [c for c in self.cfg.sample.classes if 0 <= c < n] or list(range(min(8, n)))
        t0 = time.perf_counter()
        try:
            images = first.preview.images(first.ema.model, labels, self.cfg.sample.seed)
        except Exception as err:  # noqa: BLE001 (a decode failure is what this step looks for)
            self.problem(f"sampling a grid failed: {type(err).__name__}: {err}")
            return
        from racedit.sampling import save_grid

        path = save_grid(images, labels, first.preview.caption_names(), tmp / "grid.png")
        self.report.grid = path
        self.say(
            f"{len(labels)} samples ({GRID_SAMPLER_STEPS} {first.cfg.sample.sampler or 'default'} steps, cfg "
            f"{first.cfg.sample.cfg_scale}) decoded to {tuple(images.shape)} {images.dtype} in "
            f"{time.perf_counter() - t0:.1f} s; pixel std {images.float().std():.1f}"
        )

    def memory(self) -> None:
        self.section("model state memory per GPU")
        if self.report.params_total is None:
            self.say("skipped: the model could not be resolved (see the problems above)")
            return
        world = self.report.world_size
        self.report.memory = state_memory(self.report.params_total, self.report.params_trainable, world)
        self.say(memory_table(self.report.memory, world))
        self.say(
            "fp32 parameters, gradients, AdamW's two moments and the fp32 EMA; FSDP shards all four over the "
            "processes. Activations, DDP's gradient buckets (about the gradients' size) and the CUDA context "
            "come on top."
        )
        mode = str(getattr(self.cfg.train, "distributed", "ddp")).upper()
        if torch.cuda.is_available() and mode in self.report.memory:
            total = torch.cuda.get_device_properties(0).total_memory
            need = self.report.memory[mode]["total"]
            if need > total:
                self.problem(
                    f"under {mode} at world size {world} the model state alone needs {_gib(need)} per GPU, more "
                    f"than this GPU's {_gib(total)}: use more processes with train.distributed=fsdp"
                )
        if self.report.step_times:
            what = "the full model" if self.report.full_model_run else "the reduced-depth copy"
            self.say(f"measured step time ({what}, this machine): {self.report.step_times[-1]:.2f} s")

    def run(self) -> DryRunReport:
        self.check_config()
        self.check_data()
        run_cfg = self.check_model() if self.model_cfg is not None else None
        tmp = Path(tempfile.mkdtemp(prefix="racedit-dryrun-"))
        try:
            if run_cfg is not None and self.dataset is not None:
                self.run_steps(run_cfg, tmp)
                self.sample_grid(tmp)
            self.memory()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.section("result")
        if self.report.problems:
            self.say(f"{len(self.report.problems)} problem(s) a real run would fail on:")
            for i, p in enumerate(self.report.problems, 1):
                self.say(f"  {i}. {p}")
        else:
            self.say("no problems found: the real run should start (exit code 0)")
        return self.report


# ----------------------------------------------------------------------------- helpers


class _TimedTrainer(Trainer):
    """The real trainer, recording each step's wall time and scalars."""

    def __init__(self, cfg: RunConfig, resume: str | None = None):
        super().__init__(cfg, resume)
        self.step_times: list[float] = []
        self.scalars: list[dict[str, float]] = []
        self.last_scalars: dict[str, float] = {}

    def train_step(self):  # type: ignore[override]
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        scalars = super().train_step()
        sync()
        self.step_times.append(time.perf_counter() - t0)
        if scalars is not None:
            self.scalars.append(scalars)
            self.last_scalars = scalars
        return scalars


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    return all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _same_nested(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same_nested(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_nested(x, y) for x, y in zip(a, b))
    return a == b


def compare_trainers(first: Any, second: Any) -> list[str]:
    """Parts of the training state where a resumed trainer differs from the one that wrote the checkpoint."""
    diffs = []
    if not _same_state(first.raw_model.state_dict(), second.raw_model.state_dict()):
        diffs.append("model weights")
    if not _same_state(first.ema.state_dict(), second.ema.state_dict()):
        diffs.append("EMA weights")
    opt_a = getattr(first.optimizer, "optimizer", first.optimizer).state_dict()
    opt_b = getattr(second.optimizer, "optimizer", second.optimizer).state_dict()
    if not _same_nested(opt_a, opt_b):
        diffs.append("optimizer state")
    if first.scheduler.state_dict() != second.scheduler.state_dict():
        diffs.append("LR scheduler")
    if first.step != second.step:
        diffs.append(f"step ({first.step} vs {second.step})")
    if first.stream.state_dict() != second.stream.state_dict():
        diffs.append("data position")
    return diffs


def vae_unavailable(vae: str) -> str | None:
    """None when the VAE can be loaded from this machine (local folder or the Hugging Face cache), else why."""
    path = Path(vae).expanduser()
    if path.exists():
        return None if (path / "config.json").is_file() else f"VAE folder {vae!r} has no config.json"
    if vae.startswith((".", "/", "~")) or vae.count("/") != 1:
        return (
            f"the latents' meta.json names the VAE {vae!r}, which does not exist as seen from {os.getcwd()}: "
            "a real run could not decode its sample grids. Run from the directory it is relative to, or "
            "fix 'vae' in meta.json to an absolute path"
        )
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(vae, "config.json")
    if isinstance(found, str):
        return None
    return (
        f"the VAE {vae!r} is not available locally (not in the Hugging Face cache): the dry run skipped "
        "the decoded grid, and a real run would have to download it at its first sample grid. Download it "
        f"first: huggingface-cli download {vae} config.json diffusion_pytorch_model.safetensors"
    )


def dry_run(
    cfg: RunConfig,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    world_size: int | None = None,
    config_path: str | None = None,
) -> int:
    """Run the dry run of ``cfg`` on this machine; returns the exit code (0: no problems, 2: problems)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under a launcher one process checks for all
    if world_size is not None and world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    report = DryRun(
        cfg, resume=resume, overwrite=overwrite, world_size=world_size, config_path=config_path
    ).run()
    return 2 if report.problems else 0
