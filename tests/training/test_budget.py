"""The run's time limits (racedit/training/budget.py): when training stops, on a fake clock (no timing
asserts), and a budgeted run that still exports and writes a report saying it was cut short."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import tiny_run

from racedit.config.core import ConfigError, from_dict
from racedit.metrics.demo import format_training
from racedit.training import budget as budget_mod
from racedit.training.budget import MARGIN, RunBudget, Tail, sampling_batches, time_sampling_batch
from racedit.training.config import RunConfig, load_run_config
from racedit.training.loop import Trainer


class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def steps_until_stop(budget: RunBudget, clock: FakeClock, step_seconds, max_steps: int = 10_000) -> int:
    """Run the trainer's protocol against a fake clock: check, step (advance the clock), report the step."""
    budget.start_training()
    for step in range(max_steps):
        if budget.stop_reason() is not None:
            return step
        clock.now += step_seconds(step)
        budget.step_done()
    return max_steps


def test_budget_keeps_the_measured_tail_with_margin() -> None:
    clock = FakeClock(100.0)
    budget = RunBudget(budget_minutes=2, start=90.0, clock=clock)  # 10 s of start-up already spent
    budget.tail = Tail(sampling_batches=3, seconds_per_batch=4.0, fixed_seconds=10.0)  # 22 s of tail
    stopped = steps_until_stop(budget, clock, lambda step: 1.0)
    # Steps of 1 s and a steady machine: the last step is the one after which 1 s more plus the reserve
    # (MARGIN x 22 s) still fits the deadline 90 + 120 s.
    reserve = MARGIN * 22.0
    assert budget.slowdown() == 1.0 and budget.reserve() == pytest.approx(reserve)
    assert stopped == int(210.0 - reserve - 1.0 - 100.0) + 1
    assert clock.now + reserve <= 210.0  # the tail, even at its reserved cost, ends inside the budget
    assert "train.time_budget_minutes = 2" in budget.stop_reason()


def test_budget_reserve_grows_when_the_machine_slows_down() -> None:
    steady_clock, slow_clock = FakeClock(), FakeClock()
    steady = RunBudget(budget_minutes=10, start=0.0, clock=steady_clock)
    slowed = RunBudget(budget_minutes=10, start=0.0, clock=slow_clock)
    for b in (steady, slowed):
        b.tail = Tail(sampling_batches=2, seconds_per_batch=10.0, fixed_seconds=10.0)
    steady_stop = steps_until_stop(steady, steady_clock, lambda step: 1.0)
    # after the 10 reference steps the machine runs 3x slower: the tail will too, so more is kept
    slowed_stop = steps_until_stop(slowed, slow_clock, lambda step: 1.0 if step < 10 else 3.0)
    assert 1.0 < slowed.slowdown() <= 3.0
    assert slowed.reserve() > steady.reserve()
    assert slow_clock.now + slowed.reserve() <= 600.0
    assert slowed_stop < steady_stop


def test_training_time_limit_counts_from_the_first_step_only() -> None:
    clock = FakeClock(1000.0)  # start-up does not count against train.time_limit_minutes
    budget = RunBudget(training_limit_minutes=0.5, start=0.0, clock=clock)
    assert budget.active and budget.deadline is None
    stopped = steps_until_stop(budget, clock, lambda step: 2.0)
    assert stopped == 16  # 30 s of 2 s steps is reached after step 15; the limit is "more than 30 s"
    assert "train.time_limit_minutes = 0.5" in budget.stop_reason()


def test_no_limits_never_stop() -> None:
    clock = FakeClock()
    budget = RunBudget(start=0.0, clock=clock)
    assert not budget.active
    assert steps_until_stop(budget, clock, lambda step: 100.0, max_steps=50) == 50


def test_sampling_batches_counts_samples() -> None:
    # the final grid (40 samples) and the report (500) in batches of 256: 540 samples' worth of work
    assert sampling_batches([40, 500], 256) == pytest.approx(540 / 256)
    assert sampling_batches([0, 0], 256) == 0


def test_sampling_probe_pays_one_time_costs_before_timing() -> None:
    calls = []

    def sample(k: int) -> None:
        calls.append(k)

    time_sampling_batch(sample, steps=25)
    assert calls == [1, 5]  # an untimed warm call, then 5 of the 25 steps timed (and scaled by 5)
    calls.clear()
    time_sampling_batch(sample, steps=2)
    assert calls == [1, 2]


def test_budget_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"train.time_budget_minutes must be a finite number > 0"):
        load_run_config(None, ["train.time_budget_minutes=0"])
    with pytest.raises(ConfigError, match=r"train.time_limit_minutes must be a finite number > 0"):
        load_run_config(None, ["train.time_limit_minutes=-1"])


class ClockedTrainer(Trainer):
    """Every training step takes one second of a fake clock."""

    def __init__(self, cfg, clock: FakeClock, **kw):
        super().__init__(cfg, **kw)
        self.clock = clock

    def train_step(self):
        self.clock.now += 1.0
        return super().train_step()


def test_budgeted_run_stops_early_and_still_reports(
    tmp_path: Path, one_thread, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    clock = FakeClock(time.time())
    monkeypatch.setattr(budget_mod, "wall_clock", clock)
    monkeypatch.setattr(budget_mod, "process_start_time", lambda: clock.now)
    cfg = from_dict(
        RunConfig,
        tiny_run(
            tmp_path / "run",
            train={"max_steps": 10_000, "checkpoint_every": 10_000, "time_budget_minutes": 1.0},
            sample={"report_per_class": 2, "steps": 2, "batch_size": 16},
        ),
    )
    result = ClockedTrainer(cfg, clock).run()
    # A minute of 1 s steps minus the reserve (at least MARGIN x the fixed tail): stopped well before the end
    assert 1 <= result.step <= 60 - MARGIN * budget_mod.FIXED_TAIL_SECONDS
    assert result.stopped_early is not None and "time_budget_minutes = 1" in result.stopped_early
    assert (result.export_dir / "config.json").is_file()
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert report["training"]["steps"] == result.step
    assert report["training"]["max_steps"] == 10_000
    text = (tmp_path / "run" / "report" / "report.md").read_text()
    assert f"Training: {result.step:,} of 10,000 steps; cut short (train.time_budget_minutes = 1" in text


def test_report_line_of_a_run_that_finished() -> None:
    line = format_training(
        {
            "steps": 1200,
            "max_steps": 1200,
            "stopped_early": None,
            "time_budget_minutes": 8,
            "seconds_to_report": 421,
        }
    )
    assert line == (
        "Training: 1,200 of 1,200 steps (not cut short by train.time_budget_minutes = 8). "
        "Report written 7 min 01 s after the process started."
    )


def test_demo_config_is_budgeted_and_a_race_dit() -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    cfg = load_run_config(configs / "demo.yaml")
    # the README promises 10 minutes for venv + install + demo: the run itself has to leave room
    assert cfg.train.time_budget_minutes is not None and cfg.train.time_budget_minutes <= 8
    moe = cfg.model.config.moe
    assert moe.router == "race" and moe.plr_weight > 0 and moe.rsl_weight > 0
