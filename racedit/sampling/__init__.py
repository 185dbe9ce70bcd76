"""Sampling: samplers with classifier-free guidance, per-sample seeding, decoding, grids and metadata.

``generate(model, labels, objective=..., sampler=..., steps=..., cfg_scale=...)`` -> uint8 (N, H, W, 3);
``save_grid(images, labels, class_names, path)``; ``sampling.json`` via ``write_sampling_meta`` /
``read_sampling_meta``. The command line is ``racedit.cli.sample`` (``sample.py``, ``racedit-sample``).
"""

from racedit.sampling.generate import QUANTIZATIONS, generate, sample_batch, sample_latents, to_uint8
from racedit.sampling.grid import save_grid
from racedit.sampling.guidance import Guidance, guided_forward, null_label
from racedit.sampling.meta import SamplingMeta, official_dit_meta, read_sampling_meta, write_sampling_meta
from racedit.sampling.samplers import DEFAULT_STEPS, SAMPLERS, make_scheduler, run_sampler
from racedit.sampling.seeding import per_sample_randn, sample_generators, sample_seed

__all__ = [
    "DEFAULT_STEPS",
    "Guidance",
    "QUANTIZATIONS",
    "SAMPLERS",
    "SamplingMeta",
    "generate",
    "guided_forward",
    "make_scheduler",
    "null_label",
    "official_dit_meta",
    "per_sample_randn",
    "read_sampling_meta",
    "run_sampler",
    "sample_batch",
    "sample_generators",
    "sample_latents",
    "sample_seed",
    "save_grid",
    "to_uint8",
    "write_sampling_meta",
]
