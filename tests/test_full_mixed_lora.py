"""LoRA inside FULL mixed graphs on CPU: graphs captured with no adapter in the batch, replayed
for batches mixing base rows and adapters (another set than at capture, slots swapped between
replays), against the eager forward; greedy generation identical with FULL mixed on and off; a
replay whose LoRA plan is stale or missing raises.

Real Triton attention and LoRA kernels in Triton's interpreter (CI exports TRITON_INTERPRET=1),
random adapters written to disk in the PEFT format, the stand-in graph (it re-runs the captured
forward with the capture-time plan over the persistent buffers, so a LoRA launch value fixed
from the capture batch, or segments not re-planned for the replayed batch, give wrong results).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (set by .ci/run)", allow_module_level=True)
pytest.importorskip("triton")

from tesela import LLM, LoRARequest, SamplingParams  # noqa: E402
from tesela.core.forward_batch import ForwardBatch  # noqa: E402
from tesela.core.plan import ForwardPlan  # noqa: E402
from tesela.engine.llm_engine import make_engine_config  # noqa: E402
from tesela.executor.dispatcher import RunPath  # noqa: E402
from tesela.executor.full_mixed import MixedGraphPlanner  # noqa: E402
from tesela.executor.model_runner import ModelRunner  # noqa: E402
from tesela.lora.adapter import write_random_adapter  # noqa: E402
from tesela.lora.state import StaleLoRAStateError  # noqa: E402

BLOCK = 16
MAX_ROWS = 4
SIZES = (8, 32)
LORA = dict(enable_lora=True, max_loras=2, max_lora_rank=8, lora_backend="triton")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three adapters for `tiny` (ranks 8, 4, 8) while two slots fit: batches swap slots."""
    config, _ = make_engine_config("tiny")
    folder = tmp_path_factory.mktemp("full-mixed-lora")
    return [
        LoRARequest(
            f"a{i}",
            i + 1,
            str(write_random_adapter(folder / f"a{i}", config.model_config, rank=rank, seed=i)),
        )  # fmt: skip
        for i, rank in enumerate((8, 4, 8))
    ]


@pytest.fixture(scope="module")
def runner(adapters):
    from tesela.attention.triton_backend import TritonAttentionConfig

    config, path = make_engine_config(
        "tiny", piecewise_cudagraph="breakable", capture_sizes=list(SIZES), num_kv_tokens=2048,
        **LORA,
    )  # fmt: skip
    runner = ModelRunner(dataclasses.replace(config, attention_backend="triton"), path)
    runner.attn_backend.config = TritonAttentionConfig(block_m=16, block_n=16)
    # Captured before any adapter is known: every capture batch is all slot -1.
    runner.add_full_mixed(SIZES, max_rows=MAX_ROWS, max_model_len=256)
    for request in adapters:
        runner.lora_manager.add_adapter(request)
    return runner


def batch(rows: list[tuple[int, int]], lora_ids: list[int], seed: int = 0) -> ForwardBatch:
    """Rows of (prefix_len, new tokens), each on its own blocks (row i: blocks 1+8i..)."""
    generator = torch.Generator().manual_seed(seed)
    return ForwardBatch.build(
        token_ids=[torch.randint(0, 258, (n,), generator=generator).tolist() for _, n in rows],
        prefix_lens=[p for p, _ in rows],
        block_tables=[list(range(1 + 8 * i, 9 + 8 * i)) for i in range(len(rows))],
        block_size=BLOCK,
        device="cpu",
        lora_ids=lora_ids,
    )


# Decode rows, a first prefill chunk and a later chunk whose prefix is already cached.
MIXED_ROWS = [(9, 1), (0, 7), (20, 6), (30, 1)]


def fill_prefixes(runner, rows, seed=1):
    """Run the prefixes eagerly, so that the rows' cached prefixes hold real K/V."""
    runner.forward_eager(batch([(0, p or 1) for p, _ in rows], [0] * len(rows), seed=seed))


def row_slices(rows):
    start = 0
    for _, n in rows:
        yield slice(start, start + n)
        start += n


@pytest.mark.parametrize(
    "rows,lora_ids",
    [
        (MIXED_ROWS, [1, 0, 2, 1]),  # base row between adapters, one adapter on two rows
        (MIXED_ROWS, [3, 2, 0, 3]),  # adapter 3 needs a slot: adapter 1's is swapped out
        ([(0, 20), (0, 9)], [2, 3]),  # prefill only, padded 29 -> 32
        (MIXED_ROWS, [0, 0, 0, 0]),  # no adapter: the buffers must not keep the last batch's
    ],
    ids=["mixed", "swapped", "prefill", "base"],
)
def test_replay_with_mixed_adapters_equals_eager(runner, rows, lora_ids):
    fill_prefixes(runner, rows)
    full = runner.full_mixed
    assert runner.dispatcher.choose(batch(rows, lora_ids))[0] is RunPath.FULL_MIXED
    # Another batch first leaves other adapters and segments in every buffer.
    full.run(batch([(0, 9), (0, 12), (0, 5), (0, 3)], [2, 2, 0, 1], seed=5))
    got = full.run(batch(rows, lora_ids, seed=2)).clone()
    assert torch.equal(got, full.run_eager_padded(batch(rows, lora_ids, seed=2)))
    # Against the unpadded eager forward: equal up to the GEMMs' choice of kernel by row count.
    eager = runner.forward_eager(batch(rows, lora_ids, seed=2))
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    # Base rows get no delta, adapter rows a visible one.
    base = runner.forward_eager(batch(rows, [0] * len(rows), seed=2))
    for rows_of, lora_id in zip(row_slices(rows), lora_ids, strict=True):
        if lora_id:
            assert (got[rows_of] - base[rows_of]).abs().max() > 1e-2
        else:
            torch.testing.assert_close(got[rows_of], base[rows_of], rtol=1e-4, atol=1e-4)


def test_padding_tokens_are_slot_minus_one(runner):
    full = runner.full_mixed
    full.run(batch([(0, 9), (0, 12), (0, 5), (0, 3)], [1, 2, 1, 2], seed=6))
    small = batch([(0, 5), (9, 1)], [2, 1], seed=7)  # 6 tokens: padded to 8
    _, plan = full.prepare(small)
    assert plan.lora.style == "sgmv"  # what the graph launches, decode rows too
    buffers, slots = runner.lora_manager.buffers, runner.lora_manager.slots.by_id
    # The last batch's adapters are still in the entries past these 6 tokens: the kernels
    # clamp to the real count, so the padding rows are base-model rows.
    assert buffers.token_slot[6:8].tolist() != [-1, -1] and buffers.real_tokens.item() == 6
    assert buffers.slots_of(8).tolist() == [slots[2]] * 5 + [slots[1]] + [-1, -1]
    assert buffers.seg_start[:3].tolist() == [0, 5, 6]
    assert buffers.seg_slot[:2].tolist() == [slots[2], slots[1]]


def test_a_replay_with_a_stale_or_missing_lora_plan_raises(runner):
    full = runner.full_mixed
    first = batch(MIXED_ROWS, [1, 0, 2, 1], seed=8)
    key, plan = full.prepare(first)
    full.planner.plan(batch([(0, 3)], [2], seed=9))  # rewrites the LoRA buffers
    with pytest.raises(StaleLoRAStateError, match=r"FULL mixed replay ran batch #\d+ .* holding"):
        full.replay(first, key, plan)
    key, plan = full.prepare(first)
    bare = ForwardPlan(first.stamp, plan.attn_metadata)  # attention planned, LoRA not
    with pytest.raises(StaleLoRAStateError, match="FULL mixed replay .* no LoRA part"):
        full.replay(first, key, bare)
    full.replay(first, key, plan)  # the batch's own, current plan


def test_the_torch_lora_backend_is_refused_in_full_mixed_graphs(runner):
    manager = runner.lora_manager
    backend, manager.backend = manager.backend, "torch"
    try:
        with pytest.raises(ValueError, match="lora_backend='torch' .* use lora_backend='triton'"):
            MixedGraphPlanner(runner.attn_backend, SIZES, MAX_ROWS, 16, manager)
    finally:
        manager.backend = backend


def test_greedy_with_adapters_identical_with_full_mixed_on_and_off(adapters):
    """Extend and decode steps through FULL mixed graphs (no FULL decode graphs on CPU) and
    through piecewise graphs: the same greedy tokens, and the adapters change them."""
    prompts = [[5, 17, 42, 8, 99, 3], [30, 31, 12], [77, 54, 23, 9, 81, 44, 6], [11, 12]]
    loras = [adapters[0], None, adapters[2], adapters[1]]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    tokens, paths = {}, {}
    for full_mixed in (True, False):
        llm = LLM(
            "tiny", attention_backend="triton", piecewise_cudagraph="breakable",
            capture_sizes=list(SIZES), max_num_seqs=MAX_ROWS, **LORA,
        )  # fmt: skip
        if full_mixed:
            scheduler = llm.engine.config.scheduler
            llm.engine.runner.add_full_mixed(SIZES, MAX_ROWS, scheduler.max_model_len)
        outputs = llm.generate(prompts, params, lora_request=loras)
        tokens[full_mixed] = [o.token_ids for o in outputs]
        paths[full_mixed] = llm.engine.stats()["dispatch"]["paths"]
        if full_mixed:
            base = [o.token_ids for o in llm.generate(prompts, params)]
    assert paths[True].get("full_mixed", 0) > 0 and paths[False].get("full_mixed", 0) == 0
    assert tokens[True] == tokens[False]
    assert tokens[True][1] == base[1]  # the base row
    assert any(tokens[True][i] != base[i] for i in (0, 2, 3))


def test_full_decode_replay_with_adapters_equals_eager(runner):
    """FULL decode graphs (the `gather` kernels) replayed on the stand-in check their plan the
    same way: the captured forward's ops check the replayed batch's LoRA buffers."""
    from tesela.executor.full_decode import FullDecodeRunner
    from tesela.executor.planner import CudaGraphPlanner

    planner = CudaGraphPlanner(runner.attn_backend, 4, 16, runner.lora_manager)
    decode = FullDecodeRunner(
        model=runner.model, planner=planner, batch_sizes=(2, 4), max_blocks_per_seq=16,
        graphs=runner.graph_factory,
    )  # fmt: skip
    decode.capture()
    rows = [(9, 1), (20, 1), (30, 1)]
    fill_prefixes(runner, rows)
    decode.run(batch([(5, 1), (6, 1)], [2, 2], seed=3))
    got = decode.run(batch(rows, [1, 0, 3], seed=4)).clone()
    assert runner.lora_manager.buffers.real_tokens.item() == 3  # row 3: padding, no adapter
    eager = runner.forward_eager(batch(rows, [1, 0, 3], seed=4))
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    base = runner.forward_eager(batch(rows, [0, 0, 0], seed=4))
    assert (got[0] - base[0]).abs().max() > 1e-2 and (got[2] - base[2]).abs().max() > 1e-2
