"""Per-layer output norms of a (Race-)DiT over noise levels: the observation behind PLR.

Race-DiT's per-layer regularization starts from a property of pre-norm transformers: the residual
stream grows with depth, so what a shallow layer adds is small next to the stream that deep layers see,
and the shallow layers learn slowly. This module measures it on a checkpoint. For each noise level
(0 = data, 1 = noise) it noises real training data with the model's own objective (x_t from x_0 and
Gaussian noise, the training distribution at that level), runs the model in eval mode with the real
labels, and records for every block l, as the mean over samples and tokens of the per-token L2 norm:

- ``stream``: the residual stream after block l (for hyper/frac-connections: over all streams);
- ``update``: what block l changed in the stream, ||out_l - in_l|| (attention + MLP/MoE, gated);
- ``mlp``: the MLP / MoE output F(x) of block l before its adaLN gate.

``std`` is the standard deviation over samples of the per-sample mean. Written as a long CSV
(layer, noise_level, model_t, quantity, mean, std) and a three-panel plot (norm vs layer, one line per
noise level).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from racedit.diffusion import Objective

QUANTITIES = ("stream", "update", "mlp")


@dataclass
class NormTable:
    """Norms (mean, std over samples) indexed [quantity][level, layer]."""

    noise_levels: list[float]
    model_t: list[float]
    mean: dict[str, np.ndarray]  # quantity -> (levels, layers)
    std: dict[str, np.ndarray]

    @property
    def num_layers(self) -> int:
        return self.mean["stream"].shape[1]

    def rows(self) -> list[dict[str, float | int | str]]:
        out = []
        for q in QUANTITIES:
            for i, (level, t) in enumerate(zip(self.noise_levels, self.model_t)):
                for layer in range(self.num_layers):
                    out.append({"layer": layer, "noise_level": level, "model_t": t, "quantity": q,
                                "mean": float(self.mean[q][i, layer]), "std": float(self.std[q][i, layer])})  # fmt: skip
        return out


def noisy_input(objective: Objective, x0: Tensor, level: float, noise: Tensor) -> tuple[Tensor, Tensor]:
    """x0 (B, C, H, W) at noise level ``level`` in [0, 1] -> (x_t, model timesteps (B,)), as in training."""
    B = x0.shape[0]
    if objective.kind == "flow":  # x_t = (1 - t) x0 + t eps, t = level
        t = torch.full((B,), level, dtype=torch.float32, device=x0.device)
        return objective.interpolate(x0, t, noise), objective.model_time(t)
    T = objective.num_timesteps  # DDPM: integer step round(level * (T - 1))
    t = torch.full((B,), round(level * (T - 1)), dtype=torch.long, device=x0.device)
    return objective.q_sample(x0, t, noise), objective.model_time(t)


def _token_norms(x: Tensor) -> Tensor:
    """(B, ..., D) -> (B,) mean over every axis but the batch of the L2 norm over the last axis."""
    return torch.linalg.vector_norm(x.float(), dim=-1).reshape(x.shape[0], -1).mean(1)


@torch.no_grad()
def layer_norms(
    model: nn.Module,
    objective: Objective,
    x0: Tensor,
    labels: Tensor,
    noise_levels: list[float],
    *,
    batch_size: int = 64,
    seed: int = 0,
) -> NormTable:
    """Norms of every block's stream, update and MLP output at each noise level (see the module doc).

    x0 (N, C, H, W) model-space data and labels (N,); the same noise draw (seeded) serves every level."""
    model.eval()
    device = next(model.parameters()).device
    blocks = list(model.blocks)
    g = torch.Generator().manual_seed(seed)
    noise_all = torch.randn(x0.shape, generator=g)
    per: dict[str, list[list[Tensor]]] = {q: [[] for _ in blocks] for q in QUANTITIES}
    captured: dict[str, Tensor] = {}
    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(
            block.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(f"in{i}", args[0]))
        )
        hooks.append(
            block.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(f"out{i}", out))
        )
        hooks.append(
            block.mlp.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(f"mlp{i}", out))
        )
    means: dict[str, list[np.ndarray]] = {q: [] for q in QUANTITIES}
    stds: dict[str, list[np.ndarray]] = {q: [] for q in QUANTITIES}
    model_t: list[float] = []
    try:
        for level in noise_levels:
            for q in QUANTITIES:
                per[q] = [[] for _ in blocks]
            for start in range(0, x0.shape[0], batch_size):
                xb = x0[start : start + batch_size].to(device)
                nb = noise_all[start : start + batch_size].to(device)
                x_t, t = noisy_input(objective, xb, level, nb)
                model(x_t, t, labels[start : start + batch_size].to(device))
                for i in range(len(blocks)):
                    out, inp = captured[f"out{i}"], captured[f"in{i}"]
                    per["stream"][i].append(_token_norms(out).cpu())
                    per["update"][i].append(_token_norms(out - inp).cpu())
                    per["mlp"][i].append(_token_norms(captured[f"mlp{i}"]).cpu())
            model_t.append(float(t[0]))
            for q in QUANTITIES:
                samples = torch.stack([torch.cat(v) for v in per[q]], dim=1).double()  # (N, layers)
                means[q].append(samples.mean(0).numpy())
                stds[q].append(samples.std(0, correction=0).numpy())
    finally:
        for h in hooks:
            h.remove()
    return NormTable(
        noise_levels=list(noise_levels),
        model_t=model_t,
        mean={q: np.stack(v) for q, v in means.items()},
        std={q: np.stack(v) for q, v in stds.items()},
    )


def write_csv(table: NormTable, path: str | Path) -> Path:
    from racedit.io import atomic_write

    rows = table.rows()

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
    return Path(path)


def plot(table: NormTable, path: str | Path, title: str | None = None) -> Path:
    """Three panels (stream, update, MLP/MoE output): mean norm against layer, a line per noise level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from racedit.io import atomic_write

    labels = {
        "stream": "residual stream after the block",
        "update": "block update |out - in|",
        "mlp": "MLP / MoE output (before the gate)",
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=120)
    cmap = plt.get_cmap("viridis")
    layers = np.arange(table.num_layers)
    for ax, q in zip(axes, QUANTITIES):
        for i, level in enumerate(table.noise_levels):
            color = cmap(level)
            ax.plot(layers, table.mean[q][i], marker="o", ms=3, color=color, lw=1.2)
        ax.set_title(labels[q], fontsize=10)
        ax.set_xlabel("block")
        ax.set_xticks(layers)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("mean per-token L2 norm")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, 1))
    fig.colorbar(sm, ax=axes, label="noise level (0 = data, 1 = noise)", fraction=0.02, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=11)

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png")

    atomic_write(path, write)
    plt.close(fig)
    return Path(path)
