"""Models: the DiT backbone, its registry (the zoo) and checkpoint loading."""

from racedit.models.aux import ForwardAux
from racedit.models.config import ModelConfig
from racedit.models.diffusers_io import export_diffusers
from racedit.models.dit import DiT
from racedit.models.loading import CheckpointError, build_model, infer_config, load_model, save_model
from racedit.models.registry import config_from_name, resolve_model_config, zoo_names

__all__ = [
    "CheckpointError",
    "DiT",
    "ForwardAux",
    "ModelConfig",
    "build_model",
    "config_from_name",
    "export_diffusers",
    "infer_config",
    "load_model",
    "resolve_model_config",
    "save_model",
    "zoo_names",
]
