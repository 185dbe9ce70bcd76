"""When training must stop so that the whole run fits its wall-clock limits.

Two limits, both optional (``racedit.training.config.TrainConfig``):

- ``train.time_limit_minutes``: training time alone (from the first step); export, sampling and the report
  come after it and are not counted.
- ``train.time_budget_minutes``: the whole process, from its start (interpreter, imports, setup) to the
  written report. Training stops when the next step would leave less than the *reserve*: the measured cost
  of what still follows training.

The reserve is measured, not guessed. Before the first step the trainer times one batch of the final
sampling settings (``sample.batch_size`` samples with the final sampler and guidance, a few sampler steps,
scaled linearly to ``sample.steps``: every sampler spends a fixed number of network evaluations per step).
The samples still to draw at the end (final grid + report) are a known number of such batches. Added to it
is ``FIXED_TAIL_SECONDS`` for the rest of the tail (checkpoint, export, loss curve, the report's
classifier). The machine can slow down after start-up (other processes): the reserve is scaled by the
ratio of the recent step time to the step time right after the measurement (never below 1), and multiplied
by ``MARGIN``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

MARGIN = 1.5  # on the scaled reserve: sampling cost varies with the routing of the trained model (threshold)
# Checkpoint + export (a few MB), loss-curve plot, fitting the report's classifier (600 full-batch steps of a
# 64-128-64-10 MLP): about 5 s together on 2 idle CPU cores for the demo; bounded here with room for load.
FIXED_TAIL_SECONDS = 15.0
REFERENCE_STEPS = 10  # steps after the measurement whose mean time is the speed the reserve was measured at
RECENT_WEIGHT = 0.1  # exponential average of step times (about the last 10 steps)


def wall_clock() -> float:
    """Seconds since the epoch (the clock of ``process_start_time``); tests replace it with a fake."""
    return time.time()


def process_start_time() -> float:
    """When this process started (seconds since the epoch): the interpreter start, before any import."""
    try:
        import psutil  # a dependency of accelerate

        return float(psutil.Process().create_time())
    except Exception:  # no psutil or no access to the process table: count from this module's import
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


@dataclass
class Tail:
    """What follows training, in units the trainer can count: sampling batches and fixed work."""

    sampling_batches: float = 0.0  # full batches of sample.batch_size still to draw after training
    seconds_per_batch: float = 0.0  # measured at start-up
    fixed_seconds: float = FIXED_TAIL_SECONDS

    @property
    def seconds(self) -> float:
        return self.sampling_batches * self.seconds_per_batch + self.fixed_seconds


def sampling_batches(counts: list[int], batch_size: int) -> float:
    """Full batches' worth of work to draw each of ``counts`` sample sets: on a CPU the cost of a batch is
    proportional to its samples, so a partial batch counts as its share (on a GPU a small batch costs
    about as much as a full one, but there the sampling is a small part of the tail)."""
    return sum(n / batch_size for n in counts if n > 0)


def time_sampling_batch(sample: Callable[[int], object], steps: int, probe_steps: int = 5) -> float:
    """Seconds one batch with ``steps`` sampler steps takes. ``sample(k)`` draws one batch with k sampler
    steps: one untimed call with 1 step pays the one-time costs (lazy imports, first allocations), which
    must not be scaled; then min(steps, probe_steps) steps are timed and scaled linearly to ``steps``."""
    sample(1)
    k = max(1, min(steps, probe_steps))
    start = time.perf_counter()
    sample(k)
    return (time.perf_counter() - start) * steps / k


class RunBudget:
    """Decides before each step whether training has to stop; ``stop_reason`` says why (None = go on)."""

    def __init__(
        self,
        budget_minutes: float | None = None,
        training_limit_minutes: float | None = None,
        *,
        start: float | None = None,
        clock: Callable[[], float] | None = None,
    ):
        self.clock = clock or wall_clock
        self.budget_minutes = budget_minutes
        self.training_limit_minutes = training_limit_minutes
        self.start = process_start_time() if start is None else start
        self.deadline = self.start + 60.0 * budget_minutes if budget_minutes is not None else None
        self.tail = Tail()
        self.training_started: float | None = None
        self.last_tick: float | None = None
        self.reference_step: float | None = None  # mean step seconds just after the tail was measured
        self.recent_step: float | None = None
        self.step_times: list[float] = []

    @property
    def active(self) -> bool:
        return self.deadline is not None or self.training_limit_minutes is not None

    def start_training(self) -> None:
        self.training_started = self.last_tick = self.clock()

    def step_done(self) -> None:
        """Call after every training iteration (step plus the periodic work that came with it)."""
        now = self.clock()
        dt = now - (self.last_tick if self.last_tick is not None else now)
        self.last_tick = now
        if len(self.step_times) < REFERENCE_STEPS:
            self.step_times.append(dt)
            if len(self.step_times) == REFERENCE_STEPS:
                self.reference_step = sum(self.step_times) / REFERENCE_STEPS
        self.recent_step = dt if self.recent_step is None else (
            (1 - RECENT_WEIGHT) * self.recent_step + RECENT_WEIGHT * dt
        )  # fmt: skip

    def slowdown(self) -> float:
        """How much slower steps run now than when the tail was measured (>= 1)."""
        if not self.reference_step or self.recent_step is None:
            return 1.0
        return max(1.0, self.recent_step / self.reference_step)

    def reserve(self) -> float:
        """Seconds to keep for everything after training, at the current speed of the machine."""
        return MARGIN * self.slowdown() * self.tail.seconds

    def elapsed(self) -> float:
        """Seconds since the process started."""
        return self.clock() - self.start

    def stop_reason(self) -> str | None:
        now = self.clock()
        if self.training_limit_minutes is not None and self.training_started is not None:
            if now - self.training_started > 60.0 * self.training_limit_minutes:
                return f"train.time_limit_minutes = {self.training_limit_minutes:g} reached"
        if self.deadline is not None:
            next_step = self.recent_step or 0.0
            if now + next_step + self.reserve() > self.deadline:
                return (
                    f"train.time_budget_minutes = {self.budget_minutes:g}: {self.elapsed():.0f} s since the "
                    f"process started, {self.reserve():.0f} s kept for export, sampling and the report"
                )
        return None
