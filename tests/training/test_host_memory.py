"""train.retain_host_memory: freed host memory stays in the process (racedit/training/host_memory.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh process: retain (or not), then run "steps" that allocate and touch a set of tensors together and
# free them all at the end, as a training step does with its activations; print the minor page faults of the
# last five steps and the pages they touched.
SCRIPT = """
import resource, sys, torch
from racedit.training.host_memory import retain_freed_memory
if sys.argv[1] == "retain":
    print(retain_freed_memory(), file=sys.stderr)
sizes = (3, 5, 2, 7, 3, 4, 1, 6)  # MiB, all under the 32 MiB threshold
faults = 0
for step in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = [torch.empty(mib * 2**18).fill_(1.0) for mib in sizes]  # float32: 2**18 elements per MiB
    del live
    if step >= 5:
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults, 5 * sum(sizes) * 2**20 // 4096)
"""


def run(mode: str) -> tuple[int, int, str]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=120
    )
    faults, pages = map(int, done.stdout.split())
    return faults, pages, done.stderr.strip()


def test_retained_memory_is_not_faulted_in_again():
    faults, pages, said = run("retain")
    if "no glibc" in said:
        pytest.skip(said)
    assert "stay in the process" in said
    # Memory given back to the kernel faults every touched page in again (`pages`, ~40 thousand). A kept heap
    # faults only when a step's blocks land past its high-water mark (placement differs from step to step),
    # a fraction of one step's pages now and then: a quarter of all of them is far above that, far below a return.
    assert faults < pages // 4, (faults, pages)


def test_retain_is_idempotent_and_describes_itself():
    from racedit.training.host_memory import retain_freed_memory

    assert retain_freed_memory() == retain_freed_memory()
    assert retain_freed_memory().startswith("host memory:")
