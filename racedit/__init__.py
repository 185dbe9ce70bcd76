"""racedit: class-conditional Diffusion Transformers with Mixture-of-Experts routed by Expert Race."""

from racedit.models import (
    DiT,
    ForwardAux,
    ModelConfig,
    build_model,
    export_diffusers,
    load_model,
    save_model,
)

__version__ = "0.1.0"

__all__ = [
    "DiT",
    "ForwardAux",
    "ModelConfig",
    "build_model",
    "export_diffusers",
    "load_model",
    "save_model",
    "__version__",
]
