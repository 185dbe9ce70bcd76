"""InceptionV3 features for the ADM protocol, on torch-fidelity's port ("inception-v3-compat").

docs/spec/evaluation.md, "Network and weights" / "FID" / "sFID": torch-fidelity reproduces TF1's bilinear
resize to 299 and the (x - 128) / 128 normalisation. We take from one forward pass:

- ``pool``:    pool_3, (N, 2048), for FID, precision/recall, KID and (through the unbiased logits) IS;
- ``spatial``: TF's ``mixed_6/conv:0`` = the ReLU output of ``Mixed_6d.branch1x1`` (torch-fidelity's
  weight converter maps ``mixed_6/conv/*`` to ``Mixed_6d.branch1x1``), first 7 channels, laid out as
  TF's NHWC tensor (N, 17, 17, 7) and flattened -> (N, 2023), for sFID.

IS logits are ``pool @ fc.weight.T`` (no bias), as ADM's softmax graph (``softmax/logits/MatMul``)
and torch-fidelity's ``logits_unbiased``; :meth:`InceptionFeatures.unbiased_logits` computes them
from cached pool features, so only pool and spatial features are ever stored.

torch-fidelity's constructor would download the weights when given no path and loads with
``weights_only=False``; we hand it an in-memory empty dict, skip its load, and load the verified
state dict ourselves (``fid.weights``, ``weights_only=True``). Without weights, a seeded random
initialisation gives a deterministic network for tests (its numbers mean nothing).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from fid.weights import load_inception_state_dict

EXTRACTOR_NAME = "inception-v3-compat"
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7]
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008


class InceptionFeatures(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 returning ``(pool (N,2048), spatial (N,2023))`` float32 from uint8 NCHW.

    Build with :meth:`from_weights` (the verified 2015-12-05 weights) or :meth:`random_init` (tests).
    """

    def __init__(self, state_dict: dict[str, torch.Tensor] | None, *, seed: int = 0, weights_id: str = ""):
        self._skip_fidelity_load = True
        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        # features_list ["2048"]: the forward runs through Mixed_6d up to pool_3 and stops before the fc.
        super().__init__(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=empty)
        self._skip_fidelity_load = False
        if state_dict is None:
            state_dict = random_state_dict(self, seed)
            weights_id = f"random-init-seed-{seed}"
        self.load_state_dict(state_dict, strict=True)
        self.to(torch.float32).requires_grad_(False).eval()
        self.weights_id = weights_id  # the weights' SHA-256, or "random-init-seed-N"
        self._spatial: torch.Tensor | None = None
        self.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        if getattr(self, "_skip_fidelity_load", False):
            return None  # torch-fidelity's constructor loading our empty buffer: the real load follows
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_weights(cls, path: str | None = None) -> InceptionFeatures:
        """The 2015-12-05 weights, resolved and hash-checked by :func:`fid.weights.resolve_inception_weights`."""
        state, digest = load_inception_state_dict(path)
        return cls(state, weights_id=digest)

    @classmethod
    def random_init(cls, seed: int = 0) -> InceptionFeatures:
        """A seeded, randomly initialised network: deterministic, needs no file, for tests only."""
        return cls(None, seed=seed)

    @property
    def is_reference_network(self) -> bool:
        """True only for the verified 2015-12-05 weights (results comparable with the literature)."""
        return not self.weights_id.startswith("random-init")

    @property
    def identity(self) -> str:
        """What determines the features: used in cache keys and provenance records."""
        return f"{EXTRACTOR_NAME}/torch-fidelity-{torch_fidelity.__version__}/{self.weights_id}"

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._spatial = output  # (N, 192, 17, 17), after BN and ReLU

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, 3, H, W) -> (pool (N, 2048), spatial (N, 2023)), float32."""
        (pool,) = self.forward(images)
        spatial = self._spatial
        self._spatial = None
        assert spatial is not None and spatial.shape[1:] == (192, 17, 17), "Mixed_6d hook did not fire"
        # (N, 7, 17, 17) -> TF layout (N, 17, 17, 7) -> (N, 2023), ADM's reshape([N, -1]) order
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)
        return pool.float(), spatial.float()

    def unbiased_logits(self, pool: torch.Tensor) -> torch.Tensor:
        """pool (N, 2048) -> logits (N, 1008) without the fc bias, in float64 (ADM's softmax input)."""
        w = self.fc.weight.detach().to("cpu", torch.float64)  # (1008, 2048)
        return pool.to("cpu", torch.float64) @ w.T


def random_state_dict(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded He-normal convs and identity batch norms (activations keep their scale through the net); the fc
    is scaled up (std 30/sqrt(2048)) so that the logits differ between images and IS is not trivially 1.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, ref in model.state_dict().items():
        if name.endswith("conv.weight"):
            fan_in = math.prod(ref.shape[1:])
            out[name] = torch.randn(ref.shape, generator=gen) * math.sqrt(2.0 / fan_in)
        elif name == "fc.weight":
            out[name] = torch.randn(ref.shape, generator=gen) * (30.0 / math.sqrt(ref.shape[1]))
        elif name.endswith(("bn.weight", "running_var")):
            out[name] = torch.ones(ref.shape)
        elif name.endswith("num_batches_tracked"):
            out[name] = torch.zeros_like(ref)
        else:  # bn.bias, running_mean, fc.bias
            out[name] = torch.zeros(ref.shape)
    return out


@contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for the duration (docs/spec/evaluation.md: features in strict fp32), restored afterwards."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
