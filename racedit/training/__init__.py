"""Training: run configs, the Accelerate loop, checkpoints, EMA and logging (``train_imagenet.py``)."""

from racedit.training.config import LogConfig, RunConfig, SampleConfig, TrainConfig, load_run_config

__all__ = ["LogConfig", "RunConfig", "SampleConfig", "TrainConfig", "load_run_config", "train"]


def train(*args, **kwargs):  # lazy: importing the package must not import Accelerate
    from racedit.training.loop import train as _train

    return _train(*args, **kwargs)
