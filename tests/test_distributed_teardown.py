"""``racedit.distributed``: commands leave the process group torn down, whether their body returned or raised."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from racedit.distributed import process_group_scope, teardown


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_teardown_without_a_group_is_a_no_op():
    assert not dist.is_initialized()
    teardown()
    with process_group_scope():
        pass
    assert not dist.is_initialized()


def test_scope_destroys_the_group_after_the_body(one_rank_group):
    with process_group_scope():
        assert dist.is_initialized()
    assert not dist.is_initialized()


def test_scope_destroys_the_group_when_the_body_raises(one_rank_group):
    with pytest.raises(RuntimeError, match="boom"), process_group_scope():
        raise RuntimeError("boom")
    assert not dist.is_initialized()
