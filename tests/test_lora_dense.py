"""The dense (cuBLAS) LoRA style: the per-token scale buffer that masks every slot but a
token's own, its deltas against the fp64 reference and the Triton styles, the style policy,
and greedy parity with transformers + peft when every launch runs dense."""

from __future__ import annotations

import os

import pytest
import torch

from tesela import LLM, SamplingParams
from tesela.lora.kernels import (
    dense_lora,
    lora_weights,
    reference_lora_delta,
    torch_lora,
    triton_lora,
    zero_other_slices,
)
from tesela.lora.policy import DENSE, GATHER, SGMV, LoRAKernelPolicy
from tesela.lora.state import NO_SLOT, LoRABuffers

IN, OFFSETS = 24, (0, 32, 40, 48)  # a fused qkv-like target: slices of 32, 8 and 8 rows
SLOTS, MAX_RANK = 3, 8
SEGMENTS = [(0, 4, 0), (4, 7, NO_SLOT), (7, 15, 2), (15, 16, 1), (16, 20, 0)]
NUM_TOKENS, PADDED = 20, 26  # padding rows past the batch, as in a graph of a larger size


def weights(seed: int):
    """Stacked weights in the dense layout, ranks 8/3/5; rows past a rank hold finite junk."""
    g = torch.Generator().manual_seed(seed)
    a, b = lora_weights(SLOTS, OFFSETS, MAX_RANK, IN)
    a.copy_(torch.randn(a.shape, generator=g) * 0.3)
    b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    a[1, :, 3:] = b[1, ..., 3:] = 100.0
    a[2, :, 5:] = b[2, ..., 5:] = -7.0
    zero_other_slices(b, OFFSETS)
    return a, b


def buffers(segments=SEGMENTS, scalings=(0.5, 2.0, 0.25)) -> LoRABuffers:
    state = LoRABuffers.allocate(32, SLOTS, "cpu", dense_rank=MAX_RANK)
    for slot, (rank, scaling) in enumerate(zip((8, 3, 5), scalings, strict=True)):
        state.set_slot(slot, rank, scaling)
    state.write(segments, NUM_TOKENS)
    return state


def run_dense(a, b, state, x, y0):
    y = y0.clone()
    dense_lora(x, y, a, b, state.token_scale)
    return y


def test_token_scale_keeps_only_a_tokens_own_slot_below_its_rank():
    state = buffers()
    scale = state.token_scale.view(32, SLOTS, MAX_RANK)
    for t in range(32):
        slot = int(state.token_slot[t])
        expected = torch.zeros(SLOTS, MAX_RANK)
        if slot != NO_SLOT:
            rank = int(state.ranks[slot])
            expected[slot, :rank] = float(state.scalings[slot])
        assert torch.equal(scale[t], expected), t
    assert scale[NUM_TOKENS:].abs().sum() == 0  # padding: no slot


def test_dense_delta_matches_the_reference_and_leaves_base_rows_bit_identical():
    a, b = weights(0)
    state = buffers()
    g = torch.Generator().manual_seed(1)
    x, y0 = torch.randn(PADDED, IN, generator=g), torch.randn(PADDED, OFFSETS[-1], generator=g)
    y = run_dense(a, b, state, x, y0)
    token_slot = state.token_slot[:PADDED]
    expected = reference_lora_delta(x, a, b, OFFSETS, token_slot, state.ranks, state.scalings)
    torch.testing.assert_close((y - y0).double(), expected, atol=1e-4, rtol=1e-4)
    base = token_slot == NO_SLOT  # base rows and padding: exactly untouched
    assert base.sum() == 3 + PADDED - NUM_TOKENS and torch.equal(y[base], y0[base])
    assert (expected[~base].abs().sum(dim=1) > 0).all()
    # The torch backend's host-segment path adds the same deltas.
    y_torch = y0.clone()
    torch_lora(x, y_torch, a, b, OFFSETS, SEGMENTS, [8, 3, 5], [0.5, 2.0, 0.25])
    torch.testing.assert_close(y_torch, y, atol=1e-5, rtol=1e-5)


def test_rows_never_see_another_slots_weights():
    """Huge weights in slot 1 change no row of another slot, bit for bit (its products with
    those rows are exact zeros), and only slot 1's rows move."""
    a, b = weights(2)
    state = buffers()
    g = torch.Generator().manual_seed(3)
    x, y0 = torch.randn(PADDED, IN, generator=g), torch.randn(PADDED, OFFSETS[-1], generator=g)
    before = run_dense(a, b, state, x, y0)
    a[1], b[1] = 1e30, -1e30
    after = run_dense(a, b, state, x, y0)
    slot1 = state.token_slot[:PADDED] == 1
    assert torch.equal(after[~slot1], before[~slot1])
    assert not torch.equal(after[slot1], before[slot1])


def test_each_slot_takes_its_own_scaling():
    """Scalings multiply only their own slot's rows (as rsLoRA's alpha / sqrt(r) does)."""
    a, b = weights(4)
    g = torch.Generator().manual_seed(5)
    x, y0 = torch.randn(PADDED, IN, generator=g), torch.zeros(PADDED, OFFSETS[-1])
    base = run_dense(a, b, buffers(scalings=(0.5, 2.0, 0.25)), x, y0)
    scaled = run_dense(a, b, buffers(scalings=(0.5, 2.0, 0.25 * 3)), x, y0)
    slot2 = buffers().token_slot[:PADDED] == 2
    torch.testing.assert_close(scaled[slot2], 3 * base[slot2])
    assert torch.equal(scaled[~slot2], base[~slot2])


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels run on CPU under TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("style", [SGMV, GATHER])
def test_dense_equals_the_triton_styles_on_the_same_views(style):
    """The dense layout's views serve the Triton kernels too (strided A and B)."""
    a, b = weights(6)
    state = buffers()
    g = torch.Generator().manual_seed(7)
    x, y0 = torch.randn(PADDED, IN, generator=g), torch.randn(PADDED, OFFSETS[-1], generator=g)
    y = y0.clone()
    offsets = torch.tensor(OFFSETS, dtype=torch.int32)
    triton_lora(x, y, a, b, offsets, 32, state, style)
    torch.testing.assert_close(y, run_dense(a, b, state, x, y0), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels run on CPU under TRITON_INTERPRET=1",
)
def test_without_dense_b_is_stored_once_and_the_triton_styles_read_it():
    """Past dense_max_columns B is not block-diagonal: one [out, slots, rank] storage that
    every slice's view shares (a third of a qkv target's), and the kernels still read each
    slice's own rows."""
    g = torch.Generator().manual_seed(8)
    a, b = lora_weights(SLOTS, OFFSETS, MAX_RANK, IN, block_diagonal=False)
    assert b.untyped_storage().nbytes() == OFFSETS[-1] * SLOTS * MAX_RANK * 4
    a.copy_(torch.randn(a.shape, generator=g))
    for j in range(len(OFFSETS) - 1):
        lo, hi = OFFSETS[j], OFFSETS[j + 1]
        b[:, j, lo:hi].copy_(torch.randn(SLOTS, hi - lo, MAX_RANK, generator=g))
    state = buffers()
    x, y0 = torch.randn(PADDED, IN, generator=g), torch.randn(PADDED, OFFSETS[-1], generator=g)
    expected = reference_lora_delta(
        x, a, b, OFFSETS, state.token_slot[:PADDED], state.ranks, state.scalings
    )
    for style in (SGMV, GATHER):
        y = y0.clone()
        triton_lora(x, y, a, b, torch.tensor(OFFSETS, dtype=torch.int32), 32, state, style)
        torch.testing.assert_close((y - y0).double(), expected, atol=1e-4, rtol=1e-4)


def test_the_policy_picks_dense_by_token_count_family_and_columns():
    policy = LoRAKernelPolicy(dense_min_tokens=128, dense_min_decode_tokens=0)
    assert policy.choose(SGMV, 128, True)[0] == DENSE
    assert policy.choose(SGMV, 127, True)[0] == SGMV
    assert policy.choose(GATHER, 4096, True)[0] == GATHER  # decode: dense off by default
    assert policy.choose(SGMV, 4096, False) == (
        SGMV, "dense LoRA is off for these limits (see dense_max_columns)",
    )  # fmt: skip
    assert LoRAKernelPolicy(dense_min_decode_tokens=32).choose(GATHER, 32, True)[0] == DENSE
    assert policy.dense_allowed(4, 64)[0] and not policy.dense_allowed(8, 64)[0]
    assert "512 > 256" in policy.dense_allowed(8, 64)[1]


# ---- through the engine --------------------------------------------------------------------

PROMPTS = [[5, 17, 42, 8, 99, 3], [300, 301, 12, 77, 54, 23, 9, 81, 44, 6, 1]]


def test_every_launch_dense_matches_peft_greedy_with_rslora(checkpoints, lora_adapters):
    """Prefill and decode through the dense GEMMs (thresholds 1): peft's greedy tokens and
    logprobs, for a full adapter and an rsLoRA one in one batch with a base row."""
    from tests.test_lora import hf_greedy

    path, base_model = checkpoints["llama"]
    llm = LLM(
        str(path), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=8,
        lora_backend="triton", lora_dense_min_tokens=1, lora_dense_min_decode_tokens=1,
    )  # fmt: skip
    assert llm.engine.runner.lora_manager.dense_ok
    (full, full_peft), (rs, rs_peft) = (
        lora_adapters["llama"]["full"],
        lora_adapters["llama"]["rslora"],
    )
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    outputs = llm.generate(prompts, sp, lora_request=[full, rs, None])
    for output, prompt, model in zip(
        outputs, prompts, [full_peft, rs_peft, base_model], strict=True
    ):
        tokens, reference = hf_greedy(model, prompt)
        assert output.token_ids == tokens
        for step, lp in enumerate(output.logprobs):
            expected = reference[len(prompt) - 1 + step][tokens[step]].item()
            assert abs(lp.logprob - expected) <= 1e-4 * max(1.0, abs(expected))
    assert outputs[0].token_ids != outputs[2].token_ids  # the adapter matters
    # B stays block-diagonal through slot loads: slice j's rows only (the dense expand reads
    # all of b[slot, j]).
    for module in llm.engine.runner.lora_manager.modules.values():
        offsets = module.lora_offsets
        for j, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
            assert not module.lora_b[:, j, :lo].any() and not module.lora_b[:, j, hi:].any()
            assert module.lora_b[:, j, lo:hi].any()


def test_the_manager_stores_b_once_when_dense_is_off(checkpoints):
    """max_loras x max_lora_rank past dense_max_columns: no dense, and B (and so the LoRA
    memory) shrinks to one copy, with every target still served (the Triton styles)."""
    path, _ = checkpoints["llama"]

    def manager(max_loras):
        llm = LLM(
            str(path), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=8,
            max_loras=max_loras, lora_backend="triton",
        )  # fmt: skip
        return llm.engine.runner.lora_manager

    dense, compact = manager(32), manager(33)  # 256 and 264 columns
    assert dense.dense_ok and not compact.dense_ok and compact.buffers.token_scale is None
    qkv = next(name for name in dense.targets if name.endswith("qkv_proj"))
    assert compact.modules[qkv].lora_b.stride(1) == 0
    per_slot = {m.nbytes / m.max_loras for m in (dense, compact)}
    assert max(per_slot) > 1.3 * min(per_slot)


def test_the_style_comparison_suggests_where_dense_wins_for_good():
    """`tesela.tune.lora --compare-styles`: a threshold is the smallest count from which dense
    wins at every larger count measured (a win below a loss does not count), 0 if never."""
    from tesela.tune.lora import crossover

    times = {
        1: {GATHER: 5, SGMV: 10, DENSE: 20},
        16: {GATHER: 6, SGMV: 11, DENSE: 10},  # a win below a loss
        32: {GATHER: 8, SGMV: 12, DENSE: 13},
        128: {GATHER: 30, SGMV: 20, DENSE: 10},
        1024: {SGMV: 60, DENSE: 25},
    }
    assert crossover(times, SGMV) == 128
    assert crossover(times, GATHER) == 128  # gather measured up to 128 only
    times[128][DENSE] = 31
    assert crossover(times, GATHER) == 0 and crossover(times, SGMV) == 1024
