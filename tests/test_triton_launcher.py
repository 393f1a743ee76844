"""Cached Triton launchers (tesela/attention/triton_kernels/launcher.py) and the breakable
runner's bound split calls, on CPU.

The cached path itself needs a GPU (tests/gpu/test_triton_launcher_gpu.py); here: the
specialization key covers everything Triton specializes on (checked against Triton's own
`native_specialize_impl`), constexpr groups key on their values, a launch whose groups do not
match the kernel's parameters is refused, the interpreter falls back with a recorded reason, and
a breakable replay checks its plan once per replay, before any split call.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from interpreter import rerun_under_interpreter, triton_interpreted  # noqa: E402

from tesela.attention.base import StaleMetadataError  # noqa: E402
from tesela.attention.op import prepare_attention_replay  # noqa: E402
from tesela.attention.triton_kernels import launcher  # noqa: E402
from tesela.attention.triton_kernels.launcher import (  # noqa: E402
    CachedLauncher,
    constexpr_args,
    runtime_args,
)
from tesela.attention.triton_kernels.store_kv import _store_kv_kernel  # noqa: E402
from tesela.core.forward_batch import ForwardBatch  # noqa: E402
from tesela.engine.llm_engine import make_engine_config  # noqa: E402
from tesela.executor.model_runner import ModelRunner  # noqa: E402


def runtime_values() -> list:
    """Arguments of every kind a kernel takes, at the edges of Triton's specializations."""
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 16, 2**31, 2**31 + 1, 2**32, 2**63 - 1]
    tensors = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64):
        base = torch.zeros(64, dtype=dtype)
        tensors += [base, base[1:], base[8:], base[16:]]  # aligned and not, by byte offset
    return [*ints, 0.5, 1.0, True, False, *tensors]


def test_runtime_key_separates_whatever_triton_specializes_on():
    """Two arguments that Triton would compile differently never share a key (the key may be
    finer than Triton's: two keys can share a kernel, one key never needs two)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    values = runtime_values()
    for a, b in itertools.combinations(values, 2):
        triton_a = native_specialize_impl(BaseBackend, a, False, True, True)
        triton_b = native_specialize_impl(BaseBackend, b, False, True, True)
        if triton_a != triton_b:
            key_a, key_b = runtime_args(a).key, runtime_args(b).key
            assert key_a != key_b, (a, b, triton_a, triton_b)


def test_keys_change_with_dtype_alignment_and_constexpr_values():
    half, bf16 = torch.zeros(8, dtype=torch.float16), torch.zeros(8, dtype=torch.bfloat16)
    assert runtime_args(half).key != runtime_args(bf16).key
    assert runtime_args(half).key != runtime_args(half[1:]).key  # 2-byte offset: misaligned
    assert runtime_args(half).key == runtime_args(half[8:]).key  # 16-byte offset: aligned
    assert runtime_args(half, 16).key != runtime_args(half, 1).key != runtime_args(half, 3).key
    assert runtime_args(half, 16).key == runtime_args(half, 32).key
    assert constexpr_args(64, 32).key != constexpr_args(128, 32).key
    assert constexpr_args(True).key != constexpr_args(False).key
    # A group's key depends on its values only, so it can be computed once and reused.
    assert runtime_args(half, 16).key == runtime_args(torch.ones(8, dtype=torch.float16), 16).key


def store_groups(width: int = 32, *, block_as_runtime: bool = False):
    k = torch.randn(4, width)
    v = torch.randn(4, width)
    k_pool, v_pool = torch.zeros(16, 2, width // 2), torch.zeros(16, 2, width // 2)
    loc = torch.tensor([3, 5, 7, 9])
    constants = (runtime_args if block_as_runtime else constexpr_args)(width, 32)
    groups = (
        runtime_args(k, v, k.stride(0), v.stride(0)),
        runtime_args(k_pool, v_pool, k_pool.stride(0)),
        runtime_args(loc),
        constants,
    )
    return groups, (k, v, k_pool, v_pool, loc)


def test_a_constexpr_passed_as_a_runtime_argument_is_refused():
    """Keyed as runtime values, BLOCK=32 and BLOCK=64 would share a compiled kernel."""
    fresh = CachedLauncher(_store_kv_kernel)
    groups, _ = store_groups(block_as_runtime=True)
    with pytest.raises(TypeError, match="do not match the kernel's parameters"):
        fresh((4, 1, 1), (4, 3), *groups, num_tokens=4)
    groups, _ = store_groups()
    with pytest.raises(TypeError, match="do not match"):
        fresh((4, 1, 1), (4, 3), *groups[:3], num_tokens=4)  # a group missing


@pytest.fixture
def _interpreted():
    if not triton_interpreted():
        pytest.skip("triton was loaded without TRITON_INTERPRET: run by the fresh-process test")


def test_under_the_interpreter_launches_fall_back_with_a_reason(_interpreted):
    fresh = CachedLauncher(_store_kv_kernel)
    assert "interpreter" in fresh.fallback_reason
    assert "interpreter" in launcher.fallback_reasons["_store_kv_kernel"]
    groups, (k, v, k_pool, v_pool, loc) = store_groups()
    fresh((4, 1, 1), (4, 3), *groups, num_tokens=4)
    fresh((4, 1, 1), (4, 3), *groups, num_tokens=4)
    assert fresh.cached_keys == 0  # nothing cached: every launch went through kernel[grid]
    assert torch.equal(k_pool.view(16, -1)[loc], k) and torch.equal(v_pool.view(16, -1)[loc], v)


def test_doctor_names_the_interpreter_fallback_per_kernel(_interpreted):
    from tesela.doctor import doctor_report

    report = doctor_report("cpu")
    assert "Triton kernel launchers:" in report
    assert "_extend_kernel         kernel[grid] (kernels run under the Triton interpreter" in report


def test_in_a_fresh_interpreter_process():
    if triton_interpreted() or torch.cuda.is_available():
        pytest.skip("the interpreter tests run in this process (or need no rerun on a GPU)")
    rerun_under_interpreter(__file__, "-k", "interpreter and not fresh")


# ---- the breakable runner's bound split calls ------------------------------------------------


@pytest.fixture(scope="module")
def breakable():
    config = make_engine_config(
        "tiny", piecewise_cudagraph="breakable", num_kv_tokens=1024, max_num_batched_tokens=32
    )
    return ModelRunner(*config).piecewise


def batch_of(num_tokens: int, seed: int) -> ForwardBatch:
    tokens = torch.randint(0, 258, (num_tokens,), generator=torch.Generator().manual_seed(seed))
    return ForwardBatch.build(
        token_ids=[tokens.tolist()],
        prefix_lens=[0],
        block_tables=[list(range(1, num_tokens // 16 + 2))],
        block_size=16,
        device="cpu",
    )


def test_split_calls_are_bound_at_capture_and_prepared_once_per_replay(breakable):
    for graph in breakable.captured.values():
        assert graph.prepare is prepare_attention_replay
        assert len(graph.steps) == len(graph.splits) == len(graph.segments) - 1
    calls = []

    def counting(context):
        calls.append(context.batch.stamp)
        return prepare_attention_replay(context)

    graph = breakable.captured[breakable.padded_size(5)]
    graph.prepare = counting
    try:
        batch = batch_of(5, seed=1)
        expected = breakable.run_eager_padded(batch_of(5, seed=1))
        assert torch.equal(breakable.run(batch), expected)
    finally:
        graph.prepare = prepare_attention_replay
    assert calls == [batch.stamp]  # once for the whole forward, with the replayed batch


def test_a_replay_with_a_plan_for_another_batch_is_refused_before_any_split(breakable):
    size = breakable.padded_size(5)
    batch, stale = batch_of(5, seed=2), batch_of(6, seed=3)
    breakable.buffers.copy_from(batch, size)
    plan = breakable.planner.plan(stale)
    with pytest.raises(StaleMetadataError, match="planner.plan"), torch.inference_mode():
        breakable._replay(batch, plan, size)


def test_split_host_time_is_measured_per_split(breakable):
    seconds = breakable.split_host_seconds(batch_of(9, seed=4))
    assert 0 < seconds < 1.0


def test_groups_carry_tensor_addresses_for_the_cached_launch():
    """A cached launch hands the compiled launcher addresses, not tensors (no data_ptr() call
    and no driver pointer query per tensor and launch): each group holds them, in order, next
    to the tensors that keep the memory alive."""
    a, b = torch.zeros(8), torch.zeros(8, dtype=torch.int32)[2:]
    layer = runtime_args(a, 3, None, 0.5)
    pool = runtime_args(b)
    constants = constexpr_args(16, True)
    assert layer.raw == (a.data_ptr(), 3, None, 0.5)
    assert all(type(v) is int for v in pool.raw) and pool.raw == (b.data_ptr(),)
    assert constants.raw == constants.values == (16, True)
    joined = launcher.join(layer, pool, constants)
    assert joined.raw == layer.raw + pool.raw + constants.raw
    assert joined.values[0] is a and joined.values[4] is b  # the tensors themselves, kept
