"""The custom all-reduce policy (tesela/distributed/custom_all_reduce.py): which reduction a
tensor-parallel group uses and why. The kernels themselves need two GPUs with peer access
(tests/gpu/test_tensor_parallel_gpu.py::test_custom_all_reduce_equals_nccl)."""

import pytest
import torch

from tesela.distributed.custom_all_reduce import (
    ONE_SHOT_MAX_BYTES,
    TWO_SHOT_MAX_BYTES,
    algorithm_for,
    choose_all_reduce,
)


def choose(**kwargs):
    args = dict(device_type="cuda", world_size=2, enabled=True, env={})
    return choose_all_reduce(**{**args, **kwargs})


def test_symmetric_memory_where_every_condition_holds():
    choice = choose(env={"LOCAL_WORLD_SIZE": "2"})
    assert choice.kind == "symm_mem" and "one-shot" in choice.reason


@pytest.mark.parametrize(
    ("kwargs", "kind", "why"),
    [
        (dict(device_type="cpu"), "gloo", "gloo"),
        (dict(world_size=1), "nccl", "single rank"),
        (dict(enabled=False), "nccl", "--custom-all-reduce turns it on"),
        (dict(world_size=16), "nccl", "NVLink domain"),
        (dict(world_size=4, env={"LOCAL_WORLD_SIZE": "2"}), "nccl", "several hosts"),
    ],
)
def test_every_fallback_says_why(kwargs, kind, why):
    choice = choose(**kwargs)
    assert choice.kind == kind and why in choice.reason


def test_algorithm_by_message_size():
    def rows(n, dtype=torch.bfloat16, hidden=4096):
        return torch.empty(n, hidden, dtype=dtype)

    assert algorithm_for(rows(1)) == "one_shot"  # a decode step at batch 1: 8 KiB
    assert algorithm_for(rows(ONE_SHOT_MAX_BYTES // 8192)) == "one_shot"
    assert algorithm_for(rows(ONE_SHOT_MAX_BYTES // 8192 + 1)) == "two_shot"
    assert algorithm_for(rows(TWO_SHOT_MAX_BYTES // 8192)) == "two_shot"
    assert algorithm_for(rows(TWO_SHOT_MAX_BYTES // 8192 + 1)) == "nccl"  # prefill: NCCL's ring
    assert algorithm_for(rows(4, torch.float32)) == "one_shot"
    assert algorithm_for(rows(4, torch.float16)) == "nccl"  # no fp16 one-shot kernel
    # Layouts and types the kernels do not take go to NCCL, never to a wrong reduction.
    assert algorithm_for(rows(4).t()) == "nccl"
    assert algorithm_for(torch.empty(4, 8, dtype=torch.int32)) == "nccl"
    assert algorithm_for(rows(0)) == "nccl"


def test_a_cpu_group_reports_its_reduction():
    """A gloo group of one process still goes through the agreement and names its choice."""
    from tesela.distributed.group import (
        destroy_distributed,
        free_port,
        init_distributed,
        rendezvous_env,
    )

    tp = init_distributed(device="cpu", env=rendezvous_env(0, 1, free_port()))
    try:
        assert tp.all_reduce.kind == "gloo"
        x = torch.ones(3)
        assert tp.all_reduce_(x) is x
    finally:
        destroy_distributed()
