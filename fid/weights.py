"""Where the Inception weights come from: resolve a local file, check its hash, load it safely.

docs/spec/evaluation.md, "Network and weights": the 2015-12-05 InceptionV3 graph ported to PyTorch, one file
under two names (torch-fidelity's and pytorch-fid's), SHA-256 6726825d...; resolved from an explicit
path, then ``$RACEDIT_INCEPTION_WEIGHTS``, then ``$TORCH_HOME/hub/checkpoints/``. Nothing here ever
downloads: a missing or wrong file is an error that says which file to fetch and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from racedit.io import sha256_file

ENV_VAR = "RACEDIT_INCEPTION_WEIGHTS"
WEIGHTS_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_BYTES = 95_628_359
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


class InceptionWeightsError(RuntimeError):
    """The Inception weights are missing or are not the expected file."""


def hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch's own rule: default ``~/.cache/torch``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _how_to_fetch() -> str:
    target = hub_checkpoint_dir() / WEIGHTS_NAMES[0]
    return (
        f"Fetch {WEIGHTS_URL}\n"
        f"  ({WEIGHTS_BYTES:,} bytes, SHA-256 {WEIGHTS_SHA256}; the same bytes as pytorch-fid's "
        f"{WEIGHTS_NAMES[1]}),\n"
        f"  and put it at {target}\n"
        f"  (`mkdir -p {target.parent} && curl -L -o {target} {WEIGHTS_URL}`),\n"
        f"  or pass its path with --inception-weights PATH, or set {ENV_VAR}=PATH.\n"
        f"  (torchvision's Inception weights are a different network and must not be used for FID.)"
    )


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, hashed once per process


def verify_weights(path: str | os.PathLike, expected_sha256: str | None = None) -> str:
    """Check ``path`` has the expected SHA-256 (default ``WEIGHTS_SHA256``); returns it or raises."""
    expected_sha256 = expected_sha256 or WEIGHTS_SHA256
    p = Path(path)
    if not p.is_file():
        raise InceptionWeightsError(f"Inception weights file {p} does not exist.\n{_how_to_fetch()}")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key) or sha256_file(p)
    if digest != expected_sha256:
        raise InceptionWeightsError(
            f"Inception weights file {p} has SHA-256 {digest} ({st.st_size:,} bytes), expected "
            f"{expected_sha256} ({WEIGHTS_BYTES:,} bytes): it is not the 2015-12-05 Inception port "
            f"(truncated download or another network?). Replace it.\n{_how_to_fetch()}"
        )
    _VERIFIED[key] = digest
    return digest


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """Find the Inception weights file and verify its hash; never downloads.

    Order: ``path`` if given (only it), else ``$RACEDIT_INCEPTION_WEIGHTS`` if set (only it), else
    ``$TORCH_HOME/hub/checkpoints/`` under either known file name.
    """
    if path is not None:
        candidates, origin = [Path(path)], "the explicit path"
    elif os.environ.get(ENV_VAR):
        candidates, origin = [Path(os.environ[ENV_VAR])], f"${ENV_VAR}"
    else:
        candidates, origin = [hub_checkpoint_dir() / n for n in WEIGHTS_NAMES], "the torch hub cache"
    for candidate in candidates:
        if candidate.is_file():
            verify_weights(candidate)
            return candidate
    looked = "\n".join(f"  {c}" for c in candidates)
    raise InceptionWeightsError(
        f"Inception weights not found (looked in {origin}):\n{looked}\n{_how_to_fetch()}"
    )


def load_inception_state_dict(path: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Resolve, verify and load the weights with ``weights_only=True``; returns (state_dict, sha256)."""
    p = resolve_inception_weights(path)
    digest = verify_weights(p)
    state = torch.load(p, map_location="cpu", weights_only=True)
    return state, digest
