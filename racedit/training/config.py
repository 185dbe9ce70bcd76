"""The configuration of a training run: one YAML file, six sections, every key overridable.

```yaml
model: {name: RaceDiT-B/2-2in8, moe: {router: token}}   # registry name + any ModelConfig key
diffusion: {objective: ddpm}                              # racedit.diffusion.DiffusionConfig
data: {kind: latents, root: data/imagenet256}             # racedit.data.DataConfig
train: {global_batch_size: 256, lr: 1.0e-4, max_steps: 400000}
sample: {every: 10000, classes: [207, 360, 387, 974, 88, 979, 417, 279]}
log: {every: 100, trackers: [tensorboard]}
```

``model`` stays a mapping here because its defaults come from the registry name and the dataset
(``input_size``, ``in_channels`` and ``num_classes`` default to the data's shape and classes); it is
validated by ``resolve_model_config`` when the run is built (an unknown key is still an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from racedit.config.core import ConfigError, load_config
from racedit.data.config import DataConfig
from racedit.diffusion.config import DiffusionConfig


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"  # checkpoints/, logs/, samples/, final/ go under it
    seed: int = 0  # model init, data order, noise; process r uses seed + r for its noise
    max_steps: int = 400_000  # optimizer steps
    time_limit_minutes: float | None = None  # stop early (checkpoint + export) after this much training time
    global_batch_size: int = 256  # summed over processes and accumulation micro-steps
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    # --- optimizer (AdamW, parameter groups from DiT.optimizer_param_groups) -----------------
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    fused: bool | None = None  # None = fused AdamW when every parameter is on CUDA
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
    # --- EMA of the weights (fp32) -----------------------------------------------------------
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay = min(ema_decay, (1 + step) / (10 + step)) (short runs)
    # --- checkpoints and faults --------------------------------------------------------------
    checkpoint_every: int = 10_000  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # checkpoints kept (older ones are deleted after a new one is complete)
    nonfinite: Literal["stop", "skip"] = "stop"  # NaN/inf loss: stop, or skip the update and go on
    max_skipped: int = 100  # with nonfinite=skip: stop after this many skipped steps in a row

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.global_batch_size < 1:
            raise ValueError(f"train.global_batch_size must be >= 1, got {self.global_batch_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1, got {self.keep_last}")
        if self.checkpoint_every < 1:
            raise ValueError(f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")


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


@dataclass
class LogConfig:
    every: int = 100  # steps between logged scalars (averaged over the window and over processes)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb; [] = none
    project: str = "racedit"  # tracker project / run group name
    progress: bool = True  # tqdm progress bar with loss and images/s (main process)
    moe_metrics_every: int = 1000  # steps between expert-load metrics and the layer x timestep heatmap
    per_rank: bool = False  # also write each process's own (unreduced) loss to logs/rank{r}.jsonl
    loss_curve: bool = True  # logs/loss.png at the end


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"name": "RaceDiT-B/2-2in8"})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config (YAML) and apply ``section.key=value`` overrides; errors name the key."""
    try:
        return load_config(RunConfig, path, overrides)
    except ValueError as err:  # a dataclass __post_init__ check
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None
