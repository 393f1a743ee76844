"""LLMEngine: the step loop that ties the scheduler, the model runner and the sampler together.

`add_request` validates and queues; `step` schedules one batch, runs it, samples, applies stop
conditions (tokens, length, stop strings) and returns what changed. The offline `LLM` and the
server both drive this loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tesela.attention.policy import DeviceInfo, resolve_attention
from tesela.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    normalize_dtype,
    read_generation_config,
    resolve_graph_config,
    resolve_lora_config,
)
from tesela.core.forward_batch import BatchInputs
from tesela.core.kv_cache import RESERVED_BLOCKS
from tesela.distributed.sharding import check_tp_shapes
from tesela.engine.block_manager import BlockManager
from tesela.engine.detokenizer import IncrementalDetokenizer
from tesela.engine.request import Request, TokenLogprobs
from tesela.engine.sampler import Sampler, SamplingHistory
from tesela.engine.sampling_params import SamplingParams
from tesela.engine.scheduler import ScheduledBatch, Scheduler
from tesela.engine_args import EngineArgs
from tesela.executor.model_runner import ModelRunner
from tesela.lora.request import LoRARequest
from tesela.models.registry import check_architecture
from tesela.presets import DEFAULT_MODEL, PRESETS
from tesela.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

logger = logging.getLogger("tesela.engine")


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    # One entry per prompt token (None for the first, which nothing predicts), if asked.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


def resolve_model(model: str) -> tuple[ModelConfig, str | None]:
    """A preset name gives a config and no path; anything else must be a model folder."""
    if model in PRESETS:
        return ModelConfig.from_hf_dict(PRESETS[model]), None
    path = Path(model)
    if not path.is_dir():
        raise ValueError(
            f"model {model!r} is neither a folder nor a preset: give a folder with config.json "
            f"and safetensors weights, or one of the presets {', '.join(PRESETS)}"
        )
    # Refuse an unknown architecture before the config's other fields are read.
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            hf = json.loads(config_file.read_text())
        except ValueError as exc:
            raise ValueError(
                f"{config_file} is not valid JSON ({exc}): fix or re-download it"
            ) from None
        try:
            check_architecture(hf.get("architectures") or [] if isinstance(hf, dict) else [])
        except ValueError as exc:
            raise ValueError(f"{config_file}: {exc}") from None
    return ModelConfig.from_pretrained(path), str(path)


def make_engine_config(
    model: str | EngineArgs = DEFAULT_MODEL, **kwargs
) -> tuple[EngineConfig, str | None]:
    """Resolve EngineArgs (or a model and EngineArgs keywords) into a frozen EngineConfig once:
    the device, the dtype, the graph modes the attention backend can serve."""
    args = model if isinstance(model, EngineArgs) else EngineArgs.from_kwargs(model, **kwargs)
    model_config, path = resolve_model(args.model)
    check_tp_shapes(
        num_attention_heads=model_config.num_attention_heads,
        num_key_value_heads=model_config.num_key_value_heads,
        intermediate_size=model_config.intermediate_size,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    if args.enable_lora and args.tensor_parallel_size > 1:
        raise ValueError(
            "LoRA adapters are not sharded over tensor-parallel ranks yet: serve adapters with "
            "tensor_parallel_size=1, or the base model alone at tensor_parallel_size="
            f"{args.tensor_parallel_size}"
        )
    load_format = args.load_format
    if path is None and load_format == "auto":
        load_format = "dummy"  # presets have no weights
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = torch.device(device).type == "cuda"
    dtype = args.dtype
    if dtype == "auto":
        # bf16 matmuls are slow on most CPUs; the checkpoint's dtype on GPUs.
        dtype = model_config.torch_dtype if on_cuda else "float32"
    scheduler = _scheduler_config(args, model_config)
    piecewise = args.piecewise_cudagraph
    if not on_cuda and piecewise is None:
        piecewise = "none"  # nothing to capture on CPU unless asked for explicitly
    graph = resolve_graph_config(
        piecewise_cudagraph=piecewise,
        piecewise_compiler=args.piecewise_compiler,
        capture_sizes=args.capture_sizes,
        max_capture_tokens=args.max_capture_tokens,
        disable_cudagraph=args.disable_cudagraph,
        verify_cudagraphs=args.verify_cudagraphs,
        full_mixed=args.full_mixed,
        scheduler=scheduler,
    )
    attention_backend, graph = _resolve_attention(
        args.attention_backend, device, normalize_dtype(dtype), model_config.head_dim, graph
    )
    config = EngineConfig(
        model=args.model,
        model_config=model_config,
        dtype=normalize_dtype(dtype),
        device=device,
        load_format=load_format,
        seed=args.seed,
        attention_backend=attention_backend,
        cache=CacheConfig(
            args.block_size,
            args.gpu_memory_utilization,
            args.num_kv_tokens,
            args.enable_prefix_caching,
        ),
        scheduler=scheduler,
        graph=graph,
        tokenizer=args.tokenizer,
        sampling_defaults=read_generation_config(args.generation_config, path),
        lora=resolve_lora_config(
            enable_lora=args.enable_lora,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            max_cpu_loras=args.max_cpu_loras,
            backend=args.lora_backend,
            on_cuda=on_cuda,
        ),
        parallel=ParallelConfig(args.tensor_parallel_size, args.distributed_timeout_s),
    )
    return config, path


def _scheduler_config(args: EngineArgs, model_config: ModelConfig) -> SchedulerConfig:
    max_model_len = args.max_model_len
    if max_model_len is not None and max_model_len > model_config.max_position_embeddings:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
            f"({model_config.max_position_embeddings}): lower it"
        )
    return SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_model_len or min(model_config.max_position_embeddings, 8192),
    )


def _resolve_attention(requested: str, device: str, dtype: str, head_dim: int, graph):
    """Resolve the attention backend once, through the policy table, and turn off the graph
    modes the chosen backend cannot serve (each change is logged once, with its reason)."""
    decision = resolve_attention(
        requested,
        DeviceInfo.detect(device),
        dtype=dtype,
        head_dim=head_dim,
        piecewise=graph.piecewise_enabled,
        full_decode=graph.full_decode,
        full_mixed=graph.full_mixed,
    )
    if graph.full_mixed and not decision.full_mixed:
        graph = dataclasses.replace(graph, full_mixed=False)
    if graph.full_decode and not decision.full_decode:
        graph = dataclasses.replace(graph, full_decode=False, decode_batch_sizes=())
    if graph.piecewise_enabled and not decision.piecewise:
        graph = dataclasses.replace(graph, piecewise_cudagraph="none", capture_sizes=())
    return decision.name, graph


def fit_max_model_len(config: EngineConfig, block_manager: BlockManager) -> EngineConfig:
    """A max_model_len the KV pool cannot hold is lowered to what it holds, with a warning
    naming both numbers (the pool is sized after the model loads, so this is the first place
    both are known). One request of max_model_len tokens then always fits the pool alone."""
    capacity = block_manager.num_usable_blocks * block_manager.block_size
    max_model_len = config.scheduler.max_model_len
    if max_model_len <= capacity:
        return config
    logger.warning(
        "max_model_len %d is more than the KV cache holds (%d tokens): lowering max_model_len "
        "to %d. Give the cache more memory (num_kv_tokens, gpu_memory_utilization) to serve "
        "longer requests.",
        max_model_len,
        capacity,
        capacity,
    )
    scheduler = dataclasses.replace(config.scheduler, max_model_len=capacity)
    return config.replace(scheduler=scheduler)


def _make_runner(config: EngineConfig, model_path: str | None):
    """One ModelRunner in this process, or rank 0 of a tensor-parallel group whose other ranks
    run in worker processes (tesela/executor/multiproc.py)."""
    if config.parallel.tensor_parallel_size > 1:
        from tesela.executor.multiproc import TensorParallelRunner

        return TensorParallelRunner(config, model_path)
    return ModelRunner(config, model_path)


class LLMEngine:
    def __init__(
        self, config: EngineConfig, model_path: str | None, tokenizer: Tokenizer | None = None
    ) -> None:
        self.config = config
        self.runner = _make_runner(config, model_path)
        tokenizer_path = config.tokenizer or model_path
        self.tokenizer = tokenizer or (
            load_tokenizer(tokenizer_path, config.model_config.eos_token_ids)
            if tokenizer_path
            else ByteTokenizer()
        )
        self.eos_token_ids = tuple(
            sorted(set(config.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids))
        )
        self.block_manager = BlockManager(
            self.runner.num_kv_blocks,
            config.cache.block_size,
            RESERVED_BLOCKS,
            enable_prefix_caching=config.cache.enable_prefix_caching,
        )
        self.config = config = fit_max_model_len(config, self.block_manager)
        self.scheduler = Scheduler(
            config.scheduler, self.block_manager, max_loras=config.lora.max_loras
        )
        self.sampler = Sampler(self.runner.device, config.seed)
        self._ids = itertools.count()
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}

    # ---- requests ------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        cache_salt: str | None = None,
        lora_id: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> str:
        """Queue a request. Requests share cached prefixes only when their `cache_salt` and
        `lora_id` (any namespace) and adapter (`lora_request`, which also serves the request)
        are equal."""
        params = params or SamplingParams()
        lora_int_id = self.add_lora(lora_request) if lora_request is not None else 0
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty: give a non-empty prompt")
        vocab = self.config.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.prompt_logprobs is not None:
            # Prompt logprobs need every prompt position computed: a salt of its own keeps
            # this request from starting on a cached prefix.
            cache_salt = f"prompt-logprobs:{request_id}"
        request = Request(
            request_id,
            token_ids,
            params,
            eos_token_ids=self.eos_token_ids,
            lora_id=lora_id,
            lora_int_id=lora_int_id,
            cache_salt=cache_salt,
        )
        self.scheduler.add(request)
        self.requests[request_id] = request
        self.detokenizers[request_id] = IncrementalDetokenizer(
            self.tokenizer,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )
        return request_id

    # ---- LoRA adapters -------------------------------------------------------------------

    def add_lora(self, lora_request: LoRARequest) -> int:
        """Load an adapter (once; later calls with the same request are free); its id."""
        manager = self.runner.lora_manager
        if manager is None:
            raise ValueError(
                f"LoRA adapter {lora_request.lora_name!r} was requested but LoRA is off: start "
                "the engine with enable_lora=True (server: --lora-modules or --enable-lora)"
            )
        return manager.add_adapter(lora_request).lora_id

    def remove_lora(self, lora_id: int) -> None:
        """Unload an adapter; refused while requests still use it."""
        if any(r.lora_int_id == lora_id for r in self.requests.values()):
            raise ValueError(f"LoRA adapter {lora_id} is still in use by running requests")
        if self.runner.lora_manager is None:
            raise ValueError("LoRA is off: there is no adapter to unload")
        self.runner.lora_manager.remove_adapter(lora_id)

    def list_loras(self) -> list[LoRARequest]:
        manager = self.runner.lora_manager
        return list(manager.requests.values()) if manager else []

    def abort(self, request_id: str) -> bool:
        request = self.scheduler.abort(request_id)
        if request is not None:
            self.sampler.forget(request_id)
            self.requests.pop(request_id, None)
            self.detokenizers.pop(request_id, None)
        return request is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step loop -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        sampled: list[int | None] = []
        updated: list[Request] = []
        if scheduled is not None:
            sampled = self._run(scheduled)
            self.scheduler.update(scheduled, sampled)
            updated = [r for r, t in zip(scheduled.requests, sampled, strict=True) if t is not None]
        for request in updated:
            self._detokenize(request)
        outputs = {r.request_id: self._output(r, new_tokens=1) for r in updated}
        for request in self.scheduler.pop_finished():
            self.sampler.forget(request.request_id)
            self.requests.pop(request.request_id, None)
            detokenizer = self.detokenizers.pop(request.request_id, None)
            if detokenizer is not None:  # emit a held-back incomplete final character
                detokenizer.flush(request.output_token_ids)
                request.output_text = detokenizer.text
            new = 1 if request.request_id in outputs else 0
            outputs[request.request_id] = self._output(request, new_tokens=new)
        return list(outputs.values())

    def _run(self, scheduled: ScheduledBatch) -> list[int | None]:
        logits = self.runner.execute(self._batch_inputs(scheduled))
        rows = [i for i in range(len(scheduled.requests)) if scheduled.samples(i)]
        requests = [scheduled.requests[i] for i in rows]
        if len(logits) > len(rows):  # prompt logprobs follow the sampling rows' logits
            self._record_prompt_logprobs(scheduled, logits[len(rows) :])
            logits = logits[: len(rows)]
        histories = None
        if any(r.params.needs_history for r in requests):
            histories = [
                SamplingHistory(
                    r.prompt_token_ids,
                    r.output_token_ids,
                    (() if r.params.ignore_eos else r.eos_token_ids) + r.params.stop_token_ids,
                )
                for r in requests
            ]
        tokens, logprobs = self.sampler(
            logits, [r.params for r in requests], [r.request_id for r in requests], histories
        )
        sampled: list[int | None] = [None] * len(scheduled.requests)
        for row, request, token, lp in zip(rows, requests, tokens, logprobs, strict=True):
            sampled[row] = token
            if lp is not None:
                request.output_logprobs.append(lp)
        return sampled

    @staticmethod
    def _prompt_logprob_rows(scheduled: ScheduledBatch) -> list[int]:
        """Rows whose chunk predicts prompt tokens of a request that asked for their logprobs."""
        return [
            i
            for i, (r, p) in enumerate(zip(scheduled.requests, scheduled.prefix_lens, strict=True))
            if r.params.prompt_logprobs is not None and p < r.num_prompt_tokens - 1
        ]

    def _record_prompt_logprobs(self, scheduled: ScheduledBatch, logits: torch.Tensor) -> None:
        """The logits at position i score prompt token i + 1 (positions are keyed, so a chunk
        recomputed after preemption overwrites rather than duplicates)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        offset = 0
        for row in self._prompt_logprob_rows(scheduled):
            request, start = scheduled.requests[row], scheduled.prefix_lens[row]
            count = scheduled.num_new_tokens[row]
            positions = [
                p for p in range(start, start + count) if p + 1 < request.num_prompt_tokens
            ]
            if positions:
                row_logprobs = logprobs[offset : offset + len(positions)]
                targets = torch.tensor(
                    [request.prompt_token_ids[p + 1] for p in positions], device=logits.device
                )
                chosen = row_logprobs.gather(1, targets[:, None])[:, 0].tolist()
                k = max(request.params.prompt_logprobs, 1)
                top_values, top_ids = (t.tolist() for t in row_logprobs.topk(k, dim=-1))
                n = request.params.prompt_logprobs
                for j, p in enumerate(positions):
                    top = dict(zip(top_ids[j][:n], top_values[j][:n], strict=True))
                    token = request.prompt_token_ids[p + 1]
                    request.prompt_logprobs[p + 1] = TokenLogprobs(token, chosen[j], top)
            offset += count

    def _batch_inputs(self, scheduled: ScheduledBatch) -> BatchInputs:
        token_ids = [
            r.all_token_ids[p : p + n]
            for r, p, n in zip(
                scheduled.requests, scheduled.prefix_lens, scheduled.num_new_tokens, strict=True
            )
        ]
        return BatchInputs(
            token_ids=token_ids,
            prefix_lens=list(scheduled.prefix_lens),
            block_tables=[list(r.block_ids) for r in scheduled.requests],
            block_size=self.config.cache.block_size,
            logits_rows=[i for i in range(len(scheduled.requests)) if scheduled.samples(i)],
            request_ids=[r.request_id for r in scheduled.requests],
            lora_ids=[r.lora_int_id for r in scheduled.requests],
            input_logprob_rows=tuple(self._prompt_logprob_rows(scheduled)),
        )  # the mode comes from the rows (a recompute chunk past the prompt is not decode)

    def _output(self, request: Request, new_tokens: int) -> RequestOutput:
        text = request.output_text
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids),
            text=text,
            new_token_ids=request.output_token_ids[-new_tokens:] if new_tokens else [],
            logprobs=list(request.output_logprobs) if request.params.logprobs is not None else None,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
            prompt_logprobs=self._prompt_logprob_list(request),
            num_cached_tokens=request.num_cached_tokens or 0,
        )

    @staticmethod
    def _prompt_logprob_list(request: Request) -> list[TokenLogprobs | None] | None:
        if request.params.prompt_logprobs is None:
            return None
        positions = range(1, request.num_prompt_tokens)
        return [None, *(request.prompt_logprobs.get(p) for p in positions)]

    def _detokenize(self, request: Request) -> None:
        """Extend the request's text by its new token (O(1)); a stop string finishes it."""
        detokenizer = self.detokenizers[request.request_id]
        detokenizer.update(request.output_token_ids)
        request.output_text = detokenizer.text
        if detokenizer.stopped_by is not None and not request.is_finished:
            self.scheduler.finish(request, "stop")

    def shutdown(self) -> None:
        """Stop tensor-parallel workers (a no-op for one process); the engine is unusable after."""
        self.runner.shutdown()

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_waiting": len(self.scheduler.waiting),
            "num_running": len(self.scheduler.running),
            "kv_blocks_total": bm.num_usable_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_cached": bm.num_cached_blocks,
            "prefix_caching": bm.enable_prefix_caching,
            "prefix_cache_queried_tokens": bm.stats.queried_tokens,
            "prefix_cache_hit_tokens": bm.stats.hit_tokens,
            "prefix_cache_hit_rate": bm.stats.hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
            "dispatch": self.runner.dispatcher.stats.as_dict(),
        }
