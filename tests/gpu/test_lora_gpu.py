"""LoRA on CUDA: the Triton kernels in bf16 against the fp64 reference; greedy generations
with adapters identical with graphs off, piecewise breakable, piecewise compiled, FULL decode
and FULL mixed graphs; FULL mixed replays of batches mixing adapters equal their eager forward."""

from __future__ import annotations

import pytest
import torch

from tesela import LLM, LoRARequest, SamplingParams
from tesela.core.scratch import SPLIT_K_ARRIVALS
from tesela.lora.adapter import write_random_adapter
from tesela.lora.fused_gemm import FusedTiles, fused_tiles, lora_gemm
from tesela.lora.kernels import GATHER, SGMV, reference_lora_delta, triton_lora
from tesela.lora.state import NO_SLOT, LoRABuffers

# Llama-3-8B's qkv (q 4096, k 1024, v 1024 rows over a 4096 input) and its down projection;
# a ragged target (K and slices not multiples of any tile: the masked tails of the fused decode
# kernel's K chunks and of the split-K shrink's last split).
SHAPES = {
    "qkv": (4096, (0, 4096, 5120, 6144)),
    "down": (14336, (0, 4096)),
    "ragged": (1000, (0, 700, 1000)),
}


def random_segments(num_tokens: int, slots: int, seed: int) -> list[tuple[int, int, int]]:
    generator = torch.Generator().manual_seed(seed)
    segments, start = [], 0
    while start < num_tokens:
        n = int(torch.randint(1, 40, (1,), generator=generator))
        slot = int(torch.randint(-1, slots, (1,), generator=generator))
        segments.append((start, min(start + n, num_tokens), slot))
        start += n
    return segments


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("style", [SGMV, GATHER])
@pytest.mark.parametrize("num_tokens", [1, 7, 32, 300, 1024])
def test_kernels_bf16_match_the_reference(shape, style, num_tokens):
    in_features, offsets = SHAPES[shape]
    slots, max_rank = 4, 16
    generator = torch.Generator().manual_seed(num_tokens)
    a = torch.randn(slots, len(offsets) - 1, max_rank, in_features, generator=generator)
    a = (a * in_features**-0.5).to(torch.bfloat16).cuda()
    b = (torch.randn(slots, offsets[-1], max_rank, generator=generator) * 0.05).bfloat16().cuda()
    x = torch.randn(num_tokens + 5, in_features, generator=generator).bfloat16().cuda()
    y0 = torch.randn(num_tokens + 5, offsets[-1], generator=generator).bfloat16().cuda()
    buffers = LoRABuffers.allocate(2048, slots, "cuda")
    segments = random_segments(num_tokens, slots, seed=num_tokens)
    buffers.write(segments, num_tokens)
    buffers.ranks.copy_(torch.tensor([16, 8, 16, 4], dtype=torch.int32))
    buffers.scalings.copy_(torch.tensor([2.0, 1.0, 0.5, 4.0]))
    y = y0.clone()
    device_offsets = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    max_size = max(hi - lo for lo, hi in zip(offsets[:-1], offsets[1:], strict=True))
    triton_lora(x, y, a, b, device_offsets, max_size, buffers, style)
    torch.cuda.synchronize()
    expected = reference_lora_delta(
        x.cpu(), a.cpu(), b.cpu(), offsets, buffers.slots_of(x.shape[0]),
        buffers.ranks.cpu(), buffers.scalings.cpu(),
    )  # fmt: skip
    got = (y.double() - y0.double()).cpu()
    # bf16 output: one rounding of y + delta (|y| ~ 4: a step of 2^-6), plus the shrink
    # output rounded to bf16 before the expand.
    torch.testing.assert_close(got, expected, atol=6e-2, rtol=2e-2)
    assert torch.equal(y[num_tokens:], y0[num_tokens:])  # padding rows untouched
    if any(slot != NO_SLOT for _, _, slot in segments):
        assert expected.abs().max() > 0.1


@pytest.mark.parametrize("shape", ["qkv", "ragged"])
def test_gather_delta_of_a_token_is_the_same_in_any_batch(shape):
    """Decode's kernel gives a program more columns at larger token counts (it shrinks once
    for all of them): a token's row is still bitwise the same at every count, as a decode
    graph captured at one size and the eager step at another need."""
    in_features, offsets = SHAPES[shape]
    slots, max_rank, n = 4, 16, 160
    g = torch.Generator().manual_seed(11)
    a = (torch.randn(slots, len(offsets) - 1, max_rank, in_features, generator=g)
         * in_features**-0.5).bfloat16().cuda()  # fmt: skip
    b = (torch.randn(slots, offsets[-1], max_rank, generator=g) * 0.05).bfloat16().cuda()
    x = torch.randn(n, in_features, generator=g).bfloat16().cuda()
    y0 = torch.randn(n, offsets[-1], generator=g).bfloat16().cuda()
    device_offsets = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    max_size = max(hi - lo for lo, hi in zip(offsets[:-1], offsets[1:], strict=True))
    rows = {}
    for num_tokens in (1, 8, 32, n):
        buffers = LoRABuffers.allocate(n, slots, "cuda")
        buffers.write([(t, t + 1, t % slots) for t in range(num_tokens)], num_tokens)
        buffers.ranks.fill_(max_rank)
        buffers.scalings.fill_(2.0)
        y = y0[:num_tokens].clone()
        triton_lora(x[:num_tokens], y, a, b, device_offsets, max_size, buffers, GATHER)
        rows[num_tokens] = y
    assert not torch.equal(rows[1][0], y0[0])
    for num_tokens in (8, 32, n):
        assert torch.equal(rows[num_tokens][: min(num_tokens, 8)], rows[8][: min(num_tokens, 8)])
        assert torch.equal(rows[num_tokens][:1], rows[1])


@pytest.mark.parametrize("shape", ["qkv", "down"])
@pytest.mark.parametrize("tiles", [FusedTiles(), FusedTiles(64, 128, num_warps=4, num_stages=4)])
def test_fused_gemm_bf16_matches_the_reference_in_any_batch(shape, tiles):
    """The shrink and the GEMM with the expand inside (TMA loads, wgmma) against fp64, on
    random segments (blocks of one adapter and blocks spanning several); a token's row is
    bitwise the same in a batch of 1024 tokens and in one of 300 (another grid, the same K
    order)."""
    in_features, offsets = SHAPES[shape]
    slots, max_rank, n = 4, 16, 1024
    g = torch.Generator().manual_seed(7)
    a = (torch.randn(slots, len(offsets) - 1, max_rank, in_features, generator=g)
         * in_features**-0.5).bfloat16().cuda()  # fmt: skip
    b = (torch.randn(slots, offsets[-1], max_rank, generator=g) * 0.05).bfloat16().cuda()
    weight = (torch.randn(offsets[-1], in_features, generator=g) * in_features**-0.5).bfloat16()
    weight = weight.cuda()
    x = torch.randn(n, in_features, generator=g).bfloat16().cuda()
    widths = [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)]
    segments = random_segments(n, slots, seed=3)
    outputs = {}
    for num_tokens in (n, 300):
        buffers = LoRABuffers.allocate(2048, slots, "cuda")
        cut = [(lo, min(hi, num_tokens), s) for lo, hi, s in segments if lo < num_tokens]
        buffers.write(cut, num_tokens)
        buffers.ranks.copy_(torch.tensor([16, 8, 16, 4], dtype=torch.int32))
        buffers.scalings.copy_(torch.tensor([2.0, 1.0, 0.5, 4.0]))
        outputs[num_tokens] = lora_gemm(x[:num_tokens], weight, None, a, b, widths, buffers, tiles)
        if num_tokens == n:
            delta = reference_lora_delta(
                x.cpu(), a.cpu(), b.cpu(), offsets, buffers.slots_of(n),
                buffers.ranks.cpu(), buffers.scalings.cpu(),
            )  # fmt: skip
    expected = x.cpu().double() @ weight.cpu().double().T + delta
    torch.testing.assert_close(outputs[n].cpu().double(), expected, atol=6e-2, rtol=2e-2)
    assert delta.abs().max() > 0.1
    assert torch.equal(outputs[n][:300], outputs[300])


@pytest.mark.parametrize("shape", ["qkv", "down"])
@pytest.mark.parametrize(
    "tiles",
    [FusedTiles(block_n=32, num_warps=4, num_stages=4, small=True),
     FusedTiles(block_n=128, num_warps=8, num_stages=3, small=True),
     FusedTiles(block_n=32, num_warps=4, num_stages=4, small=True, split_k=4)],
)  # fmt: skip
def test_one_launch_fused_gemm_bf16_matches_the_reference_and_rows_keep_their_bits(shape, tiles):
    """The one-launch kernel (every slot's shrink inside the base GEMM's K loop, one MMA for
    all slots' expands) against fp64 on decode rows cycling 4 adapters and the base model,
    ranks below the slots' width, K in one program or split over four (their partial sums
    added in split order by whichever arrives last); a token's row is bitwise the same in every
    batch whose count shares its token tile (1-16, 17-32, 33-64: a padded replay and its eager
    batch)."""
    in_features, offsets = SHAPES[shape]
    slots, max_rank = 4, 16
    g = torch.Generator().manual_seed(11)
    a = (torch.randn(slots, len(offsets) - 1, max_rank, in_features, generator=g)
         * in_features**-0.5).bfloat16().cuda()  # fmt: skip
    b = (torch.randn(slots, offsets[-1], max_rank, generator=g) * 0.05).bfloat16().cuda()
    weight = (torch.randn(offsets[-1], in_features, generator=g) * in_features**-0.5).bfloat16()
    weight = weight.cuda()
    x = torch.randn(64, in_features, generator=g).bfloat16().cuda()
    widths = [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)]
    outputs = {}
    for num_tokens in (1, 5, 16, 17, 32, 40, 64):
        buffers = LoRABuffers.allocate(64, slots, "cuda")
        buffers.write(
            [(t, t + 1, [0, 1, NO_SLOT, 2, 3][t % 5]) for t in range(num_tokens)], num_tokens
        )
        buffers.ranks.copy_(torch.tensor([16, 8, 16, 4], dtype=torch.int32))
        buffers.scalings.copy_(torch.tensor([2.0, 1.0, 0.5, 4.0]))
        y = lora_gemm(x[:num_tokens], weight, None, a, b, widths, buffers, tiles)
        outputs[num_tokens] = y
        assert not SPLIT_K_ARRIVALS.get(x.device, 0).any()  # split-K: the counts are back to zero
        delta = reference_lora_delta(
            x[:num_tokens].cpu(), a.cpu(), b.cpu(), offsets, buffers.slots_of(num_tokens),
            buffers.ranks.cpu(), buffers.scalings.cpu(),
        )  # fmt: skip
        expected = x[:num_tokens].cpu().double() @ weight.cpu().double().T + delta
        torch.testing.assert_close(y.cpu().double(), expected, atol=6e-2, rtol=2e-2)
        assert delta.abs().max() > 0.1
    for small, large in ((1, 16), (5, 16), (17, 32), (40, 64)):
        assert torch.equal(outputs[small], outputs[large][:small])


def test_the_tuned_table_serves_decode_targets_in_one_launch_on_this_card():
    """The checked-in table has one-launch entries for this card at decode sizes (else the
    greedy tests below never run the kernel in a FULL decode graph): qwen3-0.6b's qkv target
    at batch 32, and only with at most 4 adapter slots."""
    x = torch.empty(32, 1024, dtype=torch.bfloat16, device="cuda")
    weight = torch.empty(4096, 1024, dtype=torch.bfloat16, device="cuda")
    a = torch.empty(4, 3, 16, 1024, dtype=torch.bfloat16, device="cuda")
    tiles = fused_tiles(x, weight, a, [2048, 1024, 1024])
    if tiles is None:
        pytest.skip(f"no one-launch LoRA entry for {torch.cuda.get_device_name()} at batch 32")
    assert tiles.small
    eight_slots = torch.empty(8, 3, 16, 1024, dtype=torch.bfloat16, device="cuda")
    assert fused_tiles(x, weight, eight_slots, [2048, 1024, 1024]) is None


def test_the_tuned_table_serves_prefill_targets_fused_on_this_card():
    """The checked-in table has fused entries for this card at prefill sizes (else the layer
    tests below never run the fused kernel): qwen3-0.6b's qkv target at 2048 tokens."""
    x = torch.empty(2048, 1024, dtype=torch.bfloat16, device="cuda")
    weight = torch.empty(4096, 1024, dtype=torch.bfloat16, device="cuda")
    a = torch.empty(4, 3, 16, 1024, dtype=torch.bfloat16, device="cuda")
    if fused_tiles(x, weight, a, [2048, 1024, 1024]) is None:
        pytest.skip(f"no fused LoRA entry for {torch.cuda.get_device_name()} at 2048 tokens")
    strided = torch.empty(2048, 2048, dtype=torch.bfloat16, device="cuda")[:, :1024]
    assert fused_tiles(strided, weight, a, [2048, 1024, 1024]) is None  # not TMA-ready


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from tesela.engine.llm_engine import resolve_model

    model_config, _ = resolve_model("qwen3-0.6b")
    folder = tmp_path_factory.mktemp("adapters")
    return [
        LoRARequest(f"a{i}", i + 1, str(write_random_adapter(folder / f"a{i}", model_config,
                                                                 rank=16, seed=i)))
        for i in range(3)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "graphs,prefill_path",
    [
        (dict(piecewise_cudagraph="breakable", full_mixed=False), "piecewise"),
        (dict(piecewise_cudagraph="compiled", piecewise_compiler="eager", full_mixed=False),
         "piecewise"),
        (dict(piecewise_cudagraph="breakable", full_mixed=True), "full_mixed"),
    ],
    ids=["breakable", "compiled", "full_mixed"],
)  # fmt: skip
def test_greedy_with_adapters_identical_with_graphs_on_and_off(adapters, graphs, prefill_path):
    """Base rows and three adapters in one batch; prefill through piecewise or FULL mixed
    graphs, decode through FULL decode graphs (all captured with no adapter in the batch)."""
    prompts = [list(range(100 + i, 100 + i + n)) for i, n in enumerate([3, 17, 64, 200, 9, 40])]
    loras = [None, adapters[0], adapters[1], adapters[2], adapters[0], None]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    common = dict(
        dtype="bfloat16", num_kv_tokens=16384, max_num_batched_tokens=512, enable_lora=True
    )
    on = LLM("qwen3-0.6b", capture_sizes=[8, 16, 64, 128, 256, 512], **common, **graphs)
    on_tokens = [o.token_ids for o in on.generate(prompts, params, lora_request=loras)]
    paths = on.engine.stats()["dispatch"]["paths"]
    assert paths.get(prefill_path, 0) > 0 and paths["full"] > 0, paths
    base_tokens = [o.token_ids for o in on.generate(prompts, params)]
    del on
    off = LLM("qwen3-0.6b", disable_cudagraph=True, **common)
    assert [o.token_ids for o in off.generate(prompts, params, lora_request=loras)] == on_tokens
    # The adapters change the generations (so the graphs really ran the deltas).
    assert all(on_tokens[i] != base_tokens[i] for i in (1, 2, 3, 4))
    assert on_tokens[0] == base_tokens[0] and on_tokens[5] == base_tokens[5]


@pytest.mark.parametrize("num_tokens", [1, 4, 16, 48, 2048])
def test_adapter_equals_its_weights_merged_into_the_model(adapters, num_tokens):
    """Rows served by an adapter equal the base model with that adapter's B·A merged into its
    weights, at decode-sized batches too (where the small-M GEMV may fuse a norm or an
    activation into a GEMM: it must not, on a LoRA projection, whose shrink reads the input),
    and at a prefill size the tuned table serves with the delta inside the base GEMM."""
    from tesela.core.forward_batch import ForwardBatch
    from tesela.engine.llm_engine import make_engine_config
    from tesela.executor.model_runner import ModelRunner

    def runner(lora: bool) -> ModelRunner:
        config, path = make_engine_config(
            "qwen3-0.6b", dtype="bfloat16", num_kv_tokens=4096, disable_cudagraph=True,
            enable_lora=lora,
        )  # fmt: skip
        return ModelRunner(config, path)

    def batch(lora_id: int) -> ForwardBatch:
        tokens = torch.randint(0, 151936, (num_tokens,), generator=torch.Generator().manual_seed(1))
        per_row = 1 if num_tokens <= 48 else 16  # a row fills one KV block
        rows = [tokens[i : i + per_row].tolist() for i in range(0, num_tokens, per_row)]
        return ForwardBatch.build(
            token_ids=rows, prefix_lens=[0] * len(rows),
            block_tables=[[1 + i] for i in range(len(rows))], block_size=16, device="cuda",
            lora_ids=[lora_id] * len(rows),
        )  # fmt: skip

    with_lora = runner(lora=True)
    adapter = with_lora.lora_manager.add_adapter(adapters[0])
    got = with_lora.forward(batch(adapter.lora_id)).float()
    base_logits = with_lora.forward(batch(0)).float()
    del with_lora
    merged = runner(lora=False)
    with torch.no_grad():
        for name, (a, b) in adapter.weights.items():
            weight = merged.model.get_submodule(name).weight
            offsets = [off for _, off, _ in _slices(merged, name)] + [weight.shape[0]]
            for j in range(a.shape[0]):
                lo, hi = offsets[j], offsets[j + 1]
                delta = adapter.scaling * (b[lo:hi].cuda() @ a[j].cuda())
                weight[lo:hi] = (weight[lo:hi].float() + delta).to(weight.dtype)
    expected = merged.forward(batch(0)).float()
    error = (got - expected).abs().max().item()
    effect = (base_logits - expected).abs().max().item()
    assert error < 0.1 * effect, (error, effect)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def _slices(runner, name: str):
    from tesela.lora.adapter import lora_targets

    return lora_targets(runner.model)[name].slices


@pytest.fixture(scope="module")
def mixed_runner(adapters):
    from tesela.engine.llm_engine import make_engine_config
    from tesela.executor.model_runner import ModelRunner

    config, path = make_engine_config(
        "qwen3-0.6b", dtype="bfloat16", device="cuda", num_kv_tokens=16384,
        piecewise_cudagraph="breakable", capture_sizes=[8, 16, 32, 64, 128, 256, 512],
        max_num_seqs=8, enable_lora=True, max_loras=2, max_lora_rank=16,
    )  # fmt: skip
    runner = ModelRunner(config, path)  # graphs captured before any adapter is known
    assert runner.full_mixed is not None, "LoRA must not turn FULL mixed graphs off"
    for request in adapters:
        runner.lora_manager.add_adapter(request)
    return runner


def mixed_batch(rows, lora_ids, seed):
    """rows: (prefix_len, new_tokens), each on its own blocks."""
    from tesela.core.forward_batch import ForwardBatch

    generator = torch.Generator().manual_seed(seed)
    tables, next_block = [], 1
    for prefix, n in rows:
        blocks = (prefix + n) // 16 + 1
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    return ForwardBatch.build(
        token_ids=[torch.randint(0, 151936, (n,), generator=generator).tolist() for _, n in rows],
        prefix_lens=[p for p, _ in rows], block_tables=tables, block_size=16, device="cuda",
        lora_ids=lora_ids,
    )  # fmt: skip


@pytest.mark.parametrize(
    "rows,lora_ids",
    [
        ([(40, 1), (0, 100), (64, 37), (90, 1)], [1, 0, 2, 1]),
        ([(40, 1), (0, 100), (64, 37), (90, 1)], [3, 2, 0, 3]),  # slot 1's adapter swapped out
        ([(0, 300), (0, 45)], [2, 3]),  # prefill only, padded to 512
        ([(0, 7)] * 8, [0] * 8),  # no adapter after batches with adapters
    ],
    ids=["mixed", "swapped", "prefill", "base"],
)
def test_full_mixed_replay_with_adapters_equals_eager(mixed_runner, rows, lora_ids):
    """A replay equals the captured forward run eagerly over the same buffers bit for bit, and
    the unpadded eager forward up to bf16 GEMM differences; base rows get no delta."""
    from tesela.executor.dispatcher import RunPath

    runner, full = mixed_runner, mixed_runner.full_mixed
    runner.forward_eager(mixed_batch([(0, p or 1) for p, _ in rows], [0] * len(rows), seed=1))
    assert runner.dispatcher.choose(mixed_batch(rows, lora_ids, 2))[0] is RunPath.FULL_MIXED
    full.run(mixed_batch([(0, 50), (0, 9), (0, 200), (0, 3)], [2, 2, 0, 1], seed=5))
    got = full.run(mixed_batch(rows, lora_ids, 2)).clone()
    assert torch.equal(got, full.run_eager_padded(mixed_batch(rows, lora_ids, 2)))
    eager = runner.forward_eager(mixed_batch(rows, lora_ids, 2))
    # Unpadded, the GEMMs take other cuBLAS tiles: a few of 142k bf16 logits move by up to
    # 0.17 (H200, "swapped"; the tree before the real-token count too). The LoRA checks are
    # the per-row ones below.
    torch.testing.assert_close(got.float(), eager.float(), rtol=2e-2, atol=0.25)
    base = runner.forward_eager(mixed_batch(rows, [0] * len(rows), 2))
    start = 0
    for (_, n), lora_id in zip(rows, lora_ids, strict=True):
        part = slice(start, start + n)
        start += n
        error = (got[part].float() - eager[part].float()).abs().max().item()
        effect = (eager[part].float() - base[part].float()).abs().max().item()
        if lora_id:  # the delta is there, and far above the graph-vs-eager difference
            assert error < 0.1 * effect, (lora_id, error, effect)
        else:  # no delta: the base model's rows
            torch.testing.assert_close(got[part].float(), base[part].float(), rtol=2e-2, atol=0.125)


def test_full_mixed_replay_with_a_stale_lora_plan_raises(mixed_runner):
    from tesela.lora.state import StaleLoRAStateError

    full = mixed_runner.full_mixed
    first = mixed_batch([(0, 30), (0, 5)], [1, 2], seed=3)
    key, plan = full.prepare(first)
    full.planner.plan(mixed_batch([(0, 3)], [2], seed=4))
    with pytest.raises(StaleLoRAStateError, match="FULL mixed replay"):
        full.replay(first, key, plan)
