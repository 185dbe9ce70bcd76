"""Routing metrics and the layer x timestep allocation heatmap (docs/spec/race-dit.md section 6).

- MaxVio = (max_e load_e - mean load) / mean load, per layer.
- Combination usage: the co-activated expert pairs (i < j) over all tokens, sorted by count descending,
  normalised, cumulative; the percent of the E(E-1)/2 possible pairs needed to reach 95% of all
  co-activations, the pair that crosses 95% included (higher = more diverse).
- Experts per token per layer, and per layer and timestep bucket (10 equal buckets over
  [0, num_timesteps); the paper's Fig. 6), tau per layer.

``RoutingStats`` accumulates the ``RoutingRecord``s of ``ForwardAux`` over many forwards (training steps or
sampling) and returns a flat dict of scalars plus the heatmap. Its accumulators are small float64 tensors on the
records' device: ``update`` runs after every training micro-batch, and copying each layer's counts to the host
there would stop a GPU's queue once per layer; ``compute`` and ``heatmap`` copy them once per logging interval.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from racedit.interfaces import ForwardAux


def max_violation(counts: Tensor) -> float:
    """counts (E,) tokens per expert -> MaxVio (0 for perfect balance)."""
    counts = counts.double()
    mean = counts.mean()
    if mean <= 0:
        return 0.0
    return float((counts.max() - mean) / mean)


def combination_usage(pair_counts: Tensor, coverage: float = 0.95) -> float:
    """pair_counts (E, E) co-selection counts (M^T M) -> percent of expert pairs covering ``coverage``.

    The fewest pairs whose co-activations make up at least ``coverage`` of all (the paper's "combination
    usage"): sort the pairs i < j by count, descending, and take the smallest n with
    sum(top n) >= coverage * total. The pair whose count carries the running share across 95% is counted:
    without it the pairs cover less than 95%. Example: shares 60%, 34%, 6% of three pairs -> 3 pairs
    (the first two cover only 94%); shares 60%, 35%, 5% -> 2 pairs (exactly 95% is covered).
    Returns 0 when nothing was co-selected (e.g. k = 1 token choice).
    """
    E = pair_counts.shape[0]
    iu = torch.triu_indices(E, E, offset=1)
    pairs = pair_counts.double()[iu[0], iu[1]]  # (E(E-1)/2,)
    total = pairs.sum()
    if E < 2 or total <= 0:
        return 0.0
    covered = torch.cumsum(torch.sort(pairs, descending=True).values, 0)  # (P,) counts of the top n pairs
    # Counts are integers (exact in float64); the relative slack only absorbs rounding in coverage * total.
    target = torch.tensor(coverage * float(total) * (1 - 1e-12), dtype=covered.dtype)
    needed = int(torch.searchsorted(covered, target).item()) + 1  # first n with covered[n-1] >= target
    return 100.0 * min(needed, pairs.numel()) / pairs.numel()


def timestep_buckets(t: Tensor, num_timesteps: int = 1000, num_buckets: int = 10) -> Tensor:
    """t (B,) in [0, num_timesteps) (integer or continuous) -> bucket ids (B,) int64 in [0, num_buckets)."""
    b = torch.floor(t.detach().double() / num_timesteps * num_buckets).long()
    return b.clamp_(0, num_buckets - 1)


class RoutingStats:
    """Accumulates routing statistics of MoE layers over many forwards.

    ``update(aux)`` after each forward (records of every MoE layer), then ``compute()`` for scalars and
    ``heatmap()`` / ``save_heatmap(path)`` for the layer x timestep experts-per-token allocation.
    """

    def __init__(self, num_timesteps: int = 1000, num_buckets: int = 10):
        self.num_timesteps = num_timesteps
        self.num_buckets = num_buckets
        self.reset()

    def reset(self) -> None:
        self.counts: dict[int, Tensor] = {}  # layer -> (E,) float64 selected pairs per expert
        self.pairs: dict[int, Tensor] = {}  # layer -> (E, E) float64 co-selection
        self.expert_sum: dict[int, Tensor] = {}  # layer -> (buckets,) sum of experts-per-token over samples
        self.sample_count: dict[int, Tensor] = {}  # layer -> (buckets,) samples
        self.tau: dict[int, Tensor] = {}  # layer -> float32 scalar, the latest threshold

    @torch.no_grad()
    def update(self, aux: ForwardAux) -> None:
        """Add one forward's records, on their device (no host synchronisation)."""
        for r in aux.layers:
            layer = r.layer
            mask = r.mask.detach()  # (B, L, E)
            B, L, E = mask.shape
            dev = mask.device
            # one forward's counts are integers below 2^24 (tokens of one micro-batch): exact in float32, and
            # in TF32 products too (the trainer enables it on CUDA), whose inputs here are 0 or 1
            Mf = mask.reshape(B * L, E).float()
            if layer not in self.counts:
                self.counts[layer] = torch.zeros(E, dtype=torch.float64, device=dev)
                self.pairs[layer] = torch.zeros(E, E, dtype=torch.float64, device=dev)
                self.expert_sum[layer] = torch.zeros(self.num_buckets, dtype=torch.float64, device=dev)
                self.sample_count[layer] = torch.zeros(self.num_buckets, dtype=torch.float64, device=dev)
            self.counts[layer] += Mf.sum(0)
            self.pairs[layer] += Mf.T @ Mf
            if aux.t is not None:
                buckets = timestep_buckets(aux.t.to(dev), self.num_timesteps, self.num_buckets)
            else:
                buckets = torch.zeros(B, dtype=torch.long, device=dev)
            # per bucket as a product with the one-hot buckets (B, buckets): a fixed order of additions, where a
            # CUDA index_add_ would add atomically
            onehot = (buckets[:, None] == torch.arange(self.num_buckets, device=dev)).double()  # (B, buckets)
            self.expert_sum[layer] += r.experts_per_sample.detach().double() @ onehot
            self.sample_count[layer] += onehot.sum(0)
            if r.tau is not None:
                self.tau[layer] = r.tau.detach().float()

    @property
    def layers(self) -> list[int]:
        return sorted(self.counts)

    def heatmap(self) -> np.ndarray:
        """(num_layers, num_buckets) mean experts per token; NaN where a bucket saw no sample."""
        rows = []
        for layer in self.layers:
            n, total = self.sample_count[layer].cpu(), self.expert_sum[layer].cpu()
            rows.append(torch.where(n > 0, total / n.clamp_min(1), float("nan")).numpy())
        return np.stack(rows) if rows else np.zeros((0, self.num_buckets))

    def compute(self) -> dict[str, float]:
        """Flat scalars: ``moe/<metric>/layer<i>`` per layer and ``moe/<metric>`` averaged over layers."""
        out: dict[str, float] = {}
        per_metric: dict[str, list[float]] = {"maxvio": [], "comb95": [], "experts_per_token": [], "tau": []}
        for layer in self.layers:
            n = self.sample_count[layer].sum().cpu()
            values = {
                "maxvio": max_violation(self.counts[layer].cpu()),
                "comb95": combination_usage(self.pairs[layer].cpu()),
                "experts_per_token": float(self.expert_sum[layer].sum().cpu() / n) if n > 0 else float("nan"),
            }
            if layer in self.tau:
                values["tau"] = float(self.tau[layer])
            for name, v in values.items():
                out[f"moe/{name}/layer{layer}"] = v
                per_metric[name].append(v)
        for name, vs in per_metric.items():
            if vs:
                out[f"moe/{name}"] = float(np.mean(vs))
        if self.layers:  # per timestep bucket, averaged over layers (every layer sees the same samples)
            total = sum(v.cpu() for v in self.expert_sum.values())
            n = sum(v.cpu() for v in self.sample_count.values())
            for b in range(self.num_buckets):
                if n[b] > 0:
                    out[f"moe/experts_per_token/t{b}"] = float(total[b] / n[b])
        return out

    def save_heatmap(self, path: str | Path, title: str | None = None) -> Path:
        return plot_allocation_heatmap(
            self.heatmap(), path, self.num_timesteps, layers=self.layers, title=title
        )


def plot_allocation_heatmap(
    grid: np.ndarray,
    path: str | Path,
    num_timesteps: int = 1000,
    layers: list[int] | None = None,
    title: str | None = None,
) -> Path:
    """Draw experts per token, layers (rows) x timestep buckets (columns), to a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    grid = np.asarray(grid, dtype=float)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"heatmap needs a non-empty (layers, buckets) array, got shape {grid.shape}")
    n_layers, n_buckets = grid.shape
    layers = list(range(n_layers)) if layers is None else layers
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n_buckets, 1.0 + 0.35 * n_layers), dpi=100)
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", origin="upper")
    edges = np.linspace(0, num_timesteps, n_buckets + 1)
    ax.set_xticks(range(n_buckets))
    ax.set_xticklabels([f"{int(edges[i])}" for i in range(n_buckets)], rotation=45, fontsize=7)
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([str(i) for i in layers], fontsize=7)
    ax.set_xlabel("timestep bucket (start)")
    ax.set_ylabel("layer")
    ax.set_title(title or "experts per token")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
