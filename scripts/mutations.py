#!/usr/bin/env python3
"""Mutation check of the graph layer, the prefix cache, the sampler, the server, batch modes,
admission, the attention policy, sliding windows and LoRA: each mutation must make a CPU test
fail.

Applies one textual mutation at a time to a temporary copy of the repository, runs the tests
that guard it, and prints `mutation -> CAUGHT by <tests>` (or MISSED). Exit status 1 if any
mutation is missed or no longer applies. Slow (a few minutes on 2 cores): run it by hand,
`python3 scripts/mutations.py [name ...]`, after changing the runners, the planner, the sampler,
the block manager or the scheduler.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER = "tesela/executor/piecewise/runner.py"
FULL = "tesela/executor/full_decode.py"
PIECEWISE_TESTS = ["tests/test_piecewise.py"]
DECODE_TESTS = ["tests/test_dispatcher.py"]
SAMPLING = "tesela/executor/sampling.py"
ENGINE = "tesela/engine/llm_engine.py"
OVERLAP = "tests/test_overlap.py"
MIXED = "tesela/executor/full_mixed.py"
MIXED_TESTS = ["tests/test_full_mixed.py"]
PLAN_KERNEL = "tesela/attention/triton_kernels/mixed_plan.py"
DECODE_PLAN_KERNEL = "tesela/attention/triton_kernels/decode_plan.py"
LAUNCHER_TESTS = "tests/test_triton_launcher.py"
MIXED_LORA_TESTS = ["tests/test_full_mixed_lora.py"]
MOE_PADDING_TEST = "tests/test_moe.py::test_padding_tokens_route_to_no_expert_in_padded_replays"
BLOCKS = "tesela/engine/block_manager.py"
SCHEDULER = "tesela/engine/scheduler.py"
CACHE_TESTS = ["tests/test_prefix_cache.py"]
KERNELS = "tesela/lora/kernels.py"
ARGMAX = "tesela/executor/argmax.py"
ARGMAX_TESTS = "tests/test_argmax.py"
LORA_KERNEL_TESTS = ["tests/test_lora_kernels.py"]
GEMV = "tesela/layers/gemv.py"
GEMV_TESTS = ["tests/test_gemv.py"]
KV_STORE_TESTS = "tests/test_fused_kv_store.py"
FUSED_AR = "tesela/distributed/fused_all_reduce.py"
FUSED_AR_TESTS = "tests/test_fused_all_reduce.py"
LORA_PEFT_TESTS = ["tests/test_lora.py::test_greedy_tokens_and_logprobs_match_peft"]
LORA_MIXED = (
    "tests/test_lora.py::test_a_batch_mixing_base_rows_and_three_adapters_equals_each_alone"
)

# name -> (file, original text, mutated text, tests that must fail)
MUTATIONS = {
    "warmup runs without its own plan": (
        RUNNER,
        "                plan = self.planner.plan(warmup)\n",
        "",
        PIECEWISE_TESTS
        + ["tests/test_piecewise_compiled.py::test_graph_is_split_at_every_attention_call"],
    ),
    "capture of size N reuses the warmup's plan": (
        RUNNER,
        "                plan = self.planner.plan(batch)\n",
        "",
        PIECEWISE_TESTS
        + ["tests/test_piecewise_compiled.py::test_graph_is_split_at_every_attention_call"],
    ),
    "replay runs with the capture batch's plan": (
        RUNNER,
        "        plan = self.planner.plan(batch)\n        return self._replay(",
        "        batch = self._capture_batch(size)\n        plan = self.planner.plan(batch)\n"
        "        return self._replay(",
        ["tests/test_piecewise.py::test_piecewise_equals_eager_at_every_boundary"],
    ),
    "FULL decode replay runs with the first batch's plan": (
        FULL,
        "        plan = self.planner.plan(batch)\n        self.planner.check_replay(",
        "        plan = self.__dict__.setdefault('_first_plan', self.planner.plan(batch))\n"
        "        self.planner.check_replay(",
        DECODE_TESTS,
    ),
    "piecewise padding tokens keep a stale KV slot": (
        "tesela/executor/buffers.py",
        "        if padded_num_tokens > n:\n",
        "        if False:\n",
        PIECEWISE_TESTS,
    ),
    "FULL decode padding rows keep a stale KV slot": (
        DECODE_PLAN_KERNEL,
        "        tl.store(tokens_ptr + 2 * tokens_stride + row, PAD_SLOT)\n",
        "",
        DECODE_TESTS,
    ),
    "FULL decode padding rows keep a stale seq length": (
        DECODE_PLAN_KERNEL,
        "        tl.store(seq_lens_ptr + row, 1)\n",
        "",
        DECODE_TESTS,
    ),
    "FULL decode padding rows read a stale first block": (
        DECODE_PLAN_KERNEL,
        "        tl.store(tables_ptr + row * max_blocks, dummy_block)\n",
        "",
        DECODE_TESTS,
    ),
    "FULL decode rows keep the last batch's block tables": (
        DECODE_PLAN_KERNEL,
        "            tl.store(tables_ptr + row * max_blocks + cols, blocks, mask=cols < width)\n",
        "            tl.store(tables_ptr + row * max_blocks + cols, blocks, mask=cols < 1)\n",
        DECODE_TESTS,
    ),
    "FULL decode rows keep the last batch's KV slots": (
        DECODE_PLAN_KERNEL,
        "        for k in tl.static_range(3):\n",
        "        for k in tl.static_range(2):\n",
        DECODE_TESTS,
    ),
    "FULL decode pack copy stops before the block tables": (
        "tesela/attention/triton_backend.py",
        "        end = pack_layout(n, n)[-1] + n * width\n",
        "        end = pack_layout(n, n)[-1]\n",
        DECODE_TESTS,
    ),
    "a stream chunk joins the whole text": (
        "tesela/server/serving.py",
        "        text = output.text_snapshot\n",
        "        from tesela.engine.text import as_snapshot\n"
        "        text = as_snapshot(str(output.text_snapshot))\n",
        ["tests/test_text.py::test_a_long_stream_copies_its_text_a_bounded_number_of_times"],
    ),
    "a text slice across pieces starts at the wrong piece offset": (
        "tesela/engine/text.py",
        "        head = self._ends[first] - len(parts[0])\n",
        "        head = self._ends[first - 1] if first else 0\n        head += 1 if first == 1 else 0\n",
        ["tests/test_text.py::test_slices_equal_the_joined_text_across_pieces"],
    ),
    "a stop string spanning the shown text and the new piece is missed": (
        "tesela/engine/detokenizer.py",
        "        back = min(start, self._max_stop_len - 1)\n",
        "        back = 0\n",
        ["tests/test_detokenizer.py"],
    ),
    "the frontend appends after a stop-string cut without cutting": (
        "tesela/server/core_client.py",
        "            buffer = text.buffer if keep == len(text) else text.buffer.cut(keep)\n",
        "            buffer = text.buffer\n",
        ["tests/test_server.py::test_stop_strings_cut_the_text"],
    ),
    "cutting a buffer rewrites the text its snapshots hold": (
        "tesela/engine/text.py",
        "        return TextBuffer(self.slice(0, keep))\n",
        "        self._pieces[:] = [self.slice(0, keep)]\n        self._ends[:] = [keep]\n"
        "        self._length = keep\n        return self\n",
        ["tests/test_text.py::test_a_snapshot_keeps_its_text_when_the_buffer_grows_or_is_cut"],
    ),
    "padding tokens reach the KV cache": (
        "tesela/attention/op.py",
        "    n = batch.num_tokens\n",
        "    n = q.shape[0]\n",
        # the split op serves eager and compiled pieces; breakable replays run bound calls
        [
            "tests/test_piecewise.py::test_piecewise_equals_eager_at_every_boundary",
            "tests/test_piecewise_compiled.py::test_one_compile_serves_every_size_bitwise",
        ],
    ),
    "breakable replay skips the plan check of its bound split calls": (
        "tesela/attention/op.py",
        '    context.check_plan("attention")\n    return context.attn_backend.prepare_split_replay(',
        "    return context.attn_backend.prepare_split_replay(",
        [
            LAUNCHER_TESTS
            + "::test_a_replay_with_a_plan_for_another_batch_is_refused_before_any_split"
        ],
    ),
    "bound split calls store and attend the padding tokens": (
        "tesela/attention/base.py",
        "            n = replay.num_tokens  # only the real tokens are stored and attended\n",
        "            n = q.shape[0]\n",
        ["tests/test_piecewise.py::test_padding_is_zeroed_and_never_reaches_the_kv_cache"],
    ),
    "launcher key misses the dtype": (
        "tesela/attention/triton_kernels/launcher.py",
        "        return (value.dtype, value.data_ptr() % 16 == 0)\n",
        "        return value.data_ptr() % 16 == 0\n",
        [LAUNCHER_TESTS],
    ),
    "launcher key misses Triton's ==1 specialization": (
        "tesela/attention/triton_kernels/launcher.py",
        "        return (value == 1, value % 16 == 0, value in _INT32)\n",
        "        return (value % 16 == 0, value in _INT32)\n",
        [LAUNCHER_TESTS],
    ),
    "launcher lets a constexpr ride in a runtime group": (
        "tesela/attention/triton_kernels/launcher.py",
        "        if kinds != self.constexpr:\n",
        "        if False:\n",
        [LAUNCHER_TESTS],
    ),
    "FULL mixed replay with the capture batch's plan": (
        MIXED,
        "        return key, self.planner.plan(batch, split_decode=key[1])\n",
        "        return key, self.planner.plan(self._static_batch(key[0]), split_decode=key[1])\n",
        MIXED_TESTS,
    ),
    "FULL mixed replay plans no LoRA part": (
        MIXED,
        "        return key, self.planner.plan(batch, split_decode=key[1])\n",
        "        return key, ForwardPlan(\n"
        "            batch.stamp, self.planner.plan(batch, split_decode=key[1]).attn_metadata\n"
        "        )\n",
        MIXED_LORA_TESTS,
    ),
    "FULL mixed replay does not check its plan": (
        MIXED,
        '        self.planner.check_replay(plan, batch, "FULL mixed replay")\n',
        "",
        MIXED_LORA_TESTS,
    ),
    "LoRA padding tokens keep the last batch's slots (no real-token count)": (
        "tesela/lora/state.py",
        "        rows[4, 0] = n\n",
        "        rows[4, 0] = n + 1\n",
        MIXED_LORA_TESTS,
    ),
    "FULL mixed absent tiles run (as row 0 from query -1)": (
        "tesela/attention/triton_kernels/extend_attention.py",
        "        while row >= 0:\n",
        "        while tile < num_tiles:\n            row = tl.maximum(row, 0)\n",
        MIXED_TESTS,
    ),
    "FULL mixed decode entries write the row's token": (
        "tesela/attention/triton_kernels/decode_attention.py",
        "        token = tl.load(entry_tokens_ptr + entry)\n",
        "        token = row\n",
        MIXED_TESTS,
    ),
    "MoE layers never see the real-token count of a padded replay": (
        "tesela/core/forward_context.py",
        "    _run_batch_hooks(batch.num_tokens if pinned is None else pinned)\n",
        "",
        [MOE_PADDING_TEST],
    ),
    "the CPU stand-in records the MoE real-token count write": (
        "tesela/layers/moe/padding.py",
        "    with torch._C._DisableTorchDispatch():\n",
        "    if True:\n",
        [MOE_PADDING_TEST],
    ),
    "FULL decode replay writes the padded size as the MoE real-token count": (
        FULL,
        "        with batch_state(n, plan):",
        "        with batch_state(size, plan):",
        ["tests/test_moe_triton.py::test_full_decode_replay_routes_padding_rows_to_no_expert"],
    ),
    "MoE per-pair kernel ignores the real-token count": (
        "tesela/layers/moe/kernels.py",
        "        valid = valid & (pair // top_k < tl.load(num_valid_tokens_ptr))\n",
        "        valid = valid\n",
        ["tests/test_moe_triton.py::test_gate_up_gemv_skips_padding_pairs"],
    ),
    "MoE down-sum kernel computes padding tokens like real ones": (
        "tesela/layers/moe/kernels.py",
        "        valid = valid & (token < tl.load(num_valid_tokens_ptr))\n",
        "        valid = valid\n",
        ["tests/test_moe_triton.py::test_down_sum_kernel_masks_slots_itself"],
    ),
    "MoE down-sum kernel keeps out-of-range expert slots": (
        "tesela/layers/moe/kernels.py",
        "    valid = slot_mask & (experts >= 0) & (experts < num_experts)\n",
        "    valid = slot_mask & (experts < num_experts)\n",
        ["tests/test_moe_triton.py::test_down_sum_kernel_masks_slots_itself"],
    ),
    "MoE fused router skips the renormalisation": (
        "tesela/layers/moe/kernels.py",
        "        weights = weights / tl.sum(weights, axis=0)  # lanes past TOP_K hold 0\n",
        "        weights = weights\n",
        [
            "tests/test_moe_triton.py::test_fused_router_matches_select_experts",
            "tests/test_moe_triton.py::test_models_with_the_kernel_match_transformers",
        ],
    ),
    "MoE fused router breaks ties to the highest expert": (
        "tesela/layers/moe/kernels.py",
        "        expert = tl.min(tl.where(probs == best, offs_e, BLOCK_E), axis=0)\n",
        "        expert = tl.max(tl.where(probs == best, offs_e, -1), axis=0)\n",
        ["tests/test_moe_triton.py::test_fused_router_breaks_ties_to_the_lowest_expert"],
    ),
    "MoE grouping keeps padding tokens": (
        "tesela/layers/moe/align.py",
        "        keep &= token < num_valid_tokens\n",
        "",
        ["tests/test_moe_triton.py::test_padding_tokens_change_nothing"],
    ),
    "noise keyed by row position instead of the seed": (
        SAMPLING,
        "    row_key = hash32(hash32(seed) ^",
        "    row_key = hash32(hash32(torch.arange(seed.shape[0], device=seed.device)) ^",
        ["tests/test_sampler_seeds.py"],
    ),
    "noise ignores the token index": (
        SAMPLING,
        "hash32(hash32(seed) ^ _mul32(index & _MASK32, 0x27D4EB2F))",
        "hash32(hash32(seed))",
        ["tests/test_sampler_seeds.py"],
    ),
    "sampling graph replays with the previous step's parameters": (
        FULL,
        "        self.sampling.copy_(tensors)",
        "        pass",
        ["tests/test_dispatcher.py::test_sampling_graphs_draw_what_eager_sampling_draws"],
    ),
    "a graph's token output read after the next replay": (
        SAMPLING,
        "        return t.clone()",
        "        return t",
        [OVERLAP + "::test_full_decode_graphs_sample_as_eager_with_overlap_on_and_off"],
    ),
    "next batch's decode ids not gathered from the device": (
        "tesela/executor/model_runner.py",
        "            feed(batch.input_ids)",
        "            pass",
        [OVERLAP + "::test_greedy_and_seeded_tokens_equal_with_overlap_on_and_off"],
    ),
    "a token drawn after the request finished is kept": (
        "tesela/engine/scheduler.py",
        "            if token is None or request.is_finished:",
        "            if token is None:",
        [OVERLAP + "::test_abort_with_a_token_in_flight_frees_its_blocks"],
    ),
    "a block whose last id is in flight is hashed and cached": (
        BLOCKS,
        "        known = min(request.num_computed_tokens, request.num_tokens - request.num_inflight_tokens)",
        "        known = request.num_computed_tokens",
        [OVERLAP + "::test_prefix_cache_holds_only_emitted_tokens_under_overlap"],
    ),
    "overlap is kept under tensor parallelism": (
        ENGINE,
        "    if tensor_parallel_size > 1:\n        if chosen:",
        "    if tensor_parallel_size > 1:\n        if False:",
        [OVERLAP + "::test_overlap_option_resolves_per_device_and_refuses_tensor_parallel"],
    ),
    "a request whose last token is in flight is scheduled again": (
        "tesela/engine/scheduler.py",
        "            if request.num_inflight_tokens and request.reaches_length_limit(",
        "            if False and request.reaches_length_limit(",
        [OVERLAP + "::test_each_step_is_read_back_one_step_later"],
    ),
    "LoRA expand runs one token past its segment": (
        KERNELS,
        "row_mask = (rows >= seg_lo) & (rows < seg_hi) & (rows < m_end)\n"
        "                    s_offs",
        "row_mask = (rows >= seg_lo) & (rows <= seg_hi) & (rows < m_end)\n"
        "                    s_offs",
        LORA_KERNEL_TESTS,
    ),
    "LoRA scaling dropped": (
        KERNELS,
        "out = y.to(tl.float32) + delta * scaling",
        "out = y.to(tl.float32) + delta",
        LORA_KERNEL_TESTS,
    ),
    "LoRA sgmv expand adds only the first K split's partial sums": (
        KERNELS,
        "for split in tl.static_range(SPLIT_K):",
        "for split in tl.static_range(1):",
        LORA_KERNEL_TESTS,
    ),
    "LoRA sgmv expand walks only a program's first column tile": (
        KERNELS,
        "for n0 in range(col_lo, col_hi, BLOCK_N):",
        "for n0 in range(col_lo, col_lo + BLOCK_N, BLOCK_N):",
        LORA_KERNEL_TESTS,
    ),
    "LoRA fused decode kernel's K steps skip a chunk": (
        KERNELS,
        "for k0 in range(0, K, K_UNROLL * BLOCK_K):",
        "for k0 in range(0, K, (K_UNROLL + 1) * BLOCK_K):",
        LORA_KERNEL_TESTS,
    ),
    "LoRA fused decode kernel reads A past the slot's rank": (
        KERNELS,
        "mask=(r < rank)[:, None] & (ks < K)[None, :]",
        "mask=(ks < K)[None, :]",
        LORA_KERNEL_TESTS,
    ),
    "fused LoRA GEMM reads B past the slot's rank": (
        "tesela/lora/fused_gemm.py",
        "bt = tl.where((r < rank)[:, None], bt, 0.0)",
        "bt = bt",
        LORA_KERNEL_TESTS,
    ),
    "fused LoRA GEMM skips the slots between a block's first and last": (
        "tesela/lora/fused_gemm.py",
        "while tl.sum(rest.to(tl.int32)) > 0:",
        "while tl.sum(rest.to(tl.int32)) > BLOCK_M:",
        LORA_KERNEL_TESTS,
    ),
    "fused LoRA GEMM adds a slot's delta to every adapter row": (
        "tesela/lora/fused_gemm.py",
        "sa = tl.where((row_slot == slot)[:, None], st, 0.0)",
        "sa = tl.where((row_slot >= 0)[:, None], st, 0.0)",
        LORA_KERNEL_TESTS,
    ),
    "fused LoRA GEMM reads only the shrink's first K plane": (
        "tesela/lora/fused_gemm.py",
        "for split in tl.static_range(SPLIT_K):",
        "for split in tl.static_range(1):",
        LORA_KERNEL_TESTS,
    ),
    "a tuned LoRA tile changes a token's sum order (eager and graphs disagree)": (
        "tesela/lora/tiles.py",
        " else replace(LoRATiles(**entry), **order)\n",
        " else LoRATiles(**entry)\n",
        [
            "tests/test_lora_kernels.py::"
            "test_a_tuned_tile_serves_its_own_bucket_only_in_the_default_sum_order"
        ],
    ),
    "LoRA buffers skip a write of another batch with the same token count": (
        "tesela/lora/state.py",
        "        held = (tuple(segments), n)\n",
        "        held = n\n",
        LORA_KERNEL_TESTS,
    ),
    "LoRA decode kernel reads padding tokens' stale slots": (
        KERNELS,
        "slot = tl.load(token_slot_ptr + t, mask=t < tl.load(real_ptr), other=-1)",
        "slot = tl.load(token_slot_ptr + t)",
        LORA_KERNEL_TESTS,
    ),
    "fused LoRA GEMM: padding rows take the last batch's slots": (
        "tesela/lora/fused_gemm.py",
        "row_slot = tl.where(rows < real, row_slot, -1)  # padding tokens: the plain GEMM",
        "row_slot = row_slot",
        LORA_KERNEL_TESTS,
    ),
    "one-launch LoRA GEMM: padding rows take the last batch's slots": (
        "tesela/lora/fused_gemm.py",
        "row_slot = tl.where(rows < real, row_slot, -1)  # padding tokens: no delta",
        "row_slot = row_slot",
        LORA_KERNEL_TESTS,
    ),
    "one-launch LoRA GEMM keeps s past a slot's rank": (
        "tesela/lora/fused_gemm.py",
        " & (c_r < c_rank)[None, :], s, 0.0)",
        ", s, 0.0)",
        LORA_KERNEL_TESTS,
    ),
    "one-launch LoRA GEMM reads B past a slot's rank": (
        "tesela/lora/fused_gemm.py",
        "mask=(c_r < c_rank)[:, None] & (cols < N)[None, :], other=0.0,",
        "mask=(cols < N)[None, :], other=0.0,",
        LORA_KERNEL_TESTS,
    ),
    "one-launch LoRA GEMM adds every slot's delta to an adapter row": (
        "tesela/lora/fused_gemm.py",
        "(row_slot[:, None] == c_slot[None, :])",
        "(row_slot[:, None] >= 0)",
        LORA_KERNEL_TESTS,
    ),
    "split-K one-launch LoRA GEMM leaves its arrival counts set": (
        "tesela/lora/fused_gemm.py",
        "tl.store(arrived_ptr + pid_n, 0)  # ready for the next launch",
        "pass",
        LORA_KERNEL_TESTS,
    ),
    "split-K one-launch LoRA GEMM sums only the last split's partials": (
        "tesela/lora/fused_gemm.py",
        "for i in tl.static_range(SPLIT_K):",
        "for i in tl.static_range(SPLIT_K - 1, SPLIT_K):",
        LORA_KERNEL_TESTS,
    ),
    "split-K one-launch LoRA GEMM: every split covers all of K": (
        "tesela/lora/fused_gemm.py",
        "            k_hi = tl.minimum(k_lo + k_per_split, K)\n",
        "            k_lo, k_hi = 0, K\n",
        LORA_KERNEL_TESTS,
    ),
    "split GEMV leaves its arrival counts set": (
        GEMV,
        "tl.store(arrived_ptr + tile, 0)  # ready for the next launch",
        "pass",
        GEMV_TESTS,
    ),
    "split GEMV sums only the last split's partials": (
        GEMV,
        "for i in tl.static_range(SPLIT_K):",
        "for i in tl.static_range(SPLIT_K - 1, SPLIT_K):",
        GEMV_TESTS,
    ),
    "split GEMV: every split starts at K = 0": (
        GEMV,
        "k_lo = split * k_per_split",
        "k_lo = 0 * k_per_split",
        GEMV_TESTS,
    ),
    "split GEMV stops after its first tile": (
        GEMV,
        "for k0 in range(BLOCK_K, k_per_split, BLOCK_K):",
        "for k0 in range(BLOCK_K, BLOCK_K, BLOCK_K):",
        GEMV_TESTS,
    ),
    "one-launch LoRA GEMM forgets the slot's scaling": (
        "tesela/lora/fused_gemm.py",
        "acc += delta * row_scaling[:, None]",
        "acc += delta",
        LORA_KERNEL_TESTS,
    ),
    "LoRA decode kernel adds the delta to its first column tile only": (
        KERNELS,
        "for n0 in range(col_lo + BLOCK_N, col_hi + BLOCK_N, BLOCK_N):",
        "for n0 in range(col_lo + BLOCK_N, col_lo + 2 * BLOCK_N, BLOCK_N):",
        LORA_KERNEL_TESTS,
    ),
    "rsLoRA scaled as plain LoRA": (
        "tesela/lora/adapter.py",
        "alpha / math.sqrt(rank) if",
        "alpha / rank if",
        LORA_PEFT_TESTS,
    ),
    "a fused slice's B written at offset 0": (
        "tesela/lora/adapter.py",
        "    stacked_b[offset : offset + size].copy_(b)",
        "    stacked_b[:size].copy_(b)",
        LORA_PEFT_TESTS,
    ),
    "base rows served by adapter slot 0": (
        "tesela/lora/manager.py",
        "if i else NO_SLOT for i in lora_ids]",
        "if i else 0 for i in lora_ids]",
        [LORA_MIXED],
    ),
    "the LoRA op skips batches without adapters (baked into graphs)": (
        "tesela/lora/layer.py",
        "    manager = state.manager\n",
        "    manager = state.manager\n    if not state.has_adapters:\n"
        "        return manager.base_linear(x, weight, bias)\n",
        ["tests/test_lora.py::test_graphs_captured_without_adapters_launch_the_lora_kernels"],
    ),
    "a plan's LoRA buffers are not checked for a later plan": (
        "tesela/core/plan.py",
        "                part.check_current(where)\n",
        "                pass\n",
        ["tests/test_lora.py::test_running_with_another_batchs_lora_state_is_an_error"],
    ),
    "the scheduler admits more adapters than slots": (
        "tesela/engine/scheduler.py",
        "            if not self._adapter_fits(request):\n",
        "            if False:\n",
        ["tests/test_lora.py::test_scheduler_keeps_running_adapters_within_max_loras"],
    ),
    "the prefix cache key ignores the adapter": (
        "tesela/engine/request.py",
        "return (self.lora_id, self.lora_int_id, self.cache_salt)",
        "return (self.lora_id, self.cache_salt)",
        ["tests/test_lora.py::test_adapters_never_share_cached_prefixes"],
    ),
    "presence penalty not applied": (
        "tesela/engine/sampler.py",
        "    return logits - presence * (output_counts > 0).to(logits.dtype)\n",
        "    return logits\n",
        ["tests/test_sampler.py"],
    ),
    "prompt logprobs score the wrong token": (
        "tesela/engine/llm_engine.py",
        "[request.prompt_token_ids[p + 1] for p in positions]",
        "[request.prompt_token_ids[p] for p in positions]",
        ["tests/test_sampler.py::test_prompt_logprobs_match_transformers_across_prefill_chunks"],
    ),
    "chat templates render unsandboxed": (
        "tesela/tokenizer.py",
        "    environment = ImmutableSandboxedEnvironment(",
        "    import jinja2\n\n    environment = jinja2.Environment(",
        ["tests/test_server_hardening.py::test_a_hostile_chat_template_fails_safely"],
    ),
    "request parsing and templating on the event loop": (
        "tesela/server/routes.py",
        "        return await anyio.to_thread.run_sync(function, raw, limiter=self.preprocess_limiter)",
        "        return function(raw)",
        ["tests/test_server_hardening.py::test_templating_runs_off_the_event_loop"],
    ),
    "huge prompts tokenized before the length check": (
        "tesela/server/protocol.py",
        "        if len(text) > self.max_prompt_chars:",
        "        if False:",
        [
            "tests/test_server_hardening.py::test_health_answers_within_a_second_while_a_50_mb_request_is_in_flight"
        ],
    ),
    "a 500 is re-raised to uvicorn (connection reset, logged twice)": (
        "tesela/server/routes.py",
        "                await error_response(error)(scope, receive, send_with_id)\n",
        "                await error_response(error)(scope, receive, send_with_id)\n            raise\n",
        [
            "tests/test_server_hardening.py::test_a_500_carries_a_request_id_not_internals_and_keeps_the_connection"
        ],
    ),
    "SIGTERM without a drain": (
        "tesela/server/shutdown.py",
        "asyncio.ensure_future(drain_engine(self.config.app, self.drain_timeout))",
        "asyncio.ensure_future(asyncio.sleep(0))",
        ["tests/test_serve_process.py::test_sigterm_drains_then_ends_open_streams_cleanly"],
    ),
    "SIGTERM re-raised after shutdown (exit status not 0)": (
        "tesela/server/shutdown.py",
        "    def capture_signals(self):",
        "    def _unused_capture_signals(self):",
        ["tests/test_serve_process.py::test_sigterm_drains_then_ends_open_streams_cleanly"],
    ),
    "a partial block enters the prefix cache": (
        BLOCKS,
        "num_full = min(known // self.block_size",
        "num_full = min(blocks_for(known, self.block_size)",
        CACHE_TESTS,
    ),
    "the block hash ignores the namespace (LoRA id, cache salt)": (
        BLOCKS,
        "    digest.update(repr(extra_keys).encode())\n",
        "",
        CACHE_TESTS,
    ),
    "an evicted block stays in the hash table": (
        BLOCKS,
        "            del self._cached[self._block_hashes[block]]\n",
        "",
        CACHE_TESTS,
    ),
    "a hit on an evictable block leaves it evictable": (
        BLOCKS,
        "                    del self._evictable[block]\n",
        "                    pass\n",
        CACHE_TESTS,
    ),
    "a fully cached prompt runs no token": (
        BLOCKS,
        "(request.num_tokens - 1) // self.block_size",
        "request.num_tokens // self.block_size",
        CACHE_TESTS,
    ),
    "blocks are never registered after their forward": (
        SCHEDULER,
        "shared.\n            self.block_manager.cache_full_blocks(request)\n",
        "shared.\n",
        CACHE_TESTS + [OVERLAP],
    ),
    "a block whose last token is in flight is hashed from the ids the host knows": (
        BLOCKS,
        "request.num_tokens - request.num_inflight_tokens)",
        "request.num_tokens)",
        [OVERLAP + "::test_prefix_blocks_register_at_launch_and_never_with_an_in_flight_id"],
    ),
    "a block completed by an in-flight token is registered only at a later launch": (
        SCHEDULER,
        "known now.\n            self.block_manager.cache_full_blocks(request)\n",
        "known now.\n",
        [OVERLAP + "::test_prefix_blocks_register_at_launch_and_never_with_an_in_flight_id"],
    ),
    "a multi-token recompute row is labelled decode": (
        SCHEDULER,
        "            self.num_new_tokens[row] == 1\n            and ",
        "            ",
        ["tests/test_prefix_cache.py", "tests/test_prefix_cache_triton.py"],
    ),
    "the batch mode labels a multi-token row decode": (
        "tesela/core/forward_batch.py",
        "decode_rows = [n == 1 and p > 0 for",
        "decode_rows = [p > 0 for",
        ["tests/test_kv_pressure.py::test_recompute_chunks_past_the_prompt_are_extend_work"],
    ),
    "a DECODE label is not checked against the rows": (
        "tesela/core/forward_batch.py",
        "    if mode is ForwardMode.DECODE and any(n != 1 for n in extend_lens):\n",
        "    if False:\n",
        ["tests/test_kv_pressure.py::test_a_decode_label_on_multi_token_rows_cannot_be_built"],
    ),
    "admission lets prompt + max_tokens exceed max_model_len": (
        SCHEDULER,
        "        if n + max_tokens > max_model_len:\n",
        "        if False:\n",
        ["tests/test_admission.py"],
    ),
    "max_model_len is not fitted to the KV pool": (
        "tesela/engine/llm_engine.py",
        "    if max_model_len <= capacity:\n",
        "    if True:\n",
        ["tests/test_admission.py"],
    ),
    "a declared but unimplemented variant is kept": (
        "tesela/attention/policy.py",
        "        return not situation.implemented(spec, variant)\n",
        "        return False\n",
        ["tests/test_attention_policy.py"],
    ),
    "every layer gets the sliding window": (
        "tesela/attention/base.py",
        "        if self.sliding_window_layers is None or layer_id in self.sliding_window_layers:\n",
        "        if True:\n",
        ["tests/test_sliding_window.py"],
    ),
    "FULL mixed capture puts a whole size in one row past the buffers' blocks per row": (
        MIXED,
        "        rows = capture_batch(size, self.block_size, self.graphs.device, row_tokens)\n",
        "        rows = capture_batch(size, self.block_size, self.graphs.device)\n",
        ["tests/test_full_mixed.py::test_sizes_past_the_row_limit_capture_over_several_rows"],
    ),
    "shutdown keeps the graph runners (NCCL teardown would block)": (
        "tesela/executor/dispatcher.py",
        "        self.runners = {RunPath.EAGER: self.runners[RunPath.EAGER]}\n",
        "",
        ["tests/test_dispatcher.py::test_released_graphs_leave_an_eager_runner_that_still_serves"],
    ),
    "an untuned MoE bucket borrows a neighbour's tiles": (
        "tesela/layers/moe/tile_configs.py",
        "    config = by_bucket.get(str(m_bucket(num_tokens)))\n",
        "    config = next((by_bucket[b] for b in sorted(by_bucket, key=int, reverse=True)"
        " if int(b) <= num_tokens), None)\n",
        ["tests/test_moe.py::test_tile_configs_by_shape_and_token_bucket"],
    ),
    "shutdown leaves graphs that something else still references": (
        "tesela/executor/model_runner.py",
        "        self.graph_factory.reset_all()  # also the graphs something else still references\n",
        "",
        ["tests/test_dispatcher.py::test_released_graphs_leave_an_eager_runner_that_still_serves"],
    ),
    "a length stop counts the token in flight (overlap drops the last token)": (
        "tesela/engine/request.py",
        "        if len(self.prompt_token_ids) + len(self.output_token_ids) >= max_model_len:\n",
        "        if self.num_tokens >= max_model_len:\n",
        [
            "tests/test_overlap.py::test_a_request_ending_at_max_model_len_keeps_its_last_token_in_flight"
        ],
    ),
    "sampling graphs serve a decode batch with a row that does not sample": (
        FULL,
        "        return self.samples_in_graph and batch.logits_indices.shape[0] == batch.batch_size\n",
        "        return self.samples_in_graph\n",
        [
            "tests/test_dispatcher.py::test_a_decode_batch_with_a_row_that_does_not_sample_samples_the_others"
        ],
    ),
    "GEMV tuner cases miss the padded vocabulary shard": (
        "tesela/tune/gemv.py",
        "    vocab = padded_vocab(mc.vocab_size, size) // size\n",
        "    vocab = mc.vocab_size // size\n",
        ["tests/test_tune_gemv.py"],
    ),
    "GEMV tuner never tries one tile over all of K at 1-2 tokens": (
        "tesela/tune/gemv.py",
        "    if bucket <= 2 and 1024 < whole_k <= 8192:\n",
        "    if False:\n",
        ["tests/test_tune_gemv.py"],
    ),
    "a GEMV tune of some M buckets drops the shape's other entries": (
        "tesela/tune/gemv.py",
        "    return {b: c for b, c in previous.items() if int(b) not in buckets} | chosen\n",
        "    return chosen\n",
        ["tests/test_tune_gemv.py"],
    ),
    "the offline loop extends every request's text every step": (
        ENGINE,
        "            if texts or request.params.stop:\n",
        "            if True:\n",
        [
            "tests/test_engine.py::test_the_offline_loop_decodes_a_text_once_unless_it_has_stop_strings"
        ],
    ),
    "the offline loop defers the text of requests with stop strings too": (
        ENGINE,
        "            if texts or request.params.stop:\n",
        "            if texts:\n",
        [
            "tests/test_engine.py::test_the_offline_loop_decodes_a_text_once_unless_it_has_stop_strings"
        ],
    ),
    "the decode-step profile measures from the previous kernel's end, not the latest": (
        "scripts/profile_decode_step.py",
        "        last_end = end if last_end is None else max(last_end, end)\n",
        "        last_end = end\n",
        ["tests/test_profile_decode_step.py"],
    ),
    "decode attention loads the query before its PDL wait": (
        "tesela/attention/triton_kernels/decode_attention.py",
        "    )\n    grid_dependency_sync(PDL)\n    # Splits beyond what this row uses are never read",
        "    )\n    q = tl.load(q_ptr + token * stride_q_token)\n    grid_dependency_sync(PDL)\n"
        "    # Splits beyond what this row uses are never read",
        ["tests/test_pdl.py"],
    ),
    "decode attention's merge loads the partial sums before its PDL wait": (
        "tesela/attention/triton_kernels/decode_attention.py",
        "    _, _, splits = _row_splits(seq_len, num_kv_splits, min_split_len, WINDOW, BLOCK_N)\n"
        "    grid_dependency_sync(PDL)\n",
        "    _, _, splits = _row_splits(seq_len, num_kv_splits, min_split_len, WINDOW, BLOCK_N)\n"
        "    lse0 = tl.load(partial_lse_ptr + entry * stride_lse_row)\n"
        "    grid_dependency_sync(PDL)\n",
        ["tests/test_pdl.py"],
    ),
    "q/k norm + rotary loads the qkv row before its PDL wait": (
        "tesela/layers/fused.py",
        "        grid_dependency_sync(PDL)\n"
        "        base = token.to(tl.int64) * stride_token + heads[:, None] * (2 * HALF) + cols[None, :]\n"
        "        x1 = tl.load(qkv_ptr + base, mask=mask, other=0.0)\n",
        "        base = token.to(tl.int64) * stride_token + heads[:, None] * (2 * HALF) + cols[None, :]\n"
        "        x1 = tl.load(qkv_ptr + base, mask=mask, other=0.0)\n"
        "        grid_dependency_sync(PDL)\n",
        ["tests/test_pdl.py"],
    ),
    "custom all-reduce takes every message size": (
        "tesela/distributed/custom_all_reduce.py",
        "    if nbytes <= TWO_SHOT_MAX_BYTES:\n",
        "    if True:\n",
        ["tests/test_custom_all_reduce.py"],
    ),
    "custom all-reduce takes fp16, which its one-shot kernel lacks": (
        "tesela/distributed/custom_all_reduce.py",
        "DTYPES = (torch.bfloat16, torch.float32)",
        "DTYPES = (torch.bfloat16, torch.float16, torch.float32)",
        ["tests/test_custom_all_reduce.py"],
    ),
    "packed batch metadata loses its 16-byte alignment": (
        "tesela/core/forward_batch.py",
        "        total += -(-array.nbytes // ALIGN) * ALIGN\n",
        "        total += -(-array.nbytes // 8) * 8\n",
        ["tests/test_paged_forward.py"],
    ),
    "engine core resends the whole text every step": (
        "tesela/server/engine_core.py",
        "        keep = text.common_prefix(text_sent)\n",
        "        keep = 0\n",
        ["tests/test_engine_core.py"],
    ),
    "engine-core client drops the abort of a disconnected stream": (
        "tesela/server/core_client.py",
        "            self._send((core.ABORT, ids))\n",
        "            pass\n",
        ["tests/test_server.py::test_clients_that_disconnect_leave_no_kv_blocks"],
    ),
    "engine-core client leaves requests in flight when the engine dies": (
        "tesela/server/core_client.py",
        "        self._fail(list(self._live), error, abort=False)\n        for future, _ in self._adds",
        "        for future, _ in self._adds",
        ["tests/test_engine_core.py"],
    ),
    "a tensor-parallel runner has no lora_manager (served TP engines fail to start)": (
        "tesela/executor/multiproc.py",
        "    @property\n    def lora_manager(self) -> None:",
        "    def _no_lora_manager(self) -> None:",
        ["tests/test_engine_core.py::test_a_tensor_parallel_engine_serves_over_http"],
    ),
    "GEMV tuner cases miss the MoE router": (
        "tesela/tune/gemv.py",
        '        cases.append(("none", mc.moe.num_experts, h))\n',
        "        pass\n",
        ["tests/test_tune_gemv.py"],
    ),
    "bench client drops SSE text cut across two chunks": (
        "tesela/bench/sse_client.py",
        "            pending += data\n",
        "            pending = data\n",
        ["tests/test_sse_client.py"],
    ),
    "frontend never hears that the engine process exited": (
        "tesela/server/core_client.py",
        "            waiter.add_done_callback(lambda _: self._on_exit(self.process.exitcode))\n",
        "",
        ["tests/test_engine_core.py"],
    ),
    "chat templating runs inline on the event loop": (
        "tesela/server/routes.py",
        '"chatcmpl")',
        '"chatcmpl", inline=True)',
        ["tests/test_server_hardening.py::test_templating_runs_off_the_event_loop"],
    ),
    "fused MoE router leaves its token counter at the last ticket": (
        "tesela/layers/moe/kernels.py",
        "        tl.store(counters_ptr + token, 0)\n",
        "        pass\n",
        ["tests/test_moe_triton.py"],
    ),
    "fused MoE router stores logits past the last expert": (
        "tesela/layers/moe/kernels.py",
        "    tl.store(row_ptr + offs_e, logits, mask=e_mask)\n",
        "    tl.store(row_ptr + offs_e, logits)\n",
        ["tests/test_moe_triton.py"],
    ),
    "MoE layers in FULL mixed graphs count padding tokens as real": (
        "tesela/layers/moe/padding.py",
        "            count.fill_(ALL_TOKENS if num_tokens is None else num_tokens)\n",
        "            count.fill_(ALL_TOKENS)\n",
        ["tests/test_full_mixed.py::test_moe_layers_run_inside_full_mixed_graphs"],
    ),
    "MoE tuner's small-batch routings reuse experts from L2": (
        "tesela/tune/moe.py",
        "    if pairs <= num_experts:\n",
        "    if False:\n",
        ["tests/test_tune_moe.py"],
    ),
    "GEMV kernel reads its input before waiting for the previous grid (PDL)": (
        "tesela/layers/gemv.py",
        "        grid_dependency_sync(PDL)\n",
        "",
        ["tests/test_pdl.py"],
    ),
    "a kernel launch sets PDL without pairing it with launch_pdl": (
        "tesela/layers/fused.py",
        "        num_warps=4 if n_cols <= 2048 else 8, **launch_kwargs(x.device, tokens),\n",
        "        num_warps=4 if n_cols <= 2048 else 8, PDL=False,\n",
        ["tests/test_pdl.py"],
    ),
    "launches over more than pdl.MAX_TOKENS tokens use PDL": (
        "tesela/core/pdl.py",
        "    return num_tokens <= MAX_TOKENS and _on(index)\n",
        "    return _on(index)\n",
        ["tests/test_pdl.py::test_launches_over_more_tokens_than_max_tokens_never_use_pdl"],
    ),
    "FULL graphs' extend programs skip tiles of a table longer than the grid": (
        "tesela/attention/triton_kernels/extend_attention.py",
        "            tile += tl.num_programs(1)\n",
        "            tile += 2 * tl.num_programs(1)\n",
        [
            "tests/test_triton_attention.py::test_tiled_programs_walk_every_tile_of_a_table_longer_than_the_grid"
        ],
    ),
    "graph runners copy a batch's token rows in the wrong order": (
        "tesela/executor/buffers.py",
        "        self.rows[:, :n].copy_(batch.token_rows, non_blocking=True)\n",
        "        self.rows[:, :n].copy_(batch.token_rows.flip(0), non_blocking=True)\n",
        PIECEWISE_TESTS,
    ),
    "the rotary kernel stores tokens past the batch's slots": (
        "tesela/layers/fused.py",
        "            stores = token < num_slots\n",
        "            stores = token >= 0\n",
        [KV_STORE_TESTS + "::test_the_rotary_kernel_stores_kv_as_the_attention_store_would"],
    ),
    "attention told kv_stored stores K/V anyway": (
        "tesela/attention/triton_backend.py",
        "        if replay.store is not None and not self.kv_stored:\n",
        "        if replay.store is not None:\n",
        [KV_STORE_TESTS + "::test_attention_told_kv_stored_leaves_the_pool_alone"],
    ),
    "binding the sized pool leaves the KV pointer table on the provisional pool": (
        "tesela/attention/base.py",
        "            self._pool_pointers.copy_(pool_pointers(kv_cache))\n",
        "            pass\n",
        [KV_STORE_TESTS],
    ),
    "FULL mixed capture batches keep their own KV slots": (
        MIXED,
        "        return self.buffers.view_batch(rows)\n",
        "        self.buffers.copy_from(rows, size)\n        return rows\n",
        [KV_STORE_TESTS],
    ),
    "a layer whose rotary kernel stored K/V lets attention store them again": (
        "tesela/models/llama.py",
        "            kv_stored = target is not None\n",
        "            kv_stored = False\n",
        [KV_STORE_TESTS],
    ),
    "the GEMV tuner drops a fused prologue that ties with the unfused path": (
        "tesela/tune/gemv.py",
        "    return triton_us < unfused_us * (1 + margin)\n",
        "    return triton_us * (1 + margin) < unfused_us\n",
        ["tests/test_tune_gemv.py"],
    ),
    "the rotary kernel's KV store strides slots by the unsharded KV heads": (
        "tesela/layers/fused.py",
        "                row = slot * num_kv_heads * (2 * HALF)",
        "                row = slot * 2 * (2 * HALF)",
        ["tests/test_tensor_parallel.py::test_tp2_logits_and_greedy_equal_tp1"],
    ),
    "piecewise pieces keep the provisional pool's addresses": (
        "tesela/attention/base.py",
        "        return KVStoreTarget(self._pool_pointers, layer_id, batch.out_cache_loc)\n",
        "        return KVStoreTarget(pool_pointers(self.kv_cache), layer_id, batch.out_cache_loc)\n",
        [KV_STORE_TESTS + "::test_each_path_stores_what_eager_stores"],
    ),
    "a prologue tuned alone is timed against cuBLAS, not the table's plain kernel": (
        "tesela/tune/gemv.py",
        '        for shape, buckets in entries.get("none", {}).items()\n',
        '        for shape, buckets in entries.get("plain", {}).items()\n',
        ["tests/test_tune_gemv.py"],
    ),
    "a fused all-reduce rank sums its peers' rows before they arrive": (
        FUSED_AR,
        "axis=0) > 0) & (aborted == 0):\n",
        "axis=0) < 0) & (aborted == 0):\n",
        [FUSED_AR_TESTS + "::test_every_rank_gets_the_same_reduced_add_norm"],
    ),
    "a fused all-reduce rank leaves the rows it read last call written": (
        FUSED_AR,
        "            tl.store(own + place + cols, unwritten, mask=mask)\n",
        "",
        [FUSED_AR_TESTS + "::test_every_rank_gets_the_same_reduced_add_norm"],
    ),
    "a fused all-reduce rank ignores the abort flag": (
        FUSED_AR,
        "                    aborted = tl.load(abort_at, volatile=True)\n",
        "                    aborted = tl.load(abort_at, volatile=True) * 0\n",
        [FUSED_AR_TESTS + "::test_abort_ends_a_wait_for_a_peer_that_never_pushes"],
    ),
    "the fused all-reduce launches with PDL past the rows its two-card tests ran at": (
        FUSED_AR,
        "    return rows if rows <= PDL_ROWS else sys.maxsize\n",
        "    return rows\n",
        [
            "tests/test_pdl.py::"
            "test_the_fused_all_reduce_uses_pdl_only_up_to_the_rows_it_was_measured_at"
        ],
    ),
    "peer memory is set up although rank 0 made more rendezvous than its workers": (
        "tesela/distributed/group.py",
        "    if len(set(counts)) == 1:\n",
        "    if True:\n",
        [
            "tests/test_tensor_parallel.py::test_peer_memory_only_where_every_rank_made_as_many_rendezvous"
        ],
    ),
    "FULL mixed padding tokens keep the last batch's tokens (the prologue pads nothing)": (
        PLAN_KERNEL,
        "            pad = cols < padded_tokens\n",
        "            pad = cols < 0\n",
        ["tests/test_full_mixed.py::test_padding_is_zero_length_work"],
    ),
    "FULL mixed replays the previous batch's tokens (the prologue copies none)": (
        PLAN_KERNEL,
        "            mine = cols < start_r + extend_r\n",
        "            mine = cols < start_r\n",
        ["tests/test_overlap.py::test_full_decode_graphs_sample_as_eager_with_overlap_on_and_off"],
    ),
    "FULL mixed tiles tied on their causal walk: the lower row first": (
        PLAN_KERNEL,
        "            tie = tie & (rows[None, :] > pid)\n",
        "            tie = tie & (rows[None, :] < pid)\n",
        [MIXED_TESTS[0] + "::test_the_graph_derives_the_metadata_the_host_would"],
    ),
    "FULL mixed gives a decode row a tile as well as its entry": (
        PLAN_KERNEL,
        "                tiles_r = tiles_r * 0\n",
        "",
        [MIXED_TESTS[0] + "::test_the_graph_derives_the_metadata_the_host_would"],
    ),
    "FULL mixed leaves the last batch's tiles past this batch's": (
        PLAN_KERNEL,
        "            gone = (t >= total_tiles) & (t < num_tiles)\n",
        "            gone = (t >= num_tiles)\n",
        [MIXED_TESTS[0] + "::test_the_graph_derives_the_metadata_the_host_would"],
    ),
    "the pack's layout forgets the header": (
        "tesela/core/forward_batch.py",
        "    seq_at = 4 + _aligned(6 * tokens)\n",
        "    seq_at = _aligned(6 * tokens)\n",
        [
            "tests/test_paged_forward.py::test_the_pack_is_laid_out_as_its_layout_says_whoever_built_the_batch"
        ],
    ),
    "kv_store_target ignores fuses_kv_store": (
        "tesela/attention/base.py",
        "        if not self.fuses_kv_store:  # the backend stores K/V itself\n",
        "        if self._pool_pointers is None:\n",
        [
            "tests/test_fused_kv_store.py::"
            "test_a_backend_that_stores_itself_gets_no_target_and_the_same_pools"
        ],
    ),
    "ForwardBatch.build drops the offset inside a block from the KV slots": (
        "tesela/core/forward_batch.py",
        "        slots += positions % block_size\n",
        "",
        ["tests/test_paged_forward.py::test_build_places_every_token_where_its_row_and_table_say"],
    ),
    "ForwardBatch.build pads a block table too short for its row with the dummy block": (
        "tesela/core/forward_batch.py",
        "    if len(short):\n",
        "    if False:\n",
        ["tests/test_paged_forward.py::test_a_block_table_too_short_for_its_row_is_refused"],
    ),
    "ab_bench counts its warm-up runs in the medians": (
        "scripts/ab_bench.py",
        "            if round_index >= 0:\n",
        "            if True:\n",
        ["tests/test_ab_bench.py::test_warm_up_runs_run_but_stay_out_of_the_table"],
    ),
    "a running request's output copies its tokens every step": (
        ENGINE,
        "        shown = list if request.is_finished else GrowingPrefix\n",
        "        shown = list\n",
        ["tests/test_engine.py::test_step_outputs_show_each_step_without_copying_the_output"],
    ),
    "a step's output shows tokens drawn after it": (
        "tesela/engine/request.py",
        "    def __len__(self) -> int:\n        return self._length\n",
        "    def __len__(self) -> int:\n        return len(self._items)\n",
        ["tests/test_engine.py::test_step_outputs_show_each_step_without_copying_the_output"],
    ),
    "a step output's slice copies everything before it": (
        "tesela/engine/request.py",
        "                return self._items[start:stop:step]\n",
        "                return self._items[: self._length][start:stop:step]\n",
        ["tests/test_engine.py::test_step_outputs_show_each_step_without_copying_the_output"],
    ),
    "greedy rows take a seed (an unseeded draw depends on the greedy rows beside it)": (
        "tesela/engine/sampler.py",
        "            0 if p.greedy else self.seed_of(p, r) for p, r",
        "            self.seed_of(p, r) for p, r",
        [
            "tests/test_engine.py::test_an_unseeded_draw_does_not_depend_on_the_greedy_rows_beside_it"
        ],
    ),
    "a greedy batch still copies sampling tensors into the FULL decode graph": (
        "tesela/executor/full_decode.py",
        "        if variant.reads_tensors:  # a greedy variant's graph reads none: nothing to copy\n",
        "        if True:\n",
        ["tests/test_dispatcher.py::test_greedy_sampling_graphs_read_no_sampling_tensors"],
    ),
    "the engine builds no sampling tensors for a batch that draws": (
        ENGINE,
        "        if variant.reads_tensors:\n            vocab",
        "        if not variant.reads_tensors:\n            vocab",
        ["tests/test_engine.py"],
    ),
    "a request's span of tokens across prompt and output drops the prompt part": (
        "tesela/engine/request.py",
        "        return prompt[start:] + tail if start < len(prompt) else tail\n",
        "        return tail\n",
        ["tests/test_engine.py::test_a_request_gives_any_span_of_its_tokens_without_joining_them"],
    ),
    "the detokenizer windows over the ids its decode skips": (
        "tesela/engine/detokenizer.py",
        '        self._skips = getattr(tokenizer, "skips", None)\n',
        "        self._skips = None\n",
        ["tests/test_detokenizer.py::test_work_per_token_is_constant"],
    ),
    "the scheduler's no-new-block fast path also skips a step that needs a block": (
        "tesela/engine/scheduler.py",
        "        if blocks_for(total, self.block_manager.block_size) <= len(request.block_ids):\n",
        "        if blocks_for(total - 1, self.block_manager.block_size) <= len(request.block_ids):\n",
        ["tests/test_scheduler.py"],
    ),
    "cache_full_blocks' early return skips blocks that completed": (
        "tesela/engine/block_manager.py",
        "            or request.num_computed_tokens // self.block_size <= request.num_registered_blocks\n",
        "            or request.num_computed_tokens // self.block_size <= request.num_registered_blocks + 1\n",
        ["tests/test_prefix_cache.py"],
    ),
    "FULL decode plans share their size's template instead of stamping a copy": (
        "tesela/attention/triton_backend.py",
        "        metadata = copy.copy(self._decode_graph(batch.batch_size))  # this size's views\n",
        "        metadata = self._decode_graph(batch.batch_size)\n",
        [
            "tests/test_dispatcher.py::test_full_decode_plans_share_views_but_each_keeps_its_batch_stamp"
        ],
    ),
    "argument groups hand cached launches tensors, not addresses": (
        "tesela/attention/triton_kernels/launcher.py",
        "    return tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v for v in values)\n",
        "    return tuple(values)\n",
        [LAUNCHER_TESTS],
    ),
    "host cdiv rounds down": (
        "tesela/core/intmath.py",
        "    return -(-a // b)\n",
        "    return a // b\n",
        ["tests/test_intmath.py"],
    ),
    "decode planning calls Triton's constexpr cdiv again": (
        "tesela/attention/triton_kernels/decode_attention.py",
        "    by_length = cdiv(max(max_seq_len, 1), min_split_len)\n",
        "    by_length = triton.cdiv(max(max_seq_len, 1), min_split_len)\n",
        ["tests/test_intmath.py"],
    ),
    "decode splits are not rounded to whole KV tiles": (
        "tesela/attention/triton_kernels/decode_attention.py",
        "    split_len = tiles * BLOCK_N\n",
        "    split_len = tl.cdiv(kv_len, tl.maximum(splits, 1))\n",
        ["tests/test_triton_attention.py::test_decode_splits_are_whole_kv_tiles"],
    ),
    "an absent decode entry divides by a split length of 0": (
        "tesela/attention/triton_kernels/decode_attention.py",
        "    tiles = tl.maximum(tl.cdiv(tl.cdiv(kv_len, tl.maximum(splits, 1)), BLOCK_N), 1)\n",
        "    tiles = tl.cdiv(tl.cdiv(kv_len, tl.maximum(splits, 1)), BLOCK_N)\n",
        ["tests/test_triton_attention.py::test_absent_entries_use_no_split"],
    ),
    "the merge kernel derives the split count without the tile": (
        "tesela/attention/triton_kernels/decode_attention.py",
        "    _, _, splits = _row_splits(seq_len, num_kv_splits, min_split_len, WINDOW, BLOCK_N)\n",
        "    _, _, splits = _row_splits(seq_len, num_kv_splits, min_split_len, WINDOW, 1)\n",
        ["tests/test_triton_attention.py::test_decode_matches_reference"],
    ),
    "a compared baseline keeps this checkout's package name": (
        "tesela/bench/compare.py",
        "        path.write_text(_IDENTIFIER.sub(package, path.read_text()))\n",
        "        pass\n",
        ["tests/test_bench_compare.py"],
    ),
    "a small batch's KV slot ignores the offset in its block": (
        "tesela/core/forward_batch.py",
        "            slots.append(table[pos // block_size] * block_size + pos % block_size)\n",
        "            slots.append(table[pos // block_size] * block_size)\n",
        ["tests/test_paged_forward.py"],
    ),
    "a small batch's block tables are not padded": (
        "tesela/core/forward_batch.py",
        "        flat += [0] * (width - len(table))\n",
        "        pass\n",
        ["tests/test_paged_forward.py"],
    ),
    "fed tokens read the in-flight rows in the batch's order": (
        "tesela/core/forward_batch.py",
        "                0, self.feed_dst, self.fed_from.index_select(0, self.feed_src)\n",
        "                0, self.feed_dst, self.fed_from.index_select(0, self.feed_src.sort().values)\n",
        ["tests/test_paged_forward.py", "tests/test_overlap.py"],
    ),
    "a FULL decode graph ignores fed ids": (
        DECODE_PLAN_KERNEL,
        "        tl.store(tokens_ptr + row, tl.where(src >= 0, fed, token))\n",
        "        tl.store(tokens_ptr + row, token)\n",
        [
            "tests/test_triton_attention.py::test_a_decode_graph_reads_fed_ids_from_the_in_flight_step",
            OVERLAP,
        ],
    ),
    "fed ids sampled outside FULL decode graphs are not staged": (
        FULL,
        "        if source.data_ptr() != self.fed_tokens.data_ptr():\n",
        "        if False:\n",
        [OVERLAP],
    ),
    "sampling graphs do not keep their tokens for the next step": (
        FULL,
        "                fed.copy_(out.tokens)  # where the next step's fed ids come from\n",
        "                pass\n",
        [OVERLAP],
    ),
    "the dispatcher leaves fed ids unwritten": (
        "tesela/executor/dispatcher.py",
        "                    batch.feed_tokens()\n",
        "                    pass\n",
        [OVERLAP],
    ),
    "decode planning skips the copy of a pack built elsewhere": (
        "tesela/attention/triton_backend.py",
        "        if pack.data_ptr() != self.raw.data_ptr():  # else built in place (`pack_buffer`)\n",
        "        if False:\n",
        ["tests/test_triton_attention.py::test_graph_replay_with_padded_rows_matches_reference"],
    ),
    "engine batches are not built into the decode graphs' buffer": (
        "tesela/executor/model_runner.py",
        "        batch = inputs.build(self.device, into=None if full is None else full.pack_buffer)\n",
        "        batch = inputs.build(self.device)\n",
        [OVERLAP + "::test_decode_steps_are_built_where_their_graph_reads_them"],
    ),
    "the decode graphs' pack buffer holds a pack only up to its token_src": (
        "tesela/attention/triton_backend.py",
        "                    logits=max_batch_size,\n                    feeds=max_batch_size,\n",
        "                    logits=0,\n                    feeds=0,\n",
        [OVERLAP + "::test_decode_steps_are_built_where_their_graph_reads_them"],
    ),
    "the fed-token buffer holds only the largest decode graph's rows": (
        "tesela/executor/model_runner.py",
        "            max_sampled_rows=self.config.scheduler.max_num_seqs,\n",
        "            max_sampled_rows=0,\n",
        [OVERLAP + "::test_a_decode_graph_feeds_from_a_step_wider_than_its_ladder"],
    ),
    "the offline loop builds every running row's output": (
        ENGINE,
        "        if running_outputs:\n",
        "        if True:\n",
        ["tests/test_engine.py::test_the_offline_loop_builds_outputs_only_for_finished_requests"],
    ),
    "a finished request's output forgets its last token was new": (
        ENGINE,
        "            self._retire(request, outputs, new_token=request.request_id in new)\n",
        "            self._retire(request, outputs, new_token=False)\n",
        ["tests/test_engine.py", OVERLAP],
    ),
    "the argmax kernel leaves its ticket counter dirty": (
        ARGMAX,
        "            tl.store(ticket_ptr + row, 0)\n",
        "",
        [ARGMAX_TESTS],
    ),
    "the argmax kernel leaves the row's best key in its slot": (
        ARGMAX,
        "            best = tl.atomic_xchg(slot_ptr + row, -9223372036854775808)  # back to _EMPTY\n",
        "            best = tl.atomic_max(slot_ptr + row, -9223372036854775808)\n",
        [ARGMAX_TESTS],
    ),
    "the argmax kernel orders negative logits by their raw bits": (
        ARGMAX,
        "        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)\n",
        "        ordered = bits\n",
        [ARGMAX_TESTS],
    ),
    "the scratch frees the buffer it outgrew": (
        "tesela/core/scratch.py",
        "            self.retired.append(current)\n",
        "            pass\n",
        [ARGMAX_TESTS],
    ),
    "a sampling graph's tokens do not land in the fed-token buffer": (
        FULL,
        "tensors, variant, out=fed)\n",
        "tensors, variant)\n",
        DECODE_TESTS + [OVERLAP],
    ),
    "compare divides by the current side, not the baseline": (
        "tesela/bench/compare.py",
        "    base_side = next(side for side in sides if side.name == reference)\n",
        "    base_side = sides[0]\n",
        ["tests/test_bench_compare.py"],
    ),
}


def run_mutation(name: str, workdir: Path) -> tuple[str, str]:
    path, original, mutated, tests = MUTATIONS[name]
    source = (ROOT / path).read_text()
    if source.count(original) != 1:
        return "STALE", f"the text to mutate is not found exactly once in {path}"
    for tree in ("tesela", "scripts"):  # fresh: the last mutation's file is put back
        shutil.rmtree(workdir / tree, ignore_errors=True)
        shutil.copytree(ROOT / tree, workdir / tree)
    (workdir / path).write_text(source.replace(original, mutated))
    env = {**os.environ, "PYTHONPATH": str(workdir), "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if result.returncode == 0:
        return "MISSED", " ".join(tests)
    last = (result.stdout.strip().splitlines() or [f"the tests crashed ({result.returncode})"])[-1]
    return "CAUGHT", "; ".join(failed) or last


def main(names: list[str]) -> int:
    names = names or list(MUTATIONS)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        shutil.copytree(ROOT / "tests", workdir / "tests")
        shutil.copy(ROOT / "pyproject.toml", workdir / "pyproject.toml")
        for name in names:
            verdict, detail = run_mutation(name, workdir)
            ok &= verdict == "CAUGHT"
            print(f"{name} -> {verdict}: {detail}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
