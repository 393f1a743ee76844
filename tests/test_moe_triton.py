"""The Triton fused MoE against the torch reference, on CPU under the Triton interpreter.

Kernel cases cover both paths (per-pair GEMV for decode, grouped GEMM over expert-sorted
blocks for prefill) and the decode down kernel that sums the top-k itself, for several
(E, top_k, M) including M=1, an expert that receives no token, every token on one expert, and
padding tokens (expert id out of range, or past the device count of real tokens) that must
change nothing; and the one-launch router top-k against `select_experts` (both scoring rules,
ties, E not a power of two), and the router GEMM folded into it (`tesela::moe_router`: both
rules, bf16 rounding of the logits, counters back to zero between launches). Then whole Qwen3-MoE and Mixtral models run with the kernels and match transformers.

TRITON_INTERPRET=1 must be set before triton is first imported; as in
tests/test_triton_attention.py, a full run where triton was already loaded compiled runs this
module again in a fresh process. bf16 is covered on GPU only (tests/gpu/test_moe_gpu.py): the
interpreter multiplies bf16 tiles as integers in tl.dot.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if torch.cuda.is_available():
    pytest.skip("CUDA machine: tests/gpu/test_moe_gpu.py tests the compiled kernels",
                allow_module_level=True)  # fmt: skip
if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from interpreter import rerun_under_interpreter

from tesela import LLM, SamplingParams  # noqa: E402
from tesela.layers.moe import (
    kernels,  # noqa: E402
    router,  # noqa: E402
)
from tesela.layers.moe.fused_moe import fused_experts  # noqa: E402
from tesela.layers.moe.layer import use_triton_on_cpu  # noqa: E402
from tesela.layers.moe.reference import moe_reference  # noqa: E402
from tesela.layers.moe.router import (  # noqa: E402
    fused_router,
    fused_select_experts,
    select_experts,
)
from tests.test_reference import PROMPTS, hf_greedy  # noqa: E402

INTERPRETED_HERE = not isinstance(
    kernels.pair_gemv_kernel, __import__("triton").runtime.JITFunction
)


@pytest.fixture(autouse=True)
def _kernels_run_in_this_process(request):
    if not INTERPRETED_HERE and request.function is not test_in_a_fresh_interpreter_process:
        pytest.skip("triton was loaded without TRITON_INTERPRET: run by the fresh-process test")


def test_in_a_fresh_interpreter_process():
    """Run this module again where TRITON_INTERPRET=1 is set before triton is imported."""
    if INTERPRETED_HERE:
        pytest.skip("the kernel tests run in this process")
    rerun_under_interpreter(__file__)


GEMV = {"path": "gemv", "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
GROUPED = {"path": "grouped", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2,
           "num_warps": 4, "num_stages": 1}  # fmt: skip
# (gate/up config, down config): the paths share the pair-indexed intermediate, so they mix. A
# gemv down config runs the kernel that sums each token's k pairs itself.
PATHS = {"gemv": (GEMV, GEMV), "grouped": (GROUPED, GROUPED), "mixed": (GEMV, GROUPED),
         "mixed_down_gemv": (GROUPED, GEMV)}  # fmt: skip
# H and I are not multiples of the tiles, so every mask is exercised.
HIDDEN, INTERMEDIATE = 40, 24


def make_experts(num_experts: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * INTERMEDIATE, HIDDEN, generator=generator) * 0.2
    w2 = torch.randn(num_experts, HIDDEN, INTERMEDIATE, generator=generator) * 0.2
    return w13.to(dtype), w2.to(dtype)


def route(num_tokens: int, num_experts: int, top_k: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=generator)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    weights, ids = select_experts(logits, top_k, "softmax_topk", True)
    return hidden, weights, ids


# The per-pair path serves decode (M <= 8 by default) and is slow in the interpreter: it gets
# the small cases.
KERNEL_CASES = [
    ("gemv", 4, 1, 1),
    ("gemv", 8, 2, 1),
    ("gemv", 6, 6, 3),
    ("grouped", 8, 2, 1),
    ("grouped", 16, 4, 37),
    ("grouped", 6, 6, 5),
    ("mixed", 8, 2, 7),
    ("mixed_down_gemv", 6, 3, 9),
]


@pytest.mark.parametrize("path,num_experts,top_k,num_tokens", KERNEL_CASES)
def test_kernel_matches_reference(path, num_experts, top_k, num_tokens):
    w13, w2 = make_experts(num_experts)
    hidden, weights, ids = route(num_tokens, num_experts, top_k, seed=num_tokens)
    expected = moe_reference(hidden, w13, w2, weights, ids)
    got = fused_experts(hidden, w13, w2, weights, ids, configs=PATHS[path])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_idle_experts_and_every_token_on_one_expert(path):
    w13, w2 = make_experts(8)
    hidden, weights, _ = route(11, 8, 2, seed=1)
    # Experts 0, 2..7 idle; expert 1 takes every token in both slots (weights still differ).
    ids = torch.full((11, 2), 1)
    expected = moe_reference(hidden, w13, w2, weights, ids)
    got = fused_experts(hidden, w13, w2, weights, ids, configs=PATHS[path])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Only experts 3 and 6 used: the blocks of the others are empty.
    ids = torch.where(torch.arange(11)[:, None] % 2 == 0, 3, 6).expand(11, 2).contiguous()
    ids[:, 1] = 9 - ids[:, 0]
    expected = moe_reference(hidden, w13, w2, weights, ids)
    got = fused_experts(hidden, w13, w2, weights, ids, configs=PATHS[path])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_padding_tokens_change_nothing(path):
    """Tokens routed to an out-of-range expert (how graphs pad) get zeros and leave the rest."""
    w13, w2 = make_experts(8)
    hidden, weights, ids = route(12, 8, 2, seed=2)
    real = fused_experts(hidden[:7], w13, w2, weights[:7], ids[:7], configs=PATHS[path])
    padded_ids = ids.clone()
    padded_ids[7:] = 8
    got = fused_experts(hidden, w13, w2, weights, padded_ids, configs=PATHS[path])
    assert torch.equal(got[7:], torch.zeros(5, HIDDEN))
    torch.testing.assert_close(got[:7], real, rtol=1e-6, atol=1e-6)
    # The same through the device-side count of real tokens (what graph replays use).
    num_valid = torch.tensor([7], dtype=torch.int32)
    counted = fused_experts(hidden, w13, w2, weights, ids, configs=PATHS[path],
                            num_valid_tokens=num_valid)  # fmt: skip
    assert torch.equal(counted, got)


def test_half_precision_kernel():
    w13, w2 = make_experts(8, dtype=torch.float16)
    hidden, weights, ids = route(5, 8, 2, seed=3)
    hidden = hidden.half()
    expected = moe_reference(hidden.float(), w13.float(), w2.float(), weights, ids)
    for configs in (PATHS["gemv"], PATHS["grouped"]):
        got = fused_experts(hidden, w13, w2, weights, ids, configs=configs)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_down_sum_kernel_drops_out_of_range_slots_and_padding_tokens():
    """Per slot, not per token: a token with one valid and one out-of-range expert (E or -1)
    keeps the valid one; tokens past the real-token count are written as zeros."""
    w13, w2 = make_experts(6)
    hidden, weights, ids = route(5, 6, 2, seed=4)
    ids[1, 0], ids[3, 1], ids[4] = 6, -1, torch.tensor([2, 2])
    expected = moe_reference(hidden, w13, w2, weights, ids)
    assert expected[1].abs().sum() > 0 and expected[3].abs().sum() > 0  # half-routed tokens
    for configs in (PATHS["gemv"], PATHS["mixed_down_gemv"]):
        got = fused_experts(hidden, w13, w2, weights, ids, configs=configs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        num_valid = torch.tensor([2], dtype=torch.int32)
        counted = fused_experts(hidden, w13, w2, weights, ids, configs=configs,
                                num_valid_tokens=num_valid)  # fmt: skip
        assert torch.equal(counted[2:], torch.zeros(3, HIDDEN))
        torch.testing.assert_close(counted[:2], expected[:2], rtol=1e-5, atol=1e-5)


def test_down_sum_kernel_masks_slots_itself():
    """The down kernel alone, on an intermediate where every row is non-zero (as the grouped
    gate/up leaves the rows of pairs it dropped: never written): out-of-range slots and tokens
    past the real-token count add nothing, padding rows are zeros."""
    from tesela.layers.moe.fused_moe import _down_sum_gemv

    _, w2 = make_experts(6)
    generator = torch.Generator().manual_seed(6)
    intermediate = torch.randn(4 * 3, INTERMEDIATE, generator=generator)
    weights = torch.rand(4, 3, generator=generator)
    ids = torch.tensor([[0, 6, 2], [-1, 5, 5], [1, 1, 3], [4, 0, 2]])
    num_valid = torch.tensor([3], dtype=torch.int32)
    got = _down_sum_gemv(intermediate, w2, weights, ids, num_valid, GEMV)
    expected = torch.zeros(4, HIDDEN)
    for token, slot in ((t, s) for t in range(3) for s in range(3)):
        if 0 <= ids[token, slot] < 6:
            pair_out = intermediate[token * 3 + slot] @ w2[ids[token, slot]].T
            expected[token] += weights[token, slot] * pair_out
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[3], torch.zeros(HIDDEN))


def test_gate_up_gemv_skips_padding_pairs():
    """The per-pair gate/up kernel loads nothing for tokens past the real-token count (their
    intermediate rows are zeros): padding costs no weight bandwidth in a padded decode graph."""
    from tesela.layers.moe.fused_moe import _launch

    w13, _ = make_experts(8)
    hidden, weights, ids = route(4, 8, 2, seed=5)
    intermediate = torch.full((8, INTERMEDIATE), float("nan"))
    num_valid = torch.tensor([3], dtype=torch.int32)
    _launch(hidden, w13, intermediate, weights, ids, num_valid, None, GEMV,
            gated=True, rows_per_pair=2)  # fmt: skip
    assert torch.equal(intermediate[6:], torch.zeros(2, INTERMEDIATE))
    assert intermediate[:6].abs().sum(dim=1).min() > 0


ROUTER_RULES = [("softmax_topk", True), ("softmax_topk", False), ("topk_softmax", False)]


@pytest.mark.parametrize("scoring,renormalize", ROUTER_RULES)
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (6, 3), (60, 4), (128, 8)])
def test_fused_router_matches_select_experts(scoring, renormalize, num_experts, top_k):
    """Same ids, weights and weight dtype as the torch rule (E=6 and 60: not powers of two)."""
    generator = torch.Generator().manual_seed(num_experts)
    logits = torch.randn(5, num_experts, generator=generator) * 3
    for dtype in (torch.float32, torch.bfloat16):
        expected = select_experts(logits.to(dtype), top_k, scoring, renormalize)
        weights, ids = fused_select_experts(logits.to(dtype), top_k, scoring, renormalize)
        assert torch.equal(ids, expected[1]) and ids.dtype == torch.int64
        assert weights.dtype == expected[0].dtype
        # bf16 weights (Qwen3-MoE) may differ by one rounding step of the fp32 softmax.
        tolerance = 1e-6 if weights.dtype == torch.float32 else 8e-3
        torch.testing.assert_close(weights, expected[0], rtol=tolerance, atol=tolerance)


def test_fused_router_breaks_ties_to_the_lowest_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [0.5] * 6])
    weights, ids = fused_select_experts(logits, 4, "softmax_topk", False)
    assert ids.tolist() == [[1, 2, 4, 5], [0, 1, 2, 3]]
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(weights, probs.gather(1, ids), rtol=1e-6, atol=1e-7)
    # Renormalised, four equal weights are a quarter each.
    weights, _ = fused_select_experts(logits[1:], 4, "topk_softmax", False)
    torch.testing.assert_close(weights, torch.full((1, 4), 0.25), rtol=1e-6, atol=1e-7)


def test_fused_router_rejects_bad_rules():
    logits = torch.randn(2, 4)
    with pytest.raises(ValueError, match="scoring"):
        fused_select_experts(logits, 2, "sigmoid", True)
    with pytest.raises(ValueError, match="top_k=5"):
        fused_select_experts(logits, 5, "softmax_topk", True)


def router_inputs(num_tokens, num_experts, dtype, seed, hidden=HIDDEN):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator)
    # Logits of a similar spread whatever H is (0.3 at H=40).
    gate_weight = torch.randn(num_experts, hidden, generator=generator) * 1.9 / hidden**0.5
    return x.to(dtype), gate_weight.to(dtype)


def assert_routes_like_linear_then_rule(x, gate_weight, top_k, scoring, renormalize):
    """The fused op == the gate Linear (`gemv.linear`) + `select_experts`."""
    weights, ids = fused_router(x, gate_weight, top_k, scoring, renormalize)
    logits = torch.nn.functional.linear(x, gate_weight)
    expected_weights, expected_ids = select_experts(logits, top_k, scoring, renormalize)
    assert torch.equal(ids, expected_ids)
    assert weights.dtype == expected_weights.dtype
    # bf16 weights (Qwen3-MoE) may differ by one rounding step of the fp32 softmax.
    tolerance = 1e-6 if weights.dtype == torch.float32 else 8e-3
    torch.testing.assert_close(weights, expected_weights, rtol=tolerance, atol=tolerance)
    return logits


@pytest.fixture
def router_workspace():
    router.allocate_workspace("cpu")  # what MoeForCausalLM.init_buffers does
    return router.workspace(torch.device("cpu"))


@pytest.mark.parametrize("scoring,renormalize", [("softmax_topk", True), ("topk_softmax", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 3, 16])
def test_fused_router_gemm_matches_linear_and_rule(
    router_workspace, scoring, renormalize, dtype, num_tokens
):
    """Router GEMM + top-k in one launch (E=61: not a multiple of BLOCK_E; H=40 < BLOCK_H).
    The scratch row holds exactly the Linear's logits, rounded to the activation dtype."""
    assert 61 % router.ROUTER_GEMM_CONFIG["BLOCK_E"]
    x, gate_weight = router_inputs(num_tokens, 61, dtype, seed=num_tokens)
    logits = assert_routes_like_linear_then_rule(x, gate_weight, 4, scoring, renormalize)
    scratch = router_workspace.logits[: num_tokens * 61].view(num_tokens, 61)
    torch.testing.assert_close(scratch, logits.float(), rtol=1e-6, atol=1e-6)
    assert not router_workspace.counters.any()


def test_fused_router_resets_its_counters_between_launches(router_workspace):
    """Back to back, as consecutive MoE layers and graph replays run: each launch starts from
    zeroed counters (a launch that left them non-zero would write no outputs after it). Layer
    b (E=128, top-8, as qwen3-30b-a3b) has H over two BLOCK_H steps plus a masked tail."""
    hidden_b = 2 * router.ROUTER_GEMM_CONFIG["BLOCK_H"] + 40
    layer_a = router_inputs(5, 60, torch.float32, seed=7)[1]
    layer_b = router_inputs(5, 128, torch.float32, seed=8, hidden=hidden_b)[1]
    for seed in (1, 2):
        x = router_inputs(5, 60, torch.float32, seed=seed)[0]
        x_b = router_inputs(5, 128, torch.float32, seed=seed, hidden=hidden_b)[0]
        assert_routes_like_linear_then_rule(x, layer_a, 4, "softmax_topk", True)
        assert_routes_like_linear_then_rule(x, layer_a, 4, "softmax_topk", True)
        assert_routes_like_linear_then_rule(x_b, layer_b, 8, "topk_softmax", False)
    assert not router_workspace.counters.any()


def test_fused_router_falls_back_past_the_decode_token_count(router_workspace):
    """More tokens than the workspace holds: the GEMM and `moe_topk` run apart, same answer;
    the workspace is not touched."""
    router_workspace.logits.fill_(7.0)
    x, gate_weight = router_inputs(router.MAX_FUSED_ROUTER_TOKENS + 1, 6, torch.float32, seed=3)
    assert_routes_like_linear_then_rule(x, gate_weight, 2, "softmax_topk", True)
    assert bool((router_workspace.logits == 7.0).all())
    with pytest.raises(ValueError, match="top_k=7"):
        fused_router(x[:2], gate_weight, 7, "softmax_topk", True)


class RouterCalls(TorchDispatchMode):
    """Token counts of the `tesela::moe_router` calls that run."""

    def __init__(self) -> None:
        super().__init__()
        self.num_tokens: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.tesela.moe_router.default:
            self.num_tokens.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_models_with_the_kernel_match_transformers(checkpoints, arch):
    """Prefill takes the grouped path (M > 8), decode the per-pair path: both in one run."""
    path, hf_model = checkpoints[arch]
    llm = LLM(str(path), dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    workspace = router.workspace(torch.device("cpu"))  # allocated by the model's init_buffers
    workspace.logits.fill_(float("nan"))
    with use_triton_on_cpu(), RouterCalls() as routed:
        outputs = llm.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.token_ids == hf_greedy(hf_model, prompt)[0][:4]
    # Decode steps took the fused router GEMM + top-k: its kernel wrote logits to the scratch.
    assert min(routed.num_tokens) <= router.MAX_FUSED_ROUTER_TOKENS
    assert not workspace.logits.isnan().all()


def test_full_decode_replay_routes_padding_rows_to_no_expert(checkpoints):
    """FULL decode graphs (CPU stand-in, Triton attention in the interpreter): a 3-row decode
    replays the 4-row graph; its MoE layers read 3 real tokens, the padding row reaches no
    expert, and the logits equal eager."""
    from tesela.core.forward_batch import ForwardBatch, ForwardMode
    from tesela.engine.llm_engine import make_engine_config
    from tesela.executor.model_runner import ModelRunner
    from tests.test_moe import MoeCalls

    config, path = make_engine_config(str(checkpoints["qwen3_moe"][0]), num_kv_tokens=1024)
    runner = ModelRunner(dataclasses.replace(config, attention_backend="triton"), path)
    runner.add_full_decode((1, 2, 4), max_model_len=128)

    def batch(rows, mode=None):
        return ForwardBatch.build(
            token_ids=[[7 + i] * n for i, (_, n) in enumerate(rows)],
            prefix_lens=[p for p, _ in rows],
            block_tables=[list(range(1 + 4 * i, 5 + 4 * i)) for i in range(len(rows))],
            block_size=16,
            device="cpu",
            mode=mode,
        )

    runner.forward_eager(batch([(0, 9), (0, 12), (0, 5)]))  # the prefixes
    decode = [(9, 1), (12, 1), (5, 1)]
    with MoeCalls() as observed:
        got = runner.full_decode.run(batch(decode, ForwardMode.DECODE))
    assert [(count, out.shape[0]) for count, out in observed.calls] == [(3, 4), (3, 4)]
    for _, out in observed.calls:
        assert torch.equal(out[3], torch.zeros_like(out[3]))
    expected = runner.forward_eager(batch(decode, ForwardMode.DECODE))
    torch.testing.assert_close(got, expected)
