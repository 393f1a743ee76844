"""The Triton attention backend against the torch reference, on CPU under the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported (triton.jit reads it once, when
a kernel is defined) and then holds for the whole process: every Triton kernel of every test,
inductor's included, would run in the interpreter. So this module sets it only on a machine
without CUDA, where nothing else runs Triton, and skips on CUDA machines, where
tests/gpu/test_triton_attention_gpu.py checks the compiled kernels against the same oracle.

Every case uses random data (never zeros), non-contiguous q/k/v (column slices of one fused qkv
tensor), an output that is a column slice of a NaN-poisoned buffer (every value must be written,
nothing beside it), shuffled block tables, and compares the whole KV pool after the store too.
Tiles are shrunk to 16 so that short rows still take many KV tiles, query tiles and KV splits.

bf16 is covered on GPU only: the interpreter (triton 3.6 and 3.7 at least) multiplies bf16 tiles
as their uint16 bit patterns in tl.dot. fp16 stands in for the half-precision path here.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import random
import sys

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip(
        "CUDA machine: tests/gpu/test_triton_attention_gpu.py tests the compiled kernels (the "
        "interpreter would turn every Triton kernel of this process into Python)",
        allow_module_level=True,
    )
if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from interpreter import rerun_under_interpreter

from tesela.attention.base import AttentionLayout  # noqa: E402
from tesela.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from tesela.attention.triton_backend import (  # noqa: E402
    TritonAttentionBackend,
    TritonAttentionConfig,
)
from tesela.attention.triton_kernels.extend_attention import kernels_interpreted  # noqa: E402
from tesela.core.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from tesela.core.kv_cache import DUMMY_SLOT, KVCachePool  # noqa: E402

# torch._dynamo imports triton when it is installed, so in a full test run triton may already
# be loaded without the interpreter: the kernel tests then run in a fresh process.
INTERPRETED_HERE = kernels_interpreted()


@pytest.fixture(autouse=True)
def _kernels_run_in_this_process(request):
    if not INTERPRETED_HERE and request.function is not test_in_a_fresh_interpreter_process:
        pytest.skip("triton was loaded without TRITON_INTERPRET: run by the fresh-process test")


def test_in_a_fresh_interpreter_process():
    """Run this module again where TRITON_INTERPRET=1 is set before triton is imported."""
    if INTERPRETED_HERE:
        pytest.skip("the kernel tests run in this process")
    rerun_under_interpreter(__file__)


SMALL_TILES = TritonAttentionConfig(block_m=16, block_n=16, min_split_len=4, max_kv_splits=4)
CPU = torch.device("cpu")


def make_layout(heads, kv_heads, head_dim, dtype=torch.float32, window=None):
    return AttentionLayout(heads, kv_heads, head_dim, head_dim**-0.5, dtype, CPU, window)


def make_backends(layout, block_size, num_blocks, config=SMALL_TILES, seed=0):
    """A Triton backend and the torch reference over two pools holding the same random K/V.
    The reference computes in fp32 whatever the Triton dtype: it is the exact answer."""
    generator = torch.Generator().manual_seed(seed)
    pools = [
        KVCachePool(
            num_layers=1,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim,
            dtype=dtype,
            device=CPU,
        )
        for dtype in (layout.dtype, torch.float32)
    ]
    for name in ("k_buffers", "v_buffers"):
        data = torch.randn(getattr(pools[0], name)[0].shape, generator=generator)
        getattr(pools[0], name)[0].copy_(data)
        getattr(pools[1], name)[0].copy_(getattr(pools[0], name)[0])  # same rounded values
    reference_layout = dataclasses.replace(layout, dtype=torch.float32)
    return (
        TritonAttentionBackend(layout, pools[0], config),
        TorchAttentionBackend(reference_layout, pools[1]),
    )


def make_batch(rows, block_size, num_blocks, seed=0, mode=None):
    """rows: [(prefix_len, extend_len)]; each row gets blocks drawn at random from the pool."""
    rng = random.Random(seed)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables = []
    for prefix, extend in rows:
        needed = -(-(prefix + extend) // block_size)
        tables.append([free.pop() for _ in range(needed)])
    return ForwardBatch.build(
        token_ids=[[rng.randrange(100) for _ in range(n)] for _, n in rows],
        prefix_lens=[p for p, _ in rows],
        block_tables=tables,
        block_size=block_size,
        device=CPU,
        mode=mode,
    )


def blocks_needed(rows, block_size):
    return 1 + sum(-(-(p + n) // block_size) for p, n in rows) + 2


def make_qkv(num_tokens, layout, seed=1):
    """q, k, v as column slices of one fused qkv tensor (row stride > width)."""
    heads, kv_heads, dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * dim, generator=generator)
    qkv = qkv.to(layout.dtype)
    q_width, kv_width = heads * dim, kv_heads * dim
    return (
        qkv[:, :q_width],
        qkv[:, q_width : q_width + kv_width],
        qkv[:, q_width + kv_width :],
    )


def run_triton(backend, batch, q, k, v):
    """Run the Triton backend into a column slice of a NaN-poisoned buffer; check it wrote
    every output value and nothing beside them."""
    width = q.shape[1]
    buffer = torch.full((q.shape[0], width + 8), float("nan"), dtype=q.dtype)
    out = buffer[:, 4 : 4 + width]
    backend.forward(q, k, v, out, 0, batch, backend.plan(batch))
    assert not out.isnan().any(), "the kernel left output values unwritten"
    assert buffer[:, :4].isnan().all() and buffer[:, 4 + width :].isnan().all()
    return out


def run_reference(backend, batch, q, k, v):
    out = torch.empty(q.shape, dtype=torch.float32)
    q, k, v = q.float(), k.float(), v.float()
    backend.forward(q, k, v, out, 0, batch, backend.plan(batch))
    return out


# fp32 runs ieee dots: only summation order differs from the reference. fp16: the kernel
# rounds the softmax weights (<= 1) to fp16 before P@V and rounds the output to fp16, each a
# relative error <= 2^-11; with |v| <= ~4.5 that bounds the error by ~2 * 2^-11 * 4.5 = 4.4e-3.
# A masking or paging bug moves outputs by O(1 / context) >= 1e-2 at these lengths.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}


def assert_matches_reference(layout, rows, block_size, config=SMALL_TILES, mode=None, seed=0):
    num_blocks = blocks_needed(rows, block_size)
    triton_backend, torch_backend = make_backends(layout, block_size, num_blocks, config, seed)
    batch = make_batch(rows, block_size, num_blocks, seed, mode)
    q, k, v = make_qkv(batch.num_tokens, layout, seed + 1)
    out = run_triton(triton_backend, batch, q, k, v)
    expected = run_reference(torch_backend, batch, q, k, v)
    tolerance = TOLERANCE[layout.dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)
    for name in ("k_buffers", "v_buffers"):
        pool = getattr(triton_backend.kv_cache, name)[0].float()
        torch.testing.assert_close(pool, getattr(torch_backend.kv_cache, name)[0], rtol=0, atol=0)
    return batch, triton_backend.plan(batch)


def random_rows(count, seed, max_prefix=48, max_extend=40):
    rng = random.Random(seed)
    return [(rng.randrange(max_prefix), rng.randrange(1, max_extend)) for _ in range(count)]


# (heads, kv_heads, head_dim, block_size): GQA 1, 2, 4, 8; head dims 64, 128, 32, 96.
SHAPES = [
    (4, 4, 64, 16),
    (4, 2, 64, 16),
    (8, 2, 32, 1),
    (8, 1, 128, 16),
    (2, 1, 96, 4),
]
SHAPE_IDS = ["mha-d64-b16", "gqa2-d64-b16", "gqa4-d32-b1", "gqa8-d128-b16", "gqa2-d96-b4"]


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), SHAPES, ids=SHAPE_IDS)
def test_extend_matches_reference(heads, kv_heads, head_dim, block_size):
    # Prefix 0, a prefix ending exactly at a block edge (16, 32), one ending mid-block (21),
    # extends shorter and longer than one query tile, then random rows.
    rows = [(0, 37), (16, 16), (21, 20), (32, 2), (7, 3)] + random_rows(3, seed=head_dim)
    batch, metadata = assert_matches_reference(
        make_layout(heads, kv_heads, head_dim), rows, block_size
    )
    assert batch.mode is ForwardMode.EXTEND and not metadata.use_decode_kernel


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), SHAPES, ids=SHAPE_IDS)
def test_decode_matches_reference(heads, kv_heads, head_dim, block_size):
    # Sequence lengths 1 past, at and before block edges; 9 tokens over 4 splits leaves the
    # last split empty; 2 tokens give one split of 2. Then random lengths.
    rng = random.Random(head_dim)
    prefixes = [1, 15, 16, 17, 8, 63] + [rng.randrange(1, 80) for _ in range(3)]
    batch, metadata = assert_matches_reference(
        make_layout(heads, kv_heads, head_dim), [(p, 1) for p in prefixes], block_size
    )
    assert batch.mode is ForwardMode.DECODE and metadata.use_decode_kernel
    assert metadata.num_kv_splits == SMALL_TILES.max_kv_splits  # the merge is exercised


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), SHAPES[1:4:2])
def test_mixed_matches_reference(heads, kv_heads, head_dim, block_size):
    rows = [(40, 1), (0, 23), (16, 1), (5, 30), (1, 1)]
    batch, metadata = assert_matches_reference(
        make_layout(heads, kv_heads, head_dim), rows, block_size
    )
    assert batch.mode is ForwardMode.MIXED and not metadata.use_decode_kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_default_tiles_match_reference(dtype):
    """The tiles the GPU runs (fp16: 128 query rows and 64 KV positions per tile) on rows
    longer than a query tile, and a decode batch whose split count comes from the lengths."""
    layout = make_layout(2, 1, 64, dtype=dtype)
    config = TritonAttentionConfig()
    assert_matches_reference(layout, [(70, 150), (0, 129), (64, 3)], 16, config)
    _, metadata = assert_matches_reference(layout, [(300, 1), (5, 1), (128, 1)], 16, config)
    assert metadata.num_kv_splits == 5  # 301 tokens, at least 64 per split


def test_decode_splits_are_whole_kv_tiles():
    """A row of 40 tokens may use 4 splits (at least 4 tokens each) but splits of 10 would read
    4 partial tiles of 16: it uses 3 splits of 16 (one tile each) and leaves the 4th's
    partials unwritten. Rows of 64 use all 4."""
    layout = make_layout(4, 2, 32)
    rows = [(39, 1), (63, 1)]
    num_blocks = blocks_needed(rows, 16)
    backend, _ = make_backends(layout, 16, num_blocks)
    batch = make_batch(rows, 16, num_blocks)
    metadata = backend.plan(batch)
    assert metadata.num_kv_splits == 4
    metadata.partial_lse.fill_(float("nan"))
    q, k, v = make_qkv(batch.num_tokens, layout)
    backend.forward(q, k, v, torch.empty_like(q), 0, batch, metadata)
    written = ~metadata.partial_lse.isnan()
    assert written[0, :, :3].all() and not written[0, :, 3].any()
    assert written[1].all()


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window_matches_reference(window):
    layout = make_layout(4, 2, 32, window=window)
    assert_matches_reference(layout, [(0, 37), (21, 20), (16, 1)], 4)  # extend and mixed
    assert_matches_reference(layout, [(p, 1) for p in (1, 4, 15, 16, 40, 63)], 4)  # decode


@pytest.mark.parametrize(
    "rows", [[(0, 37), (16, 16), (21, 20), (9, 1)], [(p, 1) for p in (1, 16, 37, 70)]]
)
def test_fp16_matches_fp32_reference(rows):
    assert_matches_reference(make_layout(4, 2, 64, dtype=torch.float16), rows, 16)


# FULL decode graph hooks ----------------------------------------------------------------------


def static_decode_batch(size, block_size):
    """What a decode-graph runner captures with: `size` rows of one token on the dummy block,
    whose out_cache_loc is the static buffer rewritten before each replay."""
    return ForwardBatch.build(
        token_ids=[[0]] * size,
        prefix_lens=[1] * size,
        block_tables=[[0]] * size,
        block_size=block_size,
        device=CPU,
        mode=ForwardMode.DECODE,
    )


def test_graph_replay_with_padded_rows_matches_reference():
    """Emulates a FULL decode graph on CPU: the planning prologue and the kernels are launched
    with the metadata objects of capture (the views a graph would have recorded) after planning
    copied a smaller batch's pack in; padding rows must not disturb the real rows."""
    layout, block_size, captured = make_layout(4, 2, 64), 4, 6
    rows = [(p, 1) for p in (1, 30, 8, 17)]
    num_blocks = blocks_needed(rows, block_size) + 8
    triton_backend, torch_backend = make_backends(layout, block_size, num_blocks)
    triton_backend.init_cuda_graph_state(max_batch_size=8, max_blocks_per_seq=16)
    static = static_decode_batch(captured, block_size)
    graph_metadata = triton_backend.plan_cuda_graph(static)
    assert graph_metadata.num_kv_splits == SMALL_TILES.max_kv_splits  # from 64-token context
    fed = torch.zeros(8, dtype=torch.int64)
    prologue = triton_backend.decode_graph_prologue(captured, static.token_rows, fed)

    for seed in (0, 1):  # two replays: the buffers are rewritten each time
        batch = make_batch(rows, block_size, num_blocks, seed=seed)
        q, k, v = make_qkv(captured, layout, seed=seed + 5)  # padding rows carry data too
        replay_metadata = triton_backend.plan_cuda_graph(batch)
        assert replay_metadata.stamp == batch.stamp
        prologue()  # "graph replay": the batch's slots, lengths and tables, then attention
        assert torch.equal(static.out_cache_loc[: batch.num_tokens], batch.out_cache_loc)

        buffer = torch.full((captured, q.shape[1]), float("nan"))
        triton_backend.forward(q, k, v, buffer, 0, static, graph_metadata)  # "graph replay"
        real = [t[: batch.num_tokens] for t in (q, k, v)]
        expected = run_reference(torch_backend, batch, *real)
        torch.testing.assert_close(buffer[: batch.num_tokens], expected, rtol=1e-5, atol=1e-5)
        assert not buffer.isnan().any()  # padding rows attend to the dummy slot
        for name in ("k_buffers", "v_buffers"):
            got = getattr(triton_backend.kv_cache, name)[0][1:]  # all but the dummy slot
            torch.testing.assert_close(got, getattr(torch_backend.kv_cache, name)[0][1:])


def test_a_decode_graph_reads_fed_ids_from_the_in_flight_step():
    """Overlap scheduling: a decode batch whose tokens are still being sampled by the step in
    flight carries their source rows in its pack (token_src); the FULL decode graph's first
    kernel takes those ids from the persistent buffer of that step's sampled tokens, and the
    host's ids for the others, with no op before the replay."""
    layout = make_layout(2, 1, 32)
    triton_backend, _ = make_backends(layout, 4, 32)
    triton_backend.init_cuda_graph_state(max_batch_size=4, max_blocks_per_seq=8)
    batch = ForwardBatch.build(
        token_ids=[[0], [11], [0]], prefix_lens=[5, 9, 3], block_tables=[[1, 2], [3, 4, 5], [6]],
        block_size=4, device=CPU, feed_dst=(2, 0), feed_src=(0, 3),
    )  # fmt: skip
    fed = torch.tensor([70, 71, 72, 73], dtype=torch.int64)  # the in-flight step's tokens
    tokens = torch.full((3, 4), 99, dtype=torch.int64)
    triton_backend.plan_cuda_graph(batch)
    triton_backend.decode_graph_prologue(4, tokens, fed)()
    assert tokens[0].tolist() == [73, 11, 70, 0]  # fed, host, fed, padding
    assert tokens[1, :3].tolist() == [5, 9, 3]


def test_graph_buffers_pad_rows_to_the_dummy_block():
    layout = make_layout(2, 1, 32)
    triton_backend, _ = make_backends(layout, 4, 32)
    triton_backend.init_cuda_graph_state(max_batch_size=5, max_blocks_per_seq=8)
    state = triton_backend.graph_state
    state.seq_lens.fill_(99)
    state.block_tables.fill_(7)
    tokens = torch.full((3, 6), 99, dtype=torch.int64)
    batch = make_batch([(5, 1), (9, 1)], 4, 32)
    metadata = triton_backend.plan_cuda_graph(batch)
    assert state.seq_lens.tolist() == [99] * 5  # planning only copies the pack in
    triton_backend.decode_graph_prologue(4, tokens, torch.zeros(5, dtype=torch.int64))()
    assert state.seq_lens.tolist() == [6, 10, 1, 1, 99]  # padding rows up to the graph's size
    assert state.block_tables[:2, :3].tolist() == batch.block_tables.tolist()
    assert state.block_tables[2:4, 0].tolist() == [0, 0]  # the dummy block
    assert state.block_tables[4].tolist() == [7] * 8
    assert torch.equal(tokens[:, :2], batch.token_rows)
    assert tokens[:, 2:4].tolist() == [[0, 0], [0, 0], [DUMMY_SLOT, DUMMY_SLOT]]
    assert tokens[:, 4:].tolist() == [[99, 99]] * 3
    assert metadata.seq_lens.data_ptr() == state.seq_lens.data_ptr()
    assert metadata.partial_out.data_ptr() == state.partial_out.data_ptr()


def test_graph_hooks_refuse_what_they_cannot_serve():
    layout = make_layout(2, 1, 32)
    triton_backend, _ = make_backends(layout, 4, 32)
    with pytest.raises(RuntimeError, match="init_cuda_graph_state"):
        triton_backend.plan_cuda_graph(static_decode_batch(2, 4))
    triton_backend.init_cuda_graph_state(max_batch_size=2, max_blocks_per_seq=2)
    with pytest.raises(ValueError, match="hold 2 rows of 2 blocks"):
        triton_backend.plan_cuda_graph(static_decode_batch(3, 4))
    with pytest.raises(ValueError, match="2 rows of 2 blocks"):
        triton_backend.plan_cuda_graph(make_batch([(9, 1)], 4, 32))
    with pytest.raises(ValueError, match="one new token per row"):
        triton_backend.plan_cuda_graph(make_batch([(0, 3)], 4, 32))


# User errors and packaging --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (make_layout(6, 4, 32), "multiple of num_kv_heads"),
        (make_layout(2, 1, 512), "head_dim up to 256"),
        (make_layout(2, 1, 32, dtype=torch.float64), "supports dtypes"),
        (make_layout(2, 1, 32, window=0), "sliding_window"),
    ],
)
def test_unsupported_layouts_raise_clear_errors(layout, message):
    pool = KVCachePool(
        num_layers=1,
        num_blocks=4,
        block_size=4,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=layout.dtype,
        device=CPU,
    )
    with pytest.raises(ValueError, match=message):
        TritonAttentionBackend(layout, pool)


def test_kv_pool_in_another_dtype_is_refused():
    layout = make_layout(2, 1, 32)
    pool = KVCachePool(
        num_layers=1,
        num_blocks=4,
        block_size=4,
        num_kv_heads=1,
        head_dim=32,
        dtype=torch.float16,
        device=CPU,
    )
    with pytest.raises(ValueError, match="model dtype"):
        TritonAttentionBackend(layout, pool)


def test_bad_tile_config_is_refused():
    with pytest.raises(ValueError, match="power of two >= 16"):
        TritonAttentionConfig(block_n=24)


def test_import_without_triton_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, "tesela.attention.triton_backend")
    with pytest.raises(ImportError, match="pip install triton"):
        importlib.import_module("tesela.attention.triton_backend")


def test_tiled_programs_walk_every_tile_of_a_table_longer_than_the_grid():
    """FULL graphs launch `tile_programs` programs per head over a tile table (the worst case
    of the captured size): with many short rows each program walks several tiles, and every
    output equals the untiled launch's, bit for bit."""
    from tesela.attention.triton_kernels import PagedAttentionShape
    from tesela.attention.triton_kernels.extend_attention import (
        ExtendConfig,
        extend_attention,
        tile_programs,
        tile_table,
    )

    rng = random.Random(5)
    rows = [(rng.randrange(40), rng.randrange(1, 6)) for _ in range(24)] + [(3, 40)]
    heads, kv_heads, head_dim, page = 4, 2, 32, 16
    shape = PagedAttentionShape(heads, kv_heads, head_dim, page, head_dim**-0.5)
    config = ExtendConfig(16, 16, num_warps=4, num_stages=1)
    prefixes, lens = [p for p, _ in rows], [n for _, n in rows]
    tokens, blocks = sum(lens), max(-(-(p + n) // page) for p, n in rows)
    generator = torch.Generator().manual_seed(1)
    pool_shape = (len(rows) * blocks * page, kv_heads, head_dim)
    k_pool, v_pool = (torch.randn(pool_shape, generator=generator) for _ in range(2))
    tables = torch.arange(len(rows) * blocks, dtype=torch.int32).view(len(rows), blocks)
    q = torch.randn(tokens, heads * head_dim, generator=generator)
    seq_lens = torch.tensor([p + n for p, n in rows], dtype=torch.int32)
    prefix_lens = torch.tensor(prefixes, dtype=torch.int32)
    starts = torch.tensor([sum(lens[:i]) for i in range(len(rows))], dtype=torch.int32)
    table = tile_table(lens, prefixes, config.block_m)
    num_tiles = len(table) // 2 + 7  # absent entries past the batch's, as in a graph's table
    tiles = torch.full((num_tiles, 2), -1, dtype=torch.int32)
    tiles.view(-1)[: len(table)] = torch.tensor(table, dtype=torch.int32)
    captured_size = 32  # the grid a 32-token graph launches: 2 + 16 programs per head
    assert tile_programs(num_tiles, captured_size, config.block_m) < len(table) // 2
    args = (k_pool, v_pool, tables, seq_lens, prefix_lens, starts)
    untiled, tiled = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    extend_attention(q, untiled, *args, shape=shape, max_extend_len=max(lens), config=config)
    extend_attention(q, tiled, *args, shape=shape, max_extend_len=captured_size,
                     config=config, tiles=tiles)  # fmt: skip
    assert not untiled.isnan().any()
    assert torch.equal(tiled, untiled)


def test_absent_entries_use_no_split():
    """A FULL mixed graph's absent decode entries (row -1, length 0) use no split: they write
    nothing, and no split length of 0 is divided by (numpy raises that here: on a GPU the
    quotient is undefined and an absent entry could run)."""
    import numpy as np

    from tesela.attention.triton_kernels.decode_attention import decode_attention

    layout = make_layout(4, 2, 32)
    rows = [(20, 1), (40, 1)]
    num_blocks = blocks_needed(rows, 16)
    backend, _ = make_backends(layout, 16, num_blocks)
    batch = make_batch(rows, 16, num_blocks)
    q, k, v = make_qkv(batch.num_tokens, layout)
    expected = run_triton(backend, batch, q, k, v)  # stores the new K/V too
    metadata = backend.plan(batch)
    entries = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
    splits = metadata.num_kv_splits
    partial_out = torch.full((4, layout.num_heads, splits, 32), float("nan"))
    partial_lse = torch.full((4, layout.num_heads, splits), float("nan"))
    out = torch.full_like(q, float("nan"))
    pool = backend.kv_cache
    with np.errstate(divide="raise"):
        decode_attention(
            q, out, pool.k_buffers[0], pool.v_buffers[0], metadata.block_tables,
            metadata.seq_lens, partial_out, partial_lse, shape=backend.shape,
            num_kv_splits=splits, min_split_len=backend.config.min_split_len,
            config=backend.decode_config, entry_rows=entries, entry_tokens=entries,
        )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert partial_lse[[1, 3]].isnan().all() and not partial_lse[0, :, 0].isnan().any()
