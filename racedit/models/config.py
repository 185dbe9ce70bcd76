"""Architecture of a (Race-)DiT: everything needed to build the network, nothing about training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from racedit.connections.config import ConnectionConfig
from racedit.moe.config import MoEConfig


@dataclass
class ModelConfig:
    input_size: int = 32  # latent side (256 px / 8 for SD-VAE)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance (adds a null class)
    learn_sigma: bool = True  # output 2*C channels: epsilon and the variance interpolation v
    # Frequencies of the sinusoidal timestep features: "official" (DiT: exp(-ln(1e4) i / half)) or
    # "diffusers" (its Timesteps(downscale_freq_shift=1): exp(-ln(1e4) i / (half - 1))). Weights run with
    # the convention they were trained with; the other one shifts every frequency slightly.
    timestep_convention: Literal["official", "diffusers"] = "official"
    # eps of the LayerNorm before the MLP: DiT's 1e-6; diffusers' DiTTransformer2DModel uses its
    # norm_eps there (1e-5 unless set), and 1e-6 in the other norms.
    mlp_norm_eps: float = 1e-6
    moe: MoEConfig | None = None  # None = dense DiT
    connection: ConnectionConfig = field(default_factory=ConnectionConfig)

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.timestep_convention not in ("official", "diffusers"):
            raise ValueError(
                f"timestep_convention must be 'official' or 'diffusers', got {self.timestep_convention!r}"
            )
        if not self.mlp_norm_eps > 0:
            raise ValueError(f"mlp_norm_eps must be > 0, got {self.mlp_norm_eps}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)
