"""The configuration of a training run: one YAML file, six sections, every key overridable.

```yaml
model: {name: RaceDiT-B/2-2in8, moe: {router: token}}   # registry name + any ModelConfig key
diffusion: {objective: ddpm}                              # racedit.diffusion.DiffusionConfig
data: {kind: latents, root: data/imagenet256}             # racedit.data.DataConfig
train: {global_batch_size: 256, lr: 1.0e-4, max_steps: 400000}
sample: {every: 10000, classes: [207, 360, 387, 974, 88, 979, 417, 279]}
log: {every: 100, trackers: [tensorboard]}
```

``model`` is a ``racedit.models.registry.ModelSection``: the zoo name is a preset expanded once into a
typed ModelConfig when the file is read (explicit keys refine it; a key that contradicts the name is an
error naming both). ``input_size``, ``in_channels`` and ``num_classes`` default to the data's shape and
classes, ``learn_sigma`` to the objective's; the run binds them when it opens its dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from racedit.config.core import load_config
from racedit.data.config import DataConfig
from racedit.diffusion.config import DiffusionConfig
from racedit.models.registry import ModelSection


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"  # checkpoints/, logs/, samples/, final/ go under it
    seed: int = 0  # model init, data order, noise; process r uses seed + r for its noise
    max_steps: int = 400_000  # optimizer steps
    time_limit_minutes: float | None = None  # stop early (checkpoint + export) after this much training time
    # Whole-run wall-clock budget, from the process start to the written report: training stops early enough
    # to leave the measured cost of export, final sampling and the report (racedit/training/budget.py).
    time_budget_minutes: float | None = None
    global_batch_size: int = 256  # summed over processes and accumulation micro-steps
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    # --- optimizer (AdamW, parameter groups from DiT.optimizer_param_groups) -----------------
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # AdamW implementation: auto = the one measured fastest on the device (racedit/training/optim.py)
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    max_grad_norm: float | None = None  # gradient clipping (None = off, DiT's recipe)
    # --- schedule: linear warmup, then constant or cosine down to lr * min_lr_ratio ----------
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    # --- precision and memory ----------------------------------------------------------------
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    tf32: bool = True  # TF32 matmuls on Ampere+ GPUs (no effect on CPU)
    compile: bool = False  # torch.compile the training model
    num_threads: int | None = (
        None  # CPU threads for torch (None = torch's default); 1 is fastest on a busy CPU
    )
    gradient_checkpointing: bool = False  # recompute each block in the backward pass
    # on CPU, keep freed host memory in the process (glibc mallopt) so that each step does not page-fault its
    # activations back in (racedit/training/host_memory.py); no effect on GPU runs or without glibc
    retain_host_memory: bool = True
    # data parallelism under a multi-process launch: "ddp" replicates model, gradients, AdamW state and EMA;
    # "fsdp" shards all four over the processes (torch FSDP2 per DiT block, racedit/training/sharded.py)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # fsdp: true frees each block's full weights after its forward and all-gathers them again in backward (full
    # weights of one block at a time); false keeps them from forward to backward (no backward all-gathers, the
    # full weights of every block held during the step: parameter memory of DDP at the peak). The last block
    # is never resharded after forward (its backward comes next)
    fsdp_reshard_after_forward: bool = True
    # --- EMA of the weights (fp32) -----------------------------------------------------------
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay = min(ema_decay, (1 + step) / (10 + step)) (short runs)
    # --- checkpoints and faults --------------------------------------------------------------
    checkpoint_every: int = 10_000  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # checkpoints kept (older ones are deleted after a new one is complete)
    nonfinite: Literal["stop", "skip"] = "stop"  # NaN/inf loss: stop, or skip the update and go on
    max_skipped: int = 100  # with nonfinite=skip: stop after this many skipped steps in a row

    def __post_init__(self) -> None:
        _at_least("train.max_steps", self.max_steps, 1)
        _at_least("train.grad_accum", self.grad_accum, 1)
        _at_least("train.global_batch_size", self.global_batch_size, 1)
        _positive("train.lr", self.lr)
        _at_least("train.weight_decay", self.weight_decay, 0.0)
        _in_unit("train.adam_beta1", self.adam_beta1)
        _in_unit("train.adam_beta2", self.adam_beta2)
        _positive("train.adam_eps", self.adam_eps)
        if self.max_grad_norm is not None:
            _positive("train.max_grad_norm", self.max_grad_norm)
        for key in ("time_limit_minutes", "time_budget_minutes"):
            if getattr(self, key) is not None:
                _positive(f"train.{key}", getattr(self, key))
        _at_least("train.warmup_steps", self.warmup_steps, 0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.num_threads is not None:
            _at_least("train.num_threads", self.num_threads, 1)
        _in_unit("train.ema_decay", self.ema_decay)
        _at_least("train.keep_last", self.keep_last, 1)
        _at_least("train.checkpoint_every", self.checkpoint_every, 1)
        _at_least("train.max_skipped", self.max_skipped, 0)


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:  # also false for NaN
        raise ValueError(f"{key} must be >= {low}, got {value}")


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{key} must be a finite number > 0, got {value}")


def _in_unit(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{key} must be in [0, 1), got {value}")


@dataclass
class SampleConfig:
    """Sample grids during training (from the EMA model) and the final samples of the run."""

    every: int = 10_000  # steps between grids (0 = only at the end)
    classes: list[int] = field(default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279])
    per_class: int = 1  # grid columns: samples per class
    seed: int = 0  # fixed seeds, so grids of different steps are comparable
    sampler: str | None = None  # None = the objective's default sampler
    steps: int = 50
    cfg_scale: float = 1.0  # classifier-free guidance scale (1 = off)
    cfg_halves: Literal["joint", "separate"] = "joint"  # guided halves in one forward (DiT) or two
    batch_size: int = 64
    final_grid: bool = True  # a grid from the exported EMA model at the end
    report_per_class: int = 0  # >0: generate this many per class at the end for the demo-metrics report

    def __post_init__(self) -> None:
        _at_least("sample.every", self.every, 0)
        if any(c < 0 for c in self.classes):
            raise ValueError(f"sample.classes must be class indices >= 0, got {self.classes}")
        _at_least("sample.per_class", self.per_class, 1)
        _at_least("sample.steps", self.steps, 1)
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise ValueError(
                f"sample.cfg_scale must be a finite number >= 0 (1 = no guidance), got {self.cfg_scale}"
            )
        _at_least("sample.batch_size", self.batch_size, 1)
        _at_least("sample.report_per_class", self.report_per_class, 0)


@dataclass
class LogConfig:
    every: int = 100  # steps between logged scalars (averaged over the window and over processes)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb; [] = none
    project: str = "racedit"  # tracker project / run group name
    progress: bool = True  # tqdm progress bar with loss and images/s (main process)
    moe_metrics_every: int = 1000  # steps between expert-load metrics and the layer x timestep heatmap
    per_rank: bool = False  # also write each process's own (unreduced) loss to logs/rank{r}.jsonl
    loss_curve: bool = True  # logs/loss.png at the end

    def __post_init__(self) -> None:
        _at_least("log.every", self.every, 1)
        _at_least("log.moe_metrics_every", self.moe_metrics_every, 1)


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config (YAML) and apply ``section.key=value`` overrides; every value is checked here,
    before anything is built or loaded, and an error (``ConfigError``) names the key."""
    return load_config(RunConfig, path, overrides)
