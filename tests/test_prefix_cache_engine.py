"""Prefix caching end to end on CPU: greedy outputs with the cache on equal those with it off.

Requests arrive in waves (the engine steps between waves, so later requests find the blocks
earlier ones computed) and share prefixes of varied lengths, block-aligned and not, within and
across namespaces (cache salt, LoRA id). Every case checks that the cache was actually hit,
that the outputs equal the cache-off run token for token, and that no block leaked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tesela import SamplingParams
from tesela.engine.llm_engine import LLMEngine, make_engine_config

BLOCK = 4


@dataclass
class Arrival:
    prompt: list[int]
    max_tokens: int = 6
    salt: str | None = None
    lora: str | None = None


@dataclass
class Workload:
    waves: list[list[Arrival]]
    steps_between: int = 3
    abort: dict[int, int] = field(default_factory=dict)  # wave -> request to abort in it


def shared_prefix_workload(
    seed: int = 0,
    namespaces: bool = False,
    prefix_lens=(4, 8, 6, 13, 21),
    suffix_lens=(0, 1, 3, 6),
    max_tokens=(2, 8),
) -> Workload:
    """Prefixes of 4, 8 (block-aligned), 6, 13, 21 tokens by default; each prompt is a prefix
    plus a suffix of 0-6 tokens (0: the whole prompt is a prefix another request computed)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 250) for _ in range(n)] for n in prefix_lens]
    spaces = [(None, None), ("tenant-a", None), (None, "adapter-1")] if namespaces else [(None,)]
    waves = []
    for _ in range(4):
        wave = []
        for _ in range(5):
            prefix = rng.choice(prefixes)
            suffix = [rng.randrange(3, 250) for _ in range(rng.choice(suffix_lens))]
            salt, lora = rng.choice(spaces) if namespaces else (None, None)
            wave.append(Arrival(prefix + suffix, rng.randrange(*max_tokens), salt, lora))
        waves.append(wave)
    return Workload(waves)


def run(workload: Workload, *, engine: LLMEngine | None = None, model: str = "tiny", **kwargs):
    """Drive the engine wave by wave; returns (engine, {request id: output})."""
    if engine is None:
        config, path = make_engine_config(model, **{"block_size": BLOCK, **kwargs})
        engine = LLMEngine(config, path)
    start_free = engine.block_manager.num_free_blocks
    outputs = {}
    for index, wave in enumerate(workload.waves):
        ids = [
            engine.add_request(
                a.prompt,
                SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True),
                f"w{index}-{i}",
                cache_salt=a.salt,
                lora_id=a.lora,
            )
            for i, a in enumerate(wave)
        ]
        for step in range(workload.steps_between):
            if step == 1 and index in workload.abort:
                assert engine.abort(ids[workload.abort[index]])  # aborted mid-flight
            outputs.update({o.request_id: o for o in engine.step() if o.finished})
    while engine.has_unfinished():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.block_manager.num_free_blocks == start_free  # nothing leaked
    return engine, outputs


def tokens(outputs) -> dict[str, list[int]]:
    return {rid: o.token_ids for rid, o in outputs.items()}


def assert_cache_changes_nothing(workload: Workload, **kwargs) -> LLMEngine:
    _, off = run(workload, enable_prefix_caching=False, **kwargs)
    engine, on = run(workload, **kwargs)
    assert tokens(on) == tokens(off)
    stats = engine.stats()
    assert stats["prefix_cache_hit_tokens"] > 0 and 0 < stats["prefix_cache_hit_rate"] < 1
    assert sum(o.num_cached_tokens for o in on.values()) == stats["prefix_cache_hit_tokens"]
    return engine


def test_shared_prefixes_match_the_cache_off_run():
    engine = assert_cache_changes_nothing(shared_prefix_workload())
    assert engine.stats()["kv_blocks_cached"] > 0


def test_chunked_prefill_with_cached_prefixes_matches():
    workload = shared_prefix_workload(seed=1)
    workload.waves = workload.waves[:3]
    assert_cache_changes_nothing(workload, max_num_batched_tokens=7)


def test_preemption_in_a_tiny_pool_matches_and_evicts():
    # 12 usable blocks of 4 tokens: requests preempt each other and cached blocks get evicted.
    workload = shared_prefix_workload(seed=2)
    engine = assert_cache_changes_nothing(
        workload, num_kv_tokens=13 * BLOCK, max_num_batched_tokens=16
    )
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_evictions > 0


def test_namespaces_match_and_only_share_within_themselves():
    workload = shared_prefix_workload(seed=3, namespaces=True)
    _, off = run(workload, enable_prefix_caching=False)
    engine, on = run(workload)
    assert tokens(on) == tokens(off)
    arrivals = {f"w{w}-{i}": a for w, wave in enumerate(workload.waves) for i, a in enumerate(wave)}
    for rid, output in on.items():
        arrival = arrivals[rid]
        if output.num_cached_tokens:
            # Some request of the same namespace that came before holds this prefix.
            earlier = [
                a.prompt
                for r, a in arrivals.items()
                if r < rid and (a.salt, a.lora) == (arrival.salt, arrival.lora)
            ]
            n = output.num_cached_tokens
            assert any(p[:n] == arrival.prompt[:n] for p in earlier), rid


def test_aborts_keep_the_cache_consistent():
    workload = shared_prefix_workload(seed=4)
    workload.abort = {0: 1, 1: 3, 2: 0}
    for wave, row in workload.abort.items():
        workload.waves[wave][row].max_tokens = 30  # still running when the abort comes
    _, off = run(workload, enable_prefix_caching=False)
    engine, on = run(workload)
    assert tokens(on) == tokens(off)
    assert sum(o.finish_reason == "abort" for o in on.values()) == 3
    assert engine.stats()["prefix_cache_hit_tokens"] > 0


def test_piecewise_rows_with_cached_prefixes_match_eager_without_cache():
    """Rows that start at a cached prefix run through the piecewise runner (EXTEND rows with
    prefix > 0) and give what eager gives with no cache. (The compiled strategy splits at the
    same attention op; tests/test_piecewise_compiled.py checks it against breakable.)"""
    workload = shared_prefix_workload(seed=5)
    _, off = run(workload, enable_prefix_caching=False)
    engine, on = run(
        workload, piecewise_cudagraph="breakable", capture_sizes=[4, 8, 16, 32, 64, 128]
    )
    assert tokens(on) == tokens(off)
    assert engine.stats()["dispatch"]["paths"]["piecewise"] > 0
    assert engine.stats()["prefix_cache_hit_tokens"] > 0


def test_a_repeated_prompt_is_served_from_the_cache():
    engine = LLMEngine(*make_engine_config("tiny", block_size=BLOCK))
    prompt = list(range(10, 30))  # 20 tokens = 5 full blocks
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    first = run(Workload([[Arrival(prompt, 4)]]), engine=engine)[1]["w0-0"]
    engine.add_request(prompt, params, "again")
    again = None
    while engine.has_unfinished():
        again = next((o for o in engine.step() if o.finished), again)
    assert again.token_ids == first.token_ids
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 16  # last block recomputed


def test_the_cli_flag_turns_the_cache_off():
    from tesela.cli import build_parser
    from tesela.engine_args import EngineArgs

    on = build_parser(["generate"]).parse_args(["generate"])
    off = build_parser(["generate"]).parse_args(["generate", "--no-enable-prefix-caching"])
    assert EngineArgs.from_cli_args(on).enable_prefix_caching is True
    config, _ = make_engine_config(EngineArgs.from_cli_args(off))
    assert config.cache.enable_prefix_caching is False
