"""The feature network of an evaluation: the reference Inception, or a stand-in supplied for tests.

``racedit-fid eval|ref --features SPEC`` replaces the Inception with the object that ``SPEC`` builds, so
that a pipeline test (e.g. the rehearsal in ``tests/test_rehearsal.py``) can run the whole evaluation in
seconds on a CPU without the Inception weights. ``SPEC`` is ``package.module:callable`` or
``path/to/file.py:callable``; the callable takes no argument and returns an object with

- ``features(images)``: uint8 ``(N, 3, H, W)`` -> ``(pool (N, 2048), spatial (N, 2023))`` float32, the
  shapes of the Inception's pool_3 and mixed_6/conv[..., :7] features (reference batches store
  statistics of these sizes);
- ``unbiased_logits(pool)``: ``(N, 2048)`` -> ``(N, K)`` class logits for the Inception Score;
- ``identity``: a string naming the network and its weights (feature-cache key and provenance);
- ``to(device)``: returns the network on ``device``.

A stand-in must not claim to be the reference network: its records carry
``comparable_with_literature: false``, ``racedit-fid eval`` prints that its numbers are not FIDs, and the
leaderboard lists such records only with ``--include-test-records``, marked in their notes.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Any

from fid.data import InputError

REQUIRED = ("features", "unbiased_logits", "identity", "to")


def load_feature_network(spec: str) -> Any:
    """Build the stand-in network named by ``module:callable`` or ``file.py:callable`` (see the module doc)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"--features {spec!r}: expected package.module:callable or path/to/file.py:callable")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--features {spec!r}: no such file {path}")
        loader_spec = importlib.util.spec_from_file_location(f"racedit_fid_features_{path.stem}", path)
        if loader_spec is None or loader_spec.loader is None:
            raise InputError(f"--features {spec!r}: {path} cannot be imported")
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"--features {spec!r}: {module_name} has no callable {attr!r}")
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise InputError(f"--features {spec!r}: {attr} needs an argument; it must take none") from None
    except ValueError:  # no signature to inspect (a builtin): call it and see
        pass
    network = factory()
    missing = [name for name in REQUIRED if not hasattr(network, name)]
    if missing:
        raise InputError(f"--features {spec!r}: the network it builds lacks {missing} (see fid/network.py)")
    if getattr(network, "is_reference_network", False):
        raise InputError(f"--features {spec!r}: a stand-in network cannot be the reference Inception")
    network.is_reference_network = False
    return network
