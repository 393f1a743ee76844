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


def test_the_pack_is_laid_out_as_its_layout_says_whoever_built_the_batch():
    """FULL mixed graphs copy a batch's pack whole and read it on the device at the offsets
    `pack_layout` gives (the planning kernel computes the same ones): the views `build` returns
    sit there, after a header of rows, tokens and table width; a batch built field by field
    packs the same values on demand."""
    import dataclasses
    import random

    from tesela.core.forward_batch import pack_layout

    rng = random.Random(5)
    for rows in (1, 2, 3, 4, 5, 8, 9):
        prefix = [rng.randint(0, 40) for _ in range(rows)]
        new = [rng.randint(1, 9) for _ in range(rows)]
        tables = [
            list(range(1, 2 + (p + n) // 4 + rng.randint(0, 2)))
            for p, n in zip(prefix, new, strict=True)
        ]
        batch = ForwardBatch.build(
            token_ids=[[7] * n for n in new], prefix_lens=prefix, block_tables=tables,
            block_size=4, device="cpu",
        )  # fmt: skip
        pack = batch.packed
        tokens, width = batch.num_tokens, batch.block_tables.shape[1]
        assert pack[:4].tolist() == [rows, tokens, width, 0]
        fields = (batch.token_rows, batch.seq_lens, batch.prefix_lens, batch.extend_start_loc,
                  batch.block_tables)  # fmt: skip
        layout = pack_layout(rows, tokens)
        for field, at in zip(fields, layout, strict=True):
            assert field.data_ptr() == pack[at:].data_ptr()
        by_fields = dataclasses.replace(batch, packed=None).pack()
        for field, at in zip(fields, layout, strict=True):
            words = field.reshape(-1).view(torch.int32)
            assert by_fields[at : at + words.numel()].tolist() == words.tolist()
        assert by_fields[:4].tolist() == pack[:4].tolist()


@pytest.mark.parametrize("path", ["python loops", "numpy"])
def test_build_places_every_token_where_its_row_and_table_say(path, monkeypatch):
    """Random rows (prefixes crossing block boundaries, chunks of any length, tables longer
    than needed): each token's position and KV slot as a per-token walk computes them, and
    the host copies equal what was sent, whichever way `build` lays the batch out (Python
    loops for small batches, numpy for large ones)."""
    import random

    from tesela.core import forward_batch

    monkeypatch.setattr(forward_batch, "SMALL_BATCH_TOKENS", 10**9 if path == "python loops" else 0)
    rng = random.Random(3)
    for _ in range(20):
        block_size = rng.choice([1, 4, 16])
        rows = rng.randint(1, 9)
        prefix = [rng.choice([0, rng.randint(0, 70)]) for _ in range(rows)]
        new = [rng.randint(1, 40) for _ in range(rows)]
        tables = [
            rng.sample(range(1, 500), -(-(p + n) // block_size) + rng.randint(0, 2))
            for p, n in zip(prefix, new, strict=True)
        ]
        tokens = [[rng.randint(0, 999) for _ in range(n)] for n in new]
        batch = ForwardBatch.build(
            token_ids=tokens, prefix_lens=prefix, block_tables=tables,
            block_size=block_size, device="cpu",
        )  # fmt: skip
        positions = [pos for p, n in zip(prefix, new, strict=True) for pos in range(p, p + n)]
        slots = [
            table[pos // block_size] * block_size + pos % block_size
            for table, p, n in zip(tables, prefix, new, strict=True)
            for pos in range(p, p + n)
        ]
        assert batch.input_ids.tolist() == [t for row in tokens for t in row]
        assert batch.positions.tolist() == positions
        assert batch.out_cache_loc.tolist() == slots
        width = max(len(t) for t in tables)
        assert batch.block_tables.tolist() == [t + [0] * (width - len(t)) for t in tables]


def test_fed_tokens_take_their_ids_from_the_step_in_flight():
    """Overlap scheduling: a batch's fed tokens (`feed_dst`) get the ids that the in-flight
    step sampled in its rows `feed_src`, written on the device; the other tokens keep the ids
    the host sent. The feed lists travel in the batch's one pack."""
    batch = ForwardBatch.build(
        token_ids=[[5, 6, 0], [0], [9]], prefix_lens=[0, 4, 7], block_tables=[[1], [2, 3], [4, 5]],
        block_size=4, device="cpu", feed_dst=(2, 3), feed_src=(1, 0),
    )  # fmt: skip
    assert batch.feed_dst.data_ptr() > batch.packed.data_ptr()  # views of the pack
    with pytest.raises(ValueError, match="set fed_from to that step's sampled tokens"):
        batch.feed_tokens()
    batch.fed_from = torch.tensor([70, 71, 72])
    batch.feed_tokens()
    assert batch.input_ids.tolist() == [5, 6, 71, 70, 9]
    with pytest.raises(ValueError, match="feed_dst has 2 entries but feed_src 1"):
        ForwardBatch.build(
            token_ids=[[5, 6]], prefix_lens=[0], block_tables=[[1]], block_size=4,
            device="cpu", feed_dst=(0, 1), feed_src=(0,),
        )  # fmt: skip


def test_a_block_table_too_short_for_its_row_is_refused():
    with pytest.raises(ValueError, match="row 1 has 9 tokens but its block table holds 2 blocks"):
        ForwardBatch.build(
            token_ids=[[1], [2, 3]], prefix_lens=[0, 7], block_tables=[[1], [2, 3]],
            block_size=4, device="cpu",
        )  # fmt: skip


def test_a_batch_is_built_into_a_given_buffer_when_it_fits():
    """`into`: the pack is uploaded into that buffer (a FULL graph's own, so planning copies
    nothing) and every array views it; a pack that does not fit gets its own buffer."""
    buffer = torch.full((256,), -7, dtype=torch.int32)
    rows = dict(prefix_lens=[4, 9], block_tables=[[1, 2], [3, 4, 5]], block_size=4, device="cpu")
    batch = ForwardBatch.build(token_ids=[[5], [6]], into=buffer, **rows)
    assert batch.packed.data_ptr() == buffer.data_ptr()
    assert buffer[:4].tolist() == [2, 2, 3, 0]  # the header: rows, tokens, table width
    assert batch.input_ids.tolist() == [5, 6] and batch.seq_lens.tolist() == [5, 10]
    for name in ("input_ids", "seq_lens", "block_tables", "logits_indices"):
        tensor = getattr(batch, name)
        assert buffer.data_ptr() <= tensor.data_ptr() < buffer.data_ptr() + 4 * 256, name
    small = torch.zeros(8, dtype=torch.int32)
    other = ForwardBatch.build(token_ids=[[5], [6]], into=small, **rows)
    assert other.packed.data_ptr() != small.data_ptr() and small.tolist() == [0] * 8
    assert other.input_ids.tolist() == [5, 6]
