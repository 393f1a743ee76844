"""Tensor parallelism on CPU over gloo: two real processes, each loading its shard.

Each rank builds the model for its shard straight from a real safetensors checkpoint (written
here by transformers) or the `tiny` preset's dummy weights, runs the same extend and decode
batches, and rank 0 saves its logits; they must equal the single-process model's. The
checkpoints cover KV heads split (2 over 2 ranks) and replicated (1 KV head on 2 ranks), a
vocabulary that does not divide (321: padded) and q/k/v biases (Qwen2); under the Triton
interpreter one more job runs the Triton backend with the fused kernels, so each rank's rotary
kernel stores its own KV heads into its own pool (`tiny`: 2 KV heads, one per rank). The engine
test runs
Qwen3 (per-head norms, tied LM head) through `LLM(..., tensor_parallel_size=2)`, and the
failure tests kill or stop a worker mid-generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tesela import LLM, SamplingParams
from tesela.core.forward_batch import ForwardBatch
from tesela.distributed.group import free_port
from tesela.distributed.sharding import Section, check_tp_shapes
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.multiproc import WorkerFailedError

PROMPTS = [[5, 17, 42, 8, 99, 3, 7], [200, 201, 12, 77]]
BLOCK = 16


def write_llama_one_kv_head(path: Path) -> None:
    """A sharded Llama checkpoint with a single KV head and an odd vocabulary."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=321,
        max_position_embeddings=512,
        initializer_range=0.05,
    )
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="60KB")


def run_batches(runner) -> list[torch.Tensor]:
    """An extend batch of both prompts, then two decode steps (greedy tokens fed back)."""
    tables = [[1, 2], [3, 4]]
    batch = ForwardBatch.build(
        token_ids=PROMPTS, prefix_lens=[0, 0], block_tables=tables, block_size=BLOCK, device="cpu"
    )
    logits = [runner.forward(batch)]
    lens = [len(p) for p in PROMPTS]
    for _ in range(2):
        tokens = [[int(t)] for t in logits[-1].argmax(-1)]
        batch = ForwardBatch.build(
            token_ids=tokens, prefix_lens=lens, block_tables=tables, block_size=BLOCK, device="cpu"
        )
        logits.append(runner.forward(batch))
        lens = [n + 1 for n in lens]
    return logits


# Graph modes run on CPU through the stand-in graphs (tesela/executor/graphs.py): capture and
# replay re-run the recorded ops, all-reduces included, on every rank in the same order.
GRAPHS = {
    "eager": {},
    "breakable": dict(piecewise_cudagraph="breakable", capture_sizes=[4, 8, 16]),
    "compiled": dict(piecewise_cudagraph="compiled", capture_sizes=[4, 8, 16]),
    # eager, with the Triton backend and the fused kernels under the interpreter: each rank's
    # rotary kernel stores its KV heads through its own pool-address table
    "triton-fused": {},
}


def engine_config(job: tuple[str, str], tp: int):
    model, graphs = job
    config, path = make_engine_config(
        model,
        device="cpu",
        dtype="float32",
        attention_backend="torch",
        num_kv_tokens=256,
        tensor_parallel_size=tp,
        **GRAPHS[graphs],
    )
    if graphs == "triton-fused":
        config = dataclasses.replace(config, attention_backend="triton")
    return config, path


@contextlib.contextmanager
def job_kernels(job: tuple[str, str]):
    """The fused Triton kernels on CPU tensors for the `triton-fused` job."""
    from tesela.layers import fused

    if job[1] != "triton-fused":
        yield
        return
    fused.set_fused_enabled(True, on_cpu=True)
    try:
        yield
    finally:
        fused.set_fused_enabled(True)


def rank_main(rank: int, world_size: int, port: int, jobs: list, out: str) -> None:
    from tesela.distributed.group import (
        all_reduce_add_norm_kernel,
        destroy_distributed,
        init_distributed,
    )
    from tesela.executor.model_runner import ModelRunner

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    tp = init_distributed(device="cpu", timeout_s=60)
    try:
        fused = all_reduce_add_norm_kernel(tp.name)
        launches = (lambda: fused.launches) if fused is not None else (lambda: 0)
        for i, job in enumerate(jobs):
            before = launches()
            config, path = engine_config(job, world_size)
            with job_kernels(job):
                runner = ModelRunner(config, path, tp)
                logits = run_batches(runner)
            attention = runner.model.model.layers[0].self_attn
            shapes = {
                "qkv": tuple(attention.qkv_proj.weight.shape),
                "o": tuple(attention.o_proj.weight.shape),
                "embed": tuple(runner.model.model.embed_tokens.weight.shape),
                "kv_pool": tuple(runner.kv_cache.k_buffers[0].shape),
            }
            paths = {path.value: n for path, n in runner.dispatcher.stats.paths.items()}
            fused_launches = launches() - before
            if rank == 0:
                result = {"logits": logits, "shapes": shapes, "paths": paths}
                torch.save({**result, "fused_launches": fused_launches}, f"{out}/{i}.pt")
        # Ranks that would capture different graphs are stopped before any capture.
        plans = [config.graph, config.graph.__class__(capture_sizes=(4, 8))]
        try:
            tp.check_same(plans[rank].capture_plan(), "the CUDA graph capture plan")
        except RuntimeError as error:
            assert "rank 1 has" in str(error) and "(8, 4)" in str(error), error
            torch.save(str(error), f"{out}/plan-error-{rank}.pt")
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def tp_jobs(checkpoints, tmp_path_factory) -> list[tuple[str, str]]:
    llama = tmp_path_factory.mktemp("llama_kv1")
    write_llama_one_kv_head(llama)
    qwen2 = str(checkpoints["qwen2"][0])
    jobs = [("tiny", "eager"), (str(llama), "breakable"), (qwen2, "compiled")]
    if os.environ.get("TRITON_INTERPRET") == "1":
        jobs.append(("tiny", "triton-fused"))
    return jobs


def test_tp2_logits_and_greedy_equal_tp1(tp_jobs, tmp_path):
    from tesela.executor.model_runner import ModelRunner

    mp.spawn(rank_main, args=(2, free_port(), tp_jobs, str(tmp_path)), nprocs=2, join=True)
    for i, job in enumerate(tp_jobs):
        config, path = engine_config(job, 1)
        with job_kernels(job):
            runner = ModelRunner(config, path)
            expected = run_batches(runner)
        got = torch.load(tmp_path / f"{i}.pt")
        paths = {path.value: n for path, n in runner.dispatcher.stats.paths.items()}
        assert got["paths"] == paths  # the same graph paths ran
        assert (paths.get("piecewise", 0) > 0) == bool(GRAPHS[job[1]])
        # Under the interpreter decode-sized batches take the fused all-reduce + add + norm.
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        assert (got["fused_launches"] > 0) == interpreted, job
        for step, (a, b) in enumerate(zip(got["logits"], expected, strict=True)):
            assert a.shape == b.shape, (job, step)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{job} step {step}")
            assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
        # Each rank holds its shard only: half the query heads, its KV heads, half the vocab.
        mc = config.model_config
        kv_local = max(mc.num_key_value_heads // 2, 1) * mc.head_dim
        assert got["shapes"]["qkv"] == (mc.q_size // 2 + 2 * kv_local, mc.hidden_size)
        assert got["shapes"]["o"] == (mc.hidden_size, mc.q_size // 2)
        assert got["shapes"]["embed"] == (-(-mc.vocab_size // 2), mc.hidden_size)
        assert got["shapes"]["kv_pool"][1] == kv_local // mc.head_dim
    for rank in range(2):
        assert "disagree on the CUDA graph capture plan" in torch.load(
            tmp_path / f"plan-error-{rank}.pt"
        )


def test_engine_tp2_greedy_and_logprobs_equal_tp1(checkpoints):
    """The engine path: the scheduler runs once, the worker runs every batch it is sent."""
    path = str(checkpoints["qwen3"][0])
    prompts = [[5, 17, 42, 8, 99, 3], [7, 7, 7, 250, 13], [300, 301, 12, 77, 54, 23, 9, 81]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    kwargs = dict(device="cpu", dtype="float32", attention_backend="torch")
    # A seeded row samples on rank 0 from the gathered logits (`execute_sample`): its draws
    # depend on the seed and the token index only, as at TP=1.
    seeded = SamplingParams(max_tokens=6, temperature=0.8, top_k=20, seed=7, ignore_eos=True)
    single = LLM(path, **kwargs)
    expected = single.generate(prompts, params)
    expected_seeded = single.generate(prompts, seeded)
    llm = LLM(path, tensor_parallel_size=2, **kwargs)
    try:
        assert not llm.engine.config.overlap_schedule  # auto is off under TP
        got = llm.generate(prompts, params)
        stats = llm.engine.stats()
        assert stats["dispatch"]["paths"]["eager"] > 0
        # decode batches reduced, added and normed in the fused kernel (interpreted on CPU)
        assert stats["tensor_parallel"]["all_reduce_add_norm"].startswith("fused")
        assert stats["tensor_parallel"]["fused_all_reduce_add_norm_launches"] > 0
        got_seeded = llm.generate(prompts, seeded)
    finally:
        llm.shutdown()
    assert [o.token_ids for o in got_seeded] == [o.token_ids for o in expected_seeded]
    for a, b in zip(got, expected, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-4


def start_generating(timeout_s: float):
    llm = LLM("tiny", device="cpu", tensor_parallel_size=2, distributed_timeout_s=timeout_s)
    engine = llm.engine
    engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=1000, ignore_eos=True))
    for _ in range(3):
        engine.step()
    return llm, engine.runner.workers[0].process


def steps_until_error(engine, limit_s: float) -> tuple[WorkerFailedError, float]:
    start = time.monotonic()
    with pytest.raises(WorkerFailedError) as info:
        while time.monotonic() - start < limit_s:
            engine.step()
    return info.value, time.monotonic() - start


def test_killing_a_worker_mid_generation_ends_the_engine_with_a_clear_error():
    llm, worker = start_generating(timeout_s=60)
    try:
        worker.kill()
        error, seconds = steps_until_error(llm.engine, limit_s=30)
        assert seconds < 30
        assert "rank 1" in str(error) and "SIGKILL" in str(error) and "restart" in str(error), error
        with pytest.raises(WorkerFailedError):  # and it stays failed
            llm.engine.step()
    finally:
        llm.shutdown()


def test_a_hung_worker_fails_the_engine_within_the_timeout():
    # Generous enough for a busy CI host's first steps, short enough to keep the test quick.
    llm, worker = start_generating(timeout_s=8)
    try:
        os.kill(worker.pid, signal.SIGSTOP)
        error, seconds = steps_until_error(llm.engine, limit_s=30)
        assert seconds < 20
        assert "hung" in str(error) and "distributed_timeout_s=8" in str(error)
    finally:
        worker.kill()
        llm.shutdown()


def test_kv_heads_split_or_replicate_by_rank():
    assert [Section(8, 128).rank_rows(r, 2) for r in range(2)] == [(0, 512), (512, 512)]
    # 2 KV heads on 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1 (their query heads' head)
    assert [Section(2).rank_units(r, 4) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize(
    "heads, kv_heads, intermediate, size, message",
    [(6, 2, 128, 4, "attention heads"), (8, 3, 128, 2, "KV heads"), (8, 2, 100, 8, "interm")],
)
def test_shapes_that_cannot_split_are_refused(heads, kv_heads, intermediate, size, message):
    with pytest.raises(ValueError, match=message):
        check_tp_shapes(
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=intermediate,
            tensor_parallel_size=size,
        )


def test_every_rank_builds_the_same_stamped_batch():
    """Workers rebuild the driver's batch from its host lists: same tensors, same stamp."""
    from tesela.core.forward_batch import BatchInputs

    inputs = BatchInputs(
        token_ids=[[5, 6, 7], [9]], prefix_lens=[0, 4], block_tables=[[1], [2]], block_size=16
    )
    driver, worker = inputs.build("cpu"), inputs.build("cpu")
    assert driver.stamp == worker.stamp and driver.batch_id == inputs.batch_id
    assert torch.equal(driver.out_cache_loc, worker.out_cache_loc)


def test_dummy_weights_draw_every_section_of_a_fused_weight():
    """Dummy weights are generated whole and cut into q/k/v (gate/up) sections for the
    loaders: each section must be its own draw, not a copy of another's rows."""
    config, path = engine_config(("tiny", "eager"), 1)
    from tesela.models.loader import build_model

    model = build_model(config.model_config, dtype=torch.float32, device="cpu", load_format="dummy")
    attention = model.model.layers[0].self_attn
    qkv = attention.qkv_proj.weight
    q, kv = attention.q_size, attention.kv_size
    sections = [qkv[:kv], qkv[q : q + kv], qkv[q + kv :]]
    assert not torch.equal(sections[0], sections[1]) and not torch.equal(sections[1], sections[2])
    assert 0.015 < qkv.std().item() < 0.025


def peer_memory_verdicts(tp) -> list:
    """_symmetric_memory_blocked's verdict with every rank's rendezvous count equal, then with
    rank 0's one ahead (as after an earlier engine in the engine's process)."""
    from tesela.distributed import custom_all_reduce
    from tesela.distributed.group import _symmetric_memory_blocked

    verdicts = [_symmetric_memory_blocked(tp)]
    if tp.rank == 0:
        custom_all_reduce._RENDEZVOUS += 1
    verdicts.append(_symmetric_memory_blocked(tp))
    return verdicts


def test_peer_memory_only_where_every_rank_made_as_many_rendezvous():
    """torch numbers symmetric-memory rendezvous per process: a rank 0 that made one for an
    earlier engine would never meet fresh workers, so every rank keeps NCCL, saying why."""
    from tesela.distributed.launch import run_spmd

    fresh, after_an_earlier_engine = run_spmd(peer_memory_verdicts, 2, "cpu")
    assert fresh is None
    assert "an earlier engine in this process" in after_an_earlier_engine
    assert "[1, 0]" in after_an_earlier_engine
