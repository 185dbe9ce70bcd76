"""Shared test settings.

Every test works on tiny tensors, where one intra-op thread is fastest and immune to oversubscription
when the 2 CI cores are shared; each test gets one thread and the previous setting back afterwards.
Each test starts from the same global random state (seed 0), so a test that draws from torch's global generator
draws the same numbers whichever tests ran before it (a failure reproduces alone, with -k). GPU-marked tests are
skipped without CUDA.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
