"""The Triton attention backend compiled on CUDA, against the torch reference at serving sizes.

Contexts up to 4096, head dims 64/96/128/256, GQA 1..8, page sizes 1 and 16, in bf16, fp16 and
fp32, for EXTEND, DECODE and MIXED batches; then a FULL decode CUDA graph captured once and
replayed for new batches. The reference is the torch backend in fp32 with SDPA's math kernel
(exact fp32, no TF32) on the same (rounded) inputs. Outputs are column slices of NaN-poisoned
buffers: every value must be written and nothing beside them.

Tolerances. fp32: the kernels use ieee (not TF32) dots, only the summation order differs: 1e-4.
fp16 / bf16: inputs are the same rounded values on both sides; the kernel rounds the softmax
weights (<= 1) to the half type before P@V and rounds the output, each a relative error of at
most u = 2^-11 (fp16) / 2^-8 (bf16). With |v| <= ~5 the error is at most ~5u + u|o|: 3e-3
(fp16) / 2.5e-2 (bf16) in the worst case, far less on average. We ask 5e-3 / 3e-2 (atol and
rtol). At a 4096-token context a masking off-by-one moves an output by only ~1/4096, so the
fp32 cases at the same sizes are the ones that catch such bugs; the half cases check the
tensor-core path.
"""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
if not torch.cuda.is_available():
    # Before importing triton: on CPU, tests/test_triton_attention.py must be the first to
    # import it, with TRITON_INTERPRET=1.
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from tesela.attention.base import AttentionLayout  # noqa: E402
from tesela.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from tesela.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from tesela.attention.triton_kernels.extend_attention import kernels_interpreted  # noqa: E402
from tesela.core.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from tesela.core.kv_cache import DUMMY_SLOT, KVCachePool  # noqa: E402

if kernels_interpreted():
    pytest.skip(
        "TRITON_INTERPRET=1 is set: these tests check the compiled kernels",
        allow_module_level=True,
    )

DEVICE = torch.device("cuda")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def make_layout(heads, kv_heads, head_dim, dtype, window=None):
    return AttentionLayout(heads, kv_heads, head_dim, head_dim**-0.5, dtype, DEVICE, window)


def make_pool(layout, block_size, num_blocks, dtype):
    return KVCachePool(
        num_layers=1,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=dtype,
        device=DEVICE,
    )


def make_backends(layout, block_size, num_blocks, seed=0):
    """The Triton backend and the fp32 torch reference over pools holding the same K/V."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    pool = make_pool(layout, block_size, num_blocks, layout.dtype)
    reference_pool = make_pool(layout, block_size, num_blocks, torch.float32)
    for name in ("k_buffers", "v_buffers"):
        buffer = getattr(pool, name)[0]
        buffer.copy_(torch.randn(buffer.shape, generator=generator, device=DEVICE))
        getattr(reference_pool, name)[0].copy_(buffer)
    reference_layout = dataclasses.replace(layout, dtype=torch.float32)
    return (
        TritonAttentionBackend(layout, pool),
        TorchAttentionBackend(reference_layout, reference_pool),
    )


def make_batch(rows, block_size, num_blocks, seed=0, mode=None):
    """rows: [(prefix_len, extend_len)]; each row gets blocks drawn at random from the pool."""
    rng = random.Random(seed)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-(p + n) // block_size))] for p, n in rows]
    return ForwardBatch.build(
        token_ids=[[rng.randrange(100) for _ in range(n)] for _, n in rows],
        prefix_lens=[p for p, _ in rows],
        block_tables=tables,
        block_size=block_size,
        device=DEVICE,
        mode=mode,
    )


def blocks_needed(rows, block_size):
    return 1 + sum(-(-(p + n) // block_size) for p, n in rows) + 2


def make_qkv(num_tokens, layout, seed=1):
    """q, k, v as column slices of one fused qkv tensor (row stride > width). q is scaled up so
    the softmax is peaked rather than nearly uniform over thousands of positions."""
    heads, kv_heads, dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * dim, generator=generator, device=DEVICE)
    q_width, kv_width = heads * dim, kv_heads * dim
    qkv[:, :q_width] *= 3
    qkv = qkv.to(layout.dtype)
    return qkv[:, :q_width], qkv[:, q_width : q_width + kv_width], qkv[:, q_width + kv_width :]


def poisoned_out(num_tokens, width, dtype):
    buffer = torch.full((num_tokens, width + 8), float("nan"), dtype=dtype, device=DEVICE)
    return buffer, buffer[:, 4 : 4 + width]


def run_triton(backend, batch, q, k, v):
    buffer, out = poisoned_out(q.shape[0], q.shape[1], q.dtype)
    backend.forward(q, k, v, out, 0, batch, backend.plan(batch))
    torch.cuda.synchronize()
    assert not out.isnan().any(), "the kernel left output values unwritten"
    assert buffer[:, :4].isnan().all() and buffer[:, 4 + q.shape[1] :].isnan().all()
    return out


def run_reference(backend, batch, q, k, v):
    """The torch backend in exact fp32: SDPA's math kernel, matmuls without TF32 (whatever an
    earlier test set)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=DEVICE)
    q, k, v = q.float(), k.float(), v.float()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with sdpa_kernel(SDPBackend.MATH):
            backend.forward(q, k, v, out, 0, batch, backend.plan(batch))
    finally:
        torch.set_float32_matmul_precision(precision)
    return out


def assert_matches_reference(layout, rows, block_size, mode=None, seed=0):
    num_blocks = blocks_needed(rows, block_size)
    triton_backend, torch_backend = make_backends(layout, block_size, num_blocks, seed)
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


# (heads, kv_heads, head_dim, block_size)
SHAPES = [
    (8, 8, 64, 16),  # MHA
    (16, 8, 128, 16),  # GQA 2
    (32, 8, 128, 1),  # GQA 4, one token per block
    (16, 2, 64, 16),  # GQA 8
    (8, 2, 96, 16),  # head_dim masked to 128
    (8, 4, 256, 16),  # the widest head
]
SHAPE_IDS = ["mha-d64", "gqa2-d128", "gqa4-d128-b1", "gqa8-d64", "gqa4-d96", "gqa2-d256"]


def random_rows(count, seed, max_prefix, max_extend):
    rng = random.Random(seed)
    return [(rng.randrange(max_prefix), rng.randrange(1, max_extend)) for _ in range(count)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), SHAPES, ids=SHAPE_IDS)
def test_extend_matches_reference(heads, kv_heads, head_dim, block_size, dtype):
    # A full 4096-token prefill, a chunk ending at 4096 after a prefix ending on a block edge,
    # prefixes ending mid-block, short chunks, random rows.
    rows = [(0, 4096), (3072, 1024), (1000, 333), (16, 2), (17, 129)]
    rows += random_rows(3, seed=head_dim, max_prefix=2048, max_extend=700)
    batch, metadata = assert_matches_reference(
        make_layout(heads, kv_heads, head_dim, dtype), rows, block_size
    )
    assert batch.mode is ForwardMode.EXTEND and not metadata.use_decode_kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"), SHAPES, ids=SHAPE_IDS)
def test_decode_matches_reference(heads, kv_heads, head_dim, block_size, dtype):
    rng = random.Random(head_dim + block_size)
    prefixes = [4095, 1, 15, 16, 17, 128, 129, 2048] + [rng.randrange(1, 4095) for _ in range(24)]
    batch, metadata = assert_matches_reference(
        make_layout(heads, kv_heads, head_dim, dtype), [(p, 1) for p in prefixes], block_size
    )
    assert batch.mode is ForwardMode.DECODE and metadata.use_decode_kernel


@pytest.mark.parametrize("batch_size", [1, 3])
def test_long_context_small_batch_decode_uses_splits(batch_size):
    """The bandwidth-critical case: few rows, long contexts, many KV splits."""
    layout = make_layout(32, 8, 128, torch.float32)
    rows = [(4095 - 100 * i, 1) for i in range(batch_size)]
    _, metadata = assert_matches_reference(layout, rows, 16)
    assert metadata.num_kv_splits > 1


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mixed_matches_reference(dtype):
    rows = [(4000, 1), (0, 700), (2048, 1), (100, 96), (1, 1), (3000, 1096)]
    batch, _ = assert_matches_reference(make_layout(16, 4, 128, dtype), rows, 16)
    assert batch.mode is ForwardMode.MIXED


@pytest.mark.parametrize("window", [1, 100, 1024])
def test_sliding_window_matches_reference(window):
    layout = make_layout(16, 4, 128, torch.float32, window=window)
    assert_matches_reference(layout, [(0, 2000), (1500, 600), (3000, 1)], 16)
    assert_matches_reference(layout, [(p, 1) for p in (1, 99, 100, 101, 1023, 1024, 4095)], 16)


# FULL decode CUDA graph ------------------------------------------------------------------------


def static_decode_batch(size, block_size):
    """What a decode-graph runner captures with: `size` one-token rows on the dummy block."""
    return ForwardBatch.build(
        token_ids=[[0]] * size,
        prefix_lens=[1] * size,
        block_tables=[[0]] * size,
        block_size=block_size,
        device=DEVICE,
        mode=ForwardMode.DECODE,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_cuda_graph_replay_equals_eager(dtype):
    """Capture the decode forward once at batch size 8, its planning prologue first; replay it
    for new batches of 5 and 8 rows (new lengths, new block tables, new KV slots) after
    planning copied each batch's pack in. The replay must equal the same kernels run eagerly,
    and the reference."""
    layout, block_size, captured, max_blocks = make_layout(32, 8, 128, dtype), 16, 8, 256
    num_blocks = 1 + captured * max_blocks
    triton_backend, torch_backend = make_backends(layout, block_size, num_blocks)
    triton_backend.init_cuda_graph_state(max_batch_size=16, max_blocks_per_seq=max_blocks)
    static = static_decode_batch(captured, block_size)
    q, k, v = make_qkv(captured, layout, seed=3)  # static inputs: the graph reads these
    buffer, out = poisoned_out(captured, q.shape[1], dtype)

    # Warm up as the decode-graph runner does: eagerly, with metadata planned for the static
    # batch (one split, a 1-column table). The capture must then find every kernel compiled.
    eager_metadata = triton_backend.plan(static)
    triton_backend.forward(q, k, v, out, 0, static, eager_metadata)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    metadata = triton_backend.plan_cuda_graph(static)
    fed = torch.zeros(16, dtype=torch.int64, device="cuda")
    prologue = triton_backend.decode_graph_prologue(captured, static.token_rows, fed)
    prologue()  # compiled before the capture
    with torch.cuda.graph(graph):
        prologue()  # the replayed batch's slots, lengths and block tables, from its pack
        triton_backend.forward(q, k, v, out, 0, static, metadata)

    for seed, prefixes in enumerate(
        [[4095, 7, 300, 16, 2000], [1, 3000, 15, 4000, 64, 17, 999, 2]]
    ):
        batch = make_batch([(p, 1) for p in prefixes], block_size, num_blocks, seed=seed)
        n = batch.num_tokens
        new_q, new_k, new_v = make_qkv(captured, layout, seed=10 + seed)
        for static_tensor, new in zip((q, k, v), (new_q, new_k, new_v), strict=True):
            static_tensor.copy_(new)  # padding rows get data too: it must not matter
        pool = triton_backend.kv_cache
        pools_before = [pool.k_buffers[0].clone(), pool.v_buffers[0].clone()]
        replay_metadata = triton_backend.plan_cuda_graph(batch)
        assert replay_metadata.stamp == batch.stamp
        buffer.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        assert not replayed.isnan().any()
        assert torch.equal(static.out_cache_loc[:n], batch.out_cache_loc)
        assert (static.out_cache_loc[n:] == DUMMY_SLOT).all()  # padding rows: the dummy slot

        # The same kernels eagerly, with the capture metadata, on the pools as they were.
        pool.k_buffers[0].copy_(pools_before[0])
        pool.v_buffers[0].copy_(pools_before[1])
        triton_backend.forward(q, k, v, out, 0, static, metadata)
        torch.cuda.synchronize()
        # Real rows only: padding rows all write the dummy slot, so which one lands there (and
        # what padding rows then read) is a race by design; their outputs are never used.
        torch.testing.assert_close(replayed[:n], out[:n], rtol=0, atol=0)

        expected = run_reference(torch_backend, batch, new_q[:n], new_k[:n], new_v[:n])
        tolerance = TOLERANCE[dtype]
        torch.testing.assert_close(replayed[:n].float(), expected, rtol=tolerance, atol=tolerance)


def test_batch1_decode_bandwidth():
    """Batch-1 decode over a 32k context must stream the KV cache, not crawl through it: a
    loose floor (20% of an H100's 3.35 TB/s) catches a kernel that lost its split-KV
    parallelism. Run with -s to see the number."""
    context, block_size = 32768, 16
    layout = make_layout(32, 8, 128, torch.bfloat16)
    num_blocks = 2 + context // block_size
    pool = make_pool(layout, block_size, num_blocks, torch.bfloat16)
    backend = TritonAttentionBackend(layout, pool)
    batch = make_batch([(context - 1, 1)], block_size, num_blocks)
    q, k, v = make_qkv(1, layout)
    out = torch.empty_like(q)
    backend.init_cuda_graph_state(max_batch_size=1, max_blocks_per_seq=context // block_size)
    metadata = backend.plan_cuda_graph(batch)
    fed = torch.zeros(1, dtype=torch.int64, device="cuda")
    backend.decode_graph_prologue(1, batch.token_rows.clone(), fed)()  # the lengths and table
    backend.forward(q, k, v, out, 0, batch, metadata)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            backend.forward(q, k, v, out, 0, batch, metadata)
    timings = []
    for _ in range(6):  # the first replay warms up
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        timings.append((time.perf_counter() - start) / 20)
    seconds = min(timings[1:])
    kv_bytes = 2 * context * layout.num_kv_heads * layout.head_dim * 2
    bandwidth = kv_bytes / seconds / 1e9
    print(
        f"\nbatch-1 decode, 32k context: {seconds * 1e6:.1f} us, {bandwidth:.0f} GB/s "
        f"({metadata.num_kv_splits} splits)"
    )
    assert bandwidth > 670
