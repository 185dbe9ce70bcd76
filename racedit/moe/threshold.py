"""The learnable threshold of expert race (docs/spec/race-dit.md section 3).

Each MoE layer owns a ``Threshold`` with two persistent buffers (saved by ``state_dict`` and
``save_pretrained``):
- ``tau`` (float32 scalar): EMA of the K-th largest routing score T_K seen in training,
  ``tau <- a * tau + (1 - a) * T_K``; the first update sets ``tau = T_K`` directly;
- ``updates`` (int64 scalar): how many EMA updates happened; 0 means "not initialised", so a checkpoint
  restores the initialisation state too.

When the EMA advances (decisions other parts must know):
- in every training-mode forward (also under ``torch.no_grad``, because reentrant checkpointing runs the
  first forward without grad); put the model in ``eval()`` for validation forwards;
- never while autograd's engine is running, i.e. not during the recomputation of a gradient-checkpointed
  block (``torch.utils.checkpoint``, reentrant or not, re-runs the forward inside the backward pass; we
  detect that with ``torch._C._current_graph_task_id() != -1``). So tau advances once per forward of a
  (micro-)batch; with gradient accumulation it advances once per micro-batch.
- T_K is the K-th largest score of the *global* batch, K = k * (global token count): the expert race's
  own K-th value (the strategy's ``k_for``, the same K the selection uses) on one process or with
  ``moe.race_scope=global``; with ``race_scope=local`` under ``torch.distributed`` the routing stays local to
  each rank and a distributed radix select finds T_K over every rank's scores
  (``ExpertRace.threshold_kth`` -> ``racedit.routing.distributed.radix_kth``: 4 all-reduces of a 256-bin
  histogram, about 8 KB per layer whatever the batch and world size; bit for bit the value the all-gather
  reference ``gather_kth`` returns, a zero as +0.0).

The EMA-of-weights model (``racedit.training.ema``) averages ``tau`` at its own decay, like its weights,
so it routes with a threshold that matches its lagging router; an EMA model that has never seen a set
threshold takes the live one at its first update (an average up from the placeholder 0 would route far
too many experts). Both buffers travel with the state dict, so ``load_state_dict`` gives a model another
model's thresholds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def in_backward_recompute() -> bool:
    """True while autograd's engine runs (e.g. gradient checkpointing recomputes a forward)."""
    return torch._C._current_graph_task_id() != -1


class Threshold(nn.Module):
    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("tau", torch.zeros((), dtype=torch.float32))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def _apply(self, fn, recurse=True):
        """``module.to(dtype)`` moves tau but keeps it float32 (``model.to(torch.bfloat16)``, a bf16 export): a bf16
        tau would quantise the threshold and run its EMA in bf16."""
        tau = self.tau
        super()._apply(fn, recurse)
        if self.tau.dtype != torch.float32:  # the float32 value, on the new device
            self.tau = tau.to(self.tau.device)
        return self

    @property
    def initialized(self) -> bool:
        return bool(self.updates.item() > 0)

    @torch.no_grad()
    def update(self, kth: Tensor) -> None:
        """Fold one T_K (scalar) into the EMA; the first call sets tau = T_K."""
        kth = kth.detach().float().to(self.tau.device)
        ema = self.decay * self.tau + (1.0 - self.decay) * kth
        self.tau.copy_(torch.where(self.updates > 0, ema, kth))  # no host sync
        self.updates.add_(1)

    def extra_repr(self) -> str:
        return f"decay={self.decay}"
