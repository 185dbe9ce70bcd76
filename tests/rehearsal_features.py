"""A small stand-in for the Inception, for ``racedit-fid --features tests/rehearsal_features.py:build``.

Fixed seeded random features with the Inception's output sizes (fid/network.py describes the interface):
pool = ReLU of a projection of the 16x16 thumbnail (2048), spatial = a 1x1 projection of the 17x17
thumbnail to 7 channels in TF's NHWC order (2023), logits = a projection of pool to 10 classes. It
separates images by colour and layout, which is all a pipeline test needs; its numbers are not FIDs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StandInFeatures(nn.Module):
    identity = "rehearsal-stand-in/v1 (seeded random projections of thumbnails; not an Inception)"
    is_reference_network = False

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w_pool", torch.randn(2048, 3 * 16 * 16, generator=g) / (3 * 16 * 16) ** 0.5)
        self.register_buffer("w_spatial", torch.randn(7, 3, generator=g) / 3**0.5)
        self.register_buffer("w_logits", torch.randn(10, 2048, generator=g) / 2048**0.5)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]
        thumb = F.interpolate(x, size=(16, 16), mode="area").flatten(1)  # (N, 768)
        pool = F.relu(thumb @ self.w_pool.T)  # (N, 2048)
        grid = F.interpolate(x, size=(17, 17), mode="area")  # (N, 3, 17, 17)
        spatial = F.relu(torch.einsum("kc,nchw->nhwk", self.w_spatial, grid)).flatten(1)  # (N, 2023)
        return pool, spatial

    def unbiased_logits(self, pool: torch.Tensor) -> torch.Tensor:
        return pool.to("cpu", torch.float64) @ self.w_logits.to("cpu", torch.float64).T  # (N, 10)


def build() -> StandInFeatures:
    return StandInFeatures().eval()
