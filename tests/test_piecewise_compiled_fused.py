"""Compiled pieces with the fused kernels on: eager pieces run exactly the eager model's kernels.

The fused Triton kernels (tesela/layers/fused.py) and the small-M GEMV dispatch
(tesela/layers/gemv.py) run here on CPU tensors under TRITON_INTERPRET=1. The compiled runner
with `eager` pieces must trace them as opaque `tesela::` custom ops (not the PyTorch ops they
replace), once for every token count, so that a replay equals the eager forward bit for bit.
The same check on CUDA is in tests/gpu/test_piecewise_compiled_gpu.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner
from tesela.layers import fused
from tesela.layers.gemv import _device_table

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (set by .ci/run)"
)

SIZES = [8, 16, 32]
# A short FULL decode ladder: the Triton interpreter is slow and these tests replay pieces.
COMMON = dict(num_kv_tokens=1024, max_num_batched_tokens=32, capture_sizes=SIZES, max_num_seqs=2)
FUSED_OPS = {"rms_norm", "add_rms_norm", "qk_norm_rope", "rotary", "silu_and_mul"}
GEMV_OPS = {"linear", "silu_linear", "norm_linear", "add_norm_linear"}


@pytest.fixture(scope="module")
def fused_on_cpu():
    fused.set_fused_enabled(True, on_cpu=True)
    try:
        yield
    finally:
        fused.set_fused_enabled(True)


@pytest.fixture(scope="module")
def runners(fused_on_cpu):
    return None, ModelRunner(*make_engine_config("tiny", piecewise_cudagraph="compiled", **COMMON))


def batch(num_tokens: int):
    from tests.test_piecewise_compiled import random_batch

    return random_batch(num_tokens, seed=num_tokens)


def traced_tesela_ops(runner: ModelRunner) -> set[str]:
    split = runner.piecewise.pieces.split
    names = set()
    for name in split.piece_names:
        for node in split.submodule(name).graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("tesela."):
                names.add(str(node.target).split(".")[1])
    return names


def test_eager_pieces_trace_the_fused_kernels_as_custom_ops(runners):
    _, compiled = runners
    traced = traced_tesela_ops(compiled)
    # Every layer runs add+norm (inside norm_linear), q/k norm + rotary and SiLU-mul (inside
    # silu_linear); the GEMV choice is made inside the op at run time.
    assert {"qk_norm_rope", "norm_linear", "add_norm_linear", "silu_linear", "linear"} <= traced
    assert traced <= FUSED_OPS | GEMV_OPS
    assert _device_table("cpu", "float32") == {}  # CPU has no GEMV table: cuBLAS-equivalent


def test_replay_equals_eager_with_fused_kernels_bitwise(runners):
    _, compiled = runners
    piecewise = compiled.piecewise
    for n in (3, 16, 17):
        got = compiled.dispatcher.run(batch(n))
        assert torch.equal(got, piecewise.run_eager_padded(batch(n))), n
    assert piecewise.pieces.num_compiles == 1  # no guard on the token count at 16


def test_inductor_pieces_still_trace_the_pytorch_ops(fused_on_cpu):
    runner = ModelRunner(
        *make_engine_config(
            "tiny", piecewise_cudagraph="compiled", piecewise_compiler="inductor", **COMMON
        )
    )
    assert traced_tesela_ops(runner) == set()
