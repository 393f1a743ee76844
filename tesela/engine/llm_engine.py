"""LLMEngine: the step loop that ties the scheduler, the model runner and the sampler together.

`add_request` validates and queues; `step` schedules one batch, runs it, samples, applies stop
conditions (tokens, length, stop strings) and returns what changed. The offline `LLM` and the
server both drive this loop.

Overlap scheduling (`EngineConfig.overlap_schedule`): a step launches batch N+1 before it reads
batch N's tokens, so the host schedules and builds N+1 while the GPU runs N. The sampled ids
stay on the device: a decode row of N+1 takes its input id from N's token tensor (a device
gather), and N's results come back through pinned memory, read one step later. Stops found
then are exact: the request finishes, its blocks are freed (N+1's writes to them are ordered
before any later batch's on the stream), and the token N+1 drew for it is dropped. Without
overlap the same code reads each step back at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence
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
    read_hf_config,
    resolve_graph_config,
    resolve_lora_config,
)
from tesela.core.forward_batch import BatchInputs
from tesela.core.kv_cache import RESERVED_BLOCKS
from tesela.distributed.sharding import check_tp_shapes
from tesela.engine.block_manager import BlockManager
from tesela.engine.detokenizer import IncrementalDetokenizer
from tesela.engine.request import GrowingPrefix, Request, TokenLogprobs
from tesela.engine.sampler import Sampler, SamplingHistory, read_back
from tesela.engine.sampling_params import SamplingParams
from tesela.engine.scheduler import ScheduledBatch, Scheduler
from tesela.engine.text import TextSnapshot, as_snapshot
from tesela.engine_args import EngineArgs
from tesela.executor.model_runner import ModelRunner
from tesela.executor.sampling import SampleOutput, variant_for
from tesela.lora.request import LoRARequest
from tesela.models.registry import check_architecture
from tesela.presets import DEFAULT_MODEL, PRESETS
from tesela.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

logger = logging.getLogger("tesela.engine")


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    # The output so far: a list once finished; before, the request's list frozen at this
    # step's length (`GrowingPrefix`: no copy per step), equal to the list it stands for.
    token_ids: Sequence[int]
    # The text so far, a str when read. Set from a str or a `TextSnapshot` (tesela/engine/
    # text.py: the engine's outputs hold one, joined only if `text` is read; a stream takes
    # its new characters from `text_snapshot` without joining).
    text: str
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: Sequence[TokenLogprobs] | None = None
    # One entry per prompt token (None for the first, which nothing predicts), if asked.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def text(self) -> str:
        return str(self._text)

    @text.setter
    def text(self, value: str | TextSnapshot) -> None:
        if isinstance(value, property):  # the dataclass's "default": no text was given
            raise TypeError("RequestOutput() needs its text (a str or a TextSnapshot)")
        self._text = as_snapshot(value)

    @property
    def text_snapshot(self) -> TextSnapshot:
        """The text as a snapshot: its length and any slice without joining the rest."""
        return self._text


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
    hf = read_hf_config(path)
    try:  # an unknown architecture is refused before the config's other fields are read
        check_architecture(hf.get("architectures") or [])
    except ValueError as exc:
        raise ValueError(f"{path / 'config.json'}: {exc}") from None
    return ModelConfig.from_pretrained(path, hf), str(path)


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
        parallel=ParallelConfig(
            args.tensor_parallel_size,
            args.distributed_timeout_s,
            custom_all_reduce=args.custom_all_reduce,
            fused_all_reduce_add_norm=args.fused_all_reduce_add_norm,
        ),
        overlap_schedule=_overlap_schedule(
            args.overlap_schedule, on_cuda, args.tensor_parallel_size
        ),
    )
    return config, path


def _overlap_schedule(value: str | bool | None, on_cuda: bool, tensor_parallel_size: int) -> bool:
    """auto: on for CUDA at TP=1 (the host work hides behind the GPU); off on CPU, where every
    op runs on the host (nothing to hide), and under tensor parallelism, whose driver sends
    each batch's host ids to the workers and waits for the step (tesela/executor/multiproc.py)."""
    choices = {"auto": None, None: None, "on": True, True: True, "off": False, False: False}
    if value not in choices:
        raise ValueError(f"overlap_schedule must be auto, on or off, got {value!r}")
    chosen = choices[value]
    if tensor_parallel_size > 1:
        if chosen:
            raise ValueError(
                "overlap_schedule='on' is not supported with tensor_parallel_size="
                f"{tensor_parallel_size}: the workers need every input id on the host. Use "
                "overlap_schedule='off' or 'auto' (--overlap-schedule off|auto), or "
                "tensor_parallel_size=1"
            )
        if chosen is None and on_cuda:
            logger.info(
                "overlap scheduling is off: tensor_parallel_size=%d sends host ids to the "
                "workers and waits for each step",
                tensor_parallel_size,
            )
        return False
    return on_cuda if chosen is None else chosen


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


@dataclass
class _InFlight:
    """A launched step: its sampled tokens on the device and their copies on the way to pinned
    host memory, which `wait` makes readable."""

    scheduled: ScheduledBatch
    rows: list[int]  # the batch rows that sample, in the order of `sampled`
    params: list[SamplingParams]
    sampled: SampleOutput | None
    host: SampleOutput | None = None
    event: torch.cuda.Event | None = None
    index_of: dict[str, int] = field(default_factory=dict)  # request id -> token row

    def start_copy(self) -> None:
        self.index_of = {
            self.scheduled.requests[row].request_id: i for i, row in enumerate(self.rows)
        }
        if self.sampled is None:
            return
        self.host = self.sampled.to_host()
        device = self.sampled.tokens.device
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            # The stream of the tensor's own device: with no device given, finding the current
            # one costs the host some 30 us a step (torch checks CUDA's availability anew).
            self.event.record(torch.cuda.current_stream(device))

    def wait(self) -> SampleOutput:
        if self.event is not None:
            self.event.synchronize()
        return self.host

    @property
    def tokens(self) -> torch.Tensor | None:
        """The sampled tokens on the device, which a next batch's fed tokens read."""
        return None if self.sampled is None else self.sampled.tokens


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
        self._inflight: _InFlight | None = None  # launched, tokens not read yet (overlap)
        self.num_generated_tokens = 0  # appended to requests' outputs, since the start

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
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ---- the step loop -------------------------------------------------------------------

    def step(self, *, running_outputs: bool = True) -> list[RequestOutput]:
        """Launch the next batch, then read back the previous one (overlap) or this one. The
        outputs of the requests that got a token or finished; with `running_outputs=False`
        only the finished ones (`LLM.generate` reads nothing else, and an output for every
        running row is host time each step at large batches), and the text of a request
        without stop strings is decoded once, as it finishes, not extended every step."""
        resolved: list[Request] = []
        if self._inflight is not None and self._needs_host_tokens():
            # the next batch needs these ids on the host
            resolved += self._resolve(self._inflight, running_outputs)
            self._inflight = None
        scheduled = self.scheduler.schedule()
        launched = self._launch(scheduled) if scheduled is not None else None
        previous, self._inflight = self._inflight, launched  # never resolve a step twice
        if previous is not None:
            resolved += self._resolve(previous, running_outputs)
        if launched is not None and not self.config.overlap_schedule:
            resolved += self._resolve(launched, running_outputs)
            self._inflight = None
        self.num_generated_tokens += len(resolved)
        outputs = {}
        if running_outputs:
            outputs = {r.request_id: self._output(r, new_tokens=1) for r in resolved}
        new = {r.request_id for r in resolved}
        for request in self.scheduler.pop_finished():
            self._retire(request, outputs, new_token=request.request_id in new)
        return list(outputs.values())

    def _needs_host_tokens(self) -> bool:
        """Whether a running request samples with host-side processors that read its tokens."""
        return any(self.sampler.needs_history(r.params) for r in self.scheduler.running)

    def _launch(self, scheduled: ScheduledBatch) -> _InFlight:
        """Run the batch and sample on the device; start copying the results to the host."""
        rows = [i for i in range(len(scheduled.requests)) if scheduled.samples(i)]
        requests = [scheduled.requests[i] for i in rows]
        inputs = self._batch_inputs(scheduled, rows)
        feed = self._inflight.tokens if inputs.feed_dst else None
        params = [r.params for r in requests]
        if inputs.input_logprob_rows:
            sampled = self._forward_prompt_logprobs(scheduled, inputs, feed, requests, params)
        elif rows:
            sampled = self._forward_sample(inputs, feed, requests, params)
        else:
            sampled = None
            self.runner.execute(inputs, feed)  # prefill chunks only: KV writes, no sampling
        self.scheduler.launched(scheduled)
        step = _InFlight(scheduled, rows, params, sampled)
        step.start_copy()
        return step

    def _forward_sample(self, inputs: BatchInputs, feed, requests: list[Request], params):
        """Forward and sampling on the device: in the FULL decode graphs where they serve the
        batch; with logits taken out when a row needs host-side logit processors."""
        ids = [r.request_id for r in requests]
        indices = [r.num_output_tokens for r in requests]  # the token each row draws
        if self.sampler.uses_host_processors(params):
            logits = self.runner.execute(inputs, feed)
            return self.sampler.sample(logits, params, ids, indices, self._histories(requests))
        variant = variant_for(params)
        tensors = None  # a greedy batch samples by argmax: no per-row tensors to build or copy
        if variant.reads_tensors:
            vocab = self.config.model_config.vocab_size
            tensors = self.sampler.tensors(params, ids, indices, vocab)
        return self.runner.execute_sample(inputs, tensors, variant, feed)

    def _resolve(self, step: _InFlight, texts: bool) -> list[Request]:
        """Read a launched step's tokens, append them, apply stop conditions; the requests
        that got a token. With `texts` every such request's text is extended now; else only
        those with stop strings (which need it to stop), the others' at `_retire`."""
        if step.sampled is None:
            self.scheduler.resolve(step.scheduled, [None] * len(step.scheduled.requests))
            return []
        tokens, logprobs = read_back(step.wait(), step.params)
        sampled: list[int | None] = [None] * len(step.scheduled.requests)
        updated: list[Request] = []
        for row, token, lp in zip(step.rows, tokens, logprobs, strict=True):
            sampled[row] = token
            request = step.scheduled.requests[row]
            if not request.is_finished:  # else: stopped or aborted meanwhile, token dropped
                updated.append(request)
                if lp is not None:
                    request.output_logprobs.append(lp)
        self.scheduler.resolve(step.scheduled, sampled)
        for request in updated:
            if texts or request.params.stop:
                self._detokenize(request)
        return updated

    def _retire(self, request: Request, outputs: dict[str, RequestOutput], new_token: bool) -> None:
        self.sampler.forget(request.request_id)
        self.requests.pop(request.request_id, None)
        detokenizer = self.detokenizers.pop(request.request_id, None)
        if detokenizer is not None:  # the tokens not decoded yet, a held-back final character
            detokenizer.flush(request.output_token_ids)
            request.output_text = detokenizer.snapshot()
        outputs[request.request_id] = self._output(request, new_tokens=int(new_token))

    def _forward_prompt_logprobs(self, scheduled, inputs, feed, requests, params):
        """A batch that scores prompt tokens: logits out (eager or piecewise), prompt logprobs
        recorded, the sampling rows sampled eagerly with the same function."""
        logits = self.runner.execute(inputs, feed)
        rows = len(requests)
        self._record_prompt_logprobs(scheduled, logits[rows:])
        if not rows:
            return None
        ids = [r.request_id for r in requests]
        indices = [r.num_output_tokens for r in requests]
        histories = self._histories(requests) if self.sampler.uses_host_processors(params) else None
        return self.sampler.sample(logits[:rows], params, ids, indices, histories)

    @staticmethod
    def _histories(requests: list[Request]) -> list[SamplingHistory] | None:
        """Token histories for penalties and min_tokens (their ids are on the host: the engine
        reads the step in flight back first, `_needs_host_tokens`)."""
        if not any(r.params.needs_history for r in requests):
            return None
        return [
            SamplingHistory(
                r.prompt_token_ids,
                r.output_token_ids,
                (() if r.params.ignore_eos else r.eos_token_ids) + r.params.stop_token_ids,
            )
            for r in requests
        ]

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

    def _batch_inputs(self, scheduled: ScheduledBatch, logits_rows: list[int]) -> BatchInputs:
        """The batch's host lists; (overlap) the tokens whose ids are still in flight are fed
        from the in-flight step's rows (`feed_dst`, `feed_src`)."""
        token_ids, gather_dst, gather_src = [], [], []
        num_tokens = 0
        for r, p, n in zip(
            scheduled.requests, scheduled.prefix_lens, scheduled.num_new_tokens, strict=True
        ):
            known = r.num_tokens - r.num_inflight_tokens
            if p + n <= known:
                row = r.token_ids(p, p + n)
            else:  # the last token is in flight: its id comes from the device
                assert p + n == known + 1 and self._inflight is not None, "unknown token ids"
                # A decode row (the common case) needs no host ids at all.
                row = r.token_ids(p, known) if p < known else []
                row.append(0)
                gather_dst.append(num_tokens + n - 1)
                gather_src.append(self._inflight.index_of[r.request_id])
            token_ids.append(row)
            num_tokens += n
        return BatchInputs(
            token_ids=token_ids,
            prefix_lens=list(scheduled.prefix_lens),
            block_tables=[list(r.block_ids) for r in scheduled.requests],
            block_size=self.config.cache.block_size,
            logits_rows=logits_rows,
            request_ids=[r.request_id for r in scheduled.requests],
            lora_ids=[r.lora_int_id for r in scheduled.requests],
            input_logprob_rows=tuple(self._prompt_logprob_rows(scheduled)),
            feed_dst=tuple(gather_dst),
            feed_src=tuple(gather_src),
        )  # the mode comes from the rows (a recompute chunk past the prompt is not decode)

    def _output(self, request: Request, new_tokens: int) -> RequestOutput:
        # A running request's output views its lists (O(1) a step); a finished one copies
        # them. The text is a snapshot either way (joined when read).
        shown = list if request.is_finished else GrowingPrefix
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=shown(request.output_token_ids),
            text=request.output_text,
            new_token_ids=request.output_token_ids[-new_tokens:] if new_tokens else [],
            logprobs=shown(request.output_logprobs)
            if request.params.logprobs is not None
            else None,
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
        request.output_text = detokenizer.snapshot()
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
            "tensor_parallel": self.runner.tp.describe(),
        }
