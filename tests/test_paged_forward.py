"""The paged KV cache: prefill-then-decode and chunked prefill equal one full forward."""

from __future__ import annotations

import pytest
import torch

from tesela.attention.base import StaleMetadataError
from tesela.core.forward_batch import ForwardBatch
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner


@pytest.fixture(scope="module")
def runner(checkpoints):
    path, _ = checkpoints["qwen3"]
    config, path = make_engine_config(str(path), dtype="float32", num_kv_tokens=2048, block_size=4)
    return ModelRunner(config, path)


def all_logits(runner, token_ids, prefix_len, blocks, block_size=4):
    """Logits of every new token of one row."""
    n = len(token_ids)
    batch = ForwardBatch.build(
        token_ids=[token_ids],
        prefix_lens=[prefix_len],
        block_tables=[blocks],
        block_size=block_size,
        device="cpu",
    )
    batch.logits_indices = torch.arange(n)
    return runner.forward(batch)


def test_chunked_prefill_and_decode_equal_one_forward(runner):
    torch.manual_seed(0)
    tokens = torch.randint(0, 320, (29,)).tolist()
    blocks_a, blocks_b = list(range(1, 9)), list(range(20, 28))
    full = all_logits(runner, tokens, 0, blocks_a)
    # Odd chunk boundaries: mid-block, exactly at a block edge, single tokens (decode steps).
    pieces, start = [], 0
    for size in [3, 5, 1, 7, 4, 1, 1, 6, 1]:
        pieces.append(all_logits(runner, tokens[start : start + size], start, blocks_b))
        start += size
    assert start == len(tokens)
    torch.testing.assert_close(torch.cat(pieces), full, rtol=1e-5, atol=1e-5)


def test_rows_of_a_batch_do_not_see_each_other(runner):
    torch.manual_seed(1)
    a, b = torch.randint(0, 320, (9,)).tolist(), torch.randint(0, 320, (14,)).tolist()
    alone_a = all_logits(runner, a, 0, [1, 2, 3])[-1]
    alone_b = all_logits(runner, b, 0, [4, 5, 6, 7])[-1]
    batch = ForwardBatch.build(
        token_ids=[a, b],
        prefix_lens=[0, 0],
        block_tables=[[8, 9, 10], [11, 12, 13, 14]],
        block_size=4,
        device="cpu",
    )
    both = runner.forward(batch)
    torch.testing.assert_close(both[0], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], alone_b, rtol=1e-5, atol=1e-5)


def test_attention_without_planned_metadata_raises(runner):
    batch = ForwardBatch.build(
        token_ids=[[1, 2, 3]], prefix_lens=[0], block_tables=[[1]], block_size=4, device="cpu"
    )
    other = ForwardBatch.build(
        token_ids=[[1, 2, 3, 4, 5]],
        prefix_lens=[0],
        block_tables=[[1, 2]],
        block_size=4,
        device="cpu",
    )
    from tesela.core.forward_context import forward_context

    plan = runner.planner.plan(other)
    stale = forward_context(batch, plan, runner.attn_backend)
    with pytest.raises(StaleMetadataError) as error, stale:
        runner.model(batch.input_ids, batch.positions)
    message = str(error.value)
    assert f"batch #{batch.batch_id}" in message and f"batch #{other.batch_id}" in message
    assert "planner.plan(batch)" in message


def test_forward_contexts_refuse_nesting(runner):
    from tesela.core.forward_context import forward_context

    batch = ForwardBatch.build(
        token_ids=[[1]], prefix_lens=[0], block_tables=[[1]], block_size=4, device="cpu"
    )
    plan = runner.planner.plan(batch)
    outer = forward_context(batch, plan, runner.attn_backend)
    with (
        outer,
        pytest.raises(RuntimeError, match="nest"),
        forward_context(batch, plan, runner.attn_backend),
    ):
        pass
    with forward_context(batch, plan, runner.attn_backend):  # restored after the error
        pass


def test_batch_metadata_travels_packed_with_each_array_16_byte_aligned():
    """ForwardBatch.build sends its host lists in one copy per dtype: every array is a view of
    the packed buffer holding its own values, starting on a 16-byte boundary (the alignment
    kernels specialise on), and writing one never touches another."""
    from tesela.core.forward_batch import ForwardBatch

    batch = ForwardBatch.build(
        token_ids=[[5, 6, 7], [8]], prefix_lens=[0, 4], block_tables=[[1], [2, 3]],
        block_size=4, device="cpu",
    )  # fmt: skip
    assert batch.input_ids.tolist() == [5, 6, 7, 8]
    assert batch.positions.tolist() == [0, 1, 2, 4]
    assert batch.out_cache_loc.tolist() == [4, 5, 6, 12]
    assert batch.seq_lens.tolist() == [3, 5] and batch.prefix_lens.tolist() == [0, 4]
    assert batch.extend_start_loc.tolist() == [0, 3]
    assert batch.block_tables.tolist() == [[1, 0], [2, 3]]
    assert batch.logits_indices.tolist() == [2, 3]
    for name in ("input_ids", "positions", "out_cache_loc", "logits_indices", "seq_lens",
                 "prefix_lens", "extend_start_loc", "block_tables"):  # fmt: skip
        assert getattr(batch, name).data_ptr() % 16 == 0, name
    batch.seq_lens.fill_(-1)
    assert batch.prefix_lens.tolist() == [0, 4] and batch.extend_start_loc.tolist() == [0, 3]


def test_block_tables_on_the_host_whoever_built_the_batch():
    """`build` keeps the host copy it sent (FULL mixed planning stages it with no device
    read); a batch built field by field copies its tables once, when first asked."""
    import dataclasses

    from tesela.core.forward_batch import ForwardBatch

    batch = ForwardBatch.build(
        token_ids=[[5, 6, 7], [8]], prefix_lens=[0, 4], block_tables=[[1], [2, 3]],
        block_size=4, device="cpu",
    )  # fmt: skip
    assert batch.host_block_tables() is batch.block_tables_cpu
    assert batch.host_block_tables().tolist() == [[1, 0], [2, 3]]
    by_fields = dataclasses.replace(batch, block_tables_cpu=None)
    tables = by_fields.host_block_tables()
    assert tables.tolist() == [[1, 0], [2, 3]] and by_fields.host_block_tables() is tables
