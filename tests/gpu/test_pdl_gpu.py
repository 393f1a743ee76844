"""Programmatic dependent launch on the GPU: every Triton kernel of the forward pass launched
early, in eager runs and inside CUDA graphs, gives the same bits as without it. A kernel that
read its inputs before `griddepcontrol.wait` would read the previous kernel's output half
written: logits would differ, not by a rounding step but by whole values."""

from __future__ import annotations

import pytest
import torch

from tesela import LLM, SamplingParams
from tesela.bench.decode import decode_batch
from tesela.core import pdl
from tesela.core.forward_batch import ForwardBatch
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def test_pdl_is_on_where_the_gpu_has_it():
    on, reason = pdl.status(torch.device("cuda"))
    assert on == HOPPER, reason


def _runner(config, path, *, use_pdl: bool, like: ModelRunner | None = None) -> ModelRunner:
    with pdl.forced(use_pdl):
        runner = ModelRunner(config, path)
    if like is not None:  # the same weights and the same cached KV
        runner.model.load_state_dict(like.model.state_dict())
        for mine, theirs in zip(runner.kv_cache.k_buffers + runner.kv_cache.v_buffers,
                                like.kv_cache.k_buffers + like.kv_cache.v_buffers, strict=True):  # fmt: skip
            mine.copy_(theirs)
    return runner


def _extend_batch(device) -> ForwardBatch:
    generator = torch.Generator().manual_seed(3)
    lengths, prefixes = [37, 5, 90], [0, 64, 16]
    return ForwardBatch.build(
        token_ids=[torch.randint(0, 1000, (n,), generator=generator).tolist() for n in lengths],
        prefix_lens=prefixes,
        block_tables=[list(range(1 + 16 * r, 17 + 16 * r)) for r in range(3)],
        block_size=16,
        device=device,
    )


@pytest.mark.skipif(not HOPPER, reason="PDL needs compute capability 9.0")
@torch.inference_mode()
def test_graph_and_eager_forwards_equal_bitwise_with_pdl_on_and_off():
    config, path = make_engine_config(
        "qwen3-0.6b", dtype="bfloat16", device="cuda", num_kv_tokens=8192,
        capture_sizes=[1, 4, 8, 16, 64, 128, 256],
    )  # fmt: skip
    on = _runner(config, path, use_pdl=True)
    generator = torch.Generator(device="cuda").manual_seed(0)
    for buffer in on.kv_cache.k_buffers + on.kv_cache.v_buffers:
        buffer.normal_(generator=generator)
    off = _runner(config, path, use_pdl=False, like=on)
    for batch_size in (1, 3, 8):
        batch = decode_batch(on, batch_size, 200)
        assert on.full_decode.can_run(batch) is None
        expected = off.full_decode.run(batch).clone()
        assert torch.equal(on.full_decode.run(batch), expected), batch_size
        with pdl.forced(False):
            eager_off = off.forward_eager(batch).clone()
        assert torch.equal(on.forward_eager(batch), eager_off), batch_size
    batch = _extend_batch(on.device)
    for runner_path in ("piecewise", "full_mixed"):
        graphs_on, graphs_off = getattr(on, runner_path), getattr(off, runner_path)
        if graphs_on is None or graphs_on.can_run(batch) is not None:
            continue
        assert torch.equal(graphs_on.run(batch), graphs_off.run(batch)), runner_path


@pytest.mark.skipif(not HOPPER, reason="PDL needs compute capability 9.0")
def test_greedy_generations_identical_with_pdl_on_and_off():
    prompts = [[5, 17, 42, 8, 99, 3] * 7, [7, 7, 7, 250, 13], list(range(300, 420))]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    common = dict(dtype="bfloat16", num_kv_tokens=8192, capture_sizes=[1, 4, 8, 16, 64, 128])
    llm = LLM("qwen3-0.6b", **common)
    with_pdl = [o.token_ids for o in llm.generate(prompts, params)]
    paths = llm.engine.stats()["dispatch"]["paths"]
    assert paths["full"] > 0, paths
    del llm
    with pdl.forced(False):
        llm = LLM("qwen3-0.6b", **common)
        assert [o.token_ids for o in llm.generate(prompts, params)] == with_pdl
