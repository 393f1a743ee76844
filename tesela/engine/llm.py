"""The offline API: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from tesela.engine.llm_engine import LLMEngine, RequestOutput, make_engine_config
from tesela.engine.sampling_params import SamplingParams
from tesela.engine_args import EngineArgs
from tesela.lora.request import LoRARequest
from tesela.presets import DEFAULT_MODEL


class LLM:
    """Load a model (a folder or a preset name) and generate offline.

    Keyword arguments are the fields of `EngineArgs` (dtype, device, load_format,
    attention_backend, piecewise_cudagraph, capture_sizes, ...); `tokenizer` may also be a
    tokenizer object."""

    def __init__(self, model: str | EngineArgs = DEFAULT_MODEL, **kwargs) -> None:
        tokenizer = kwargs.get("tokenizer")
        if tokenizer is not None and not isinstance(tokenizer, str):
            kwargs.pop("tokenizer")
        else:
            tokenizer = None
        args = model if isinstance(model, EngineArgs) else EngineArgs.from_kwargs(model, **kwargs)
        config, path = make_engine_config(args)
        self.engine = LLMEngine(config, path, tokenizer)

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, if any (also done at interpreter exit)."""
        self.engine.shutdown()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        cache_salt: str | None = None,
        lora_id: str | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt. `lora_request` is one adapter for all prompts or one per
        prompt (None: the base model). Cached prefixes are shared only among requests with the
        same `cache_salt`, `lora_id` namespace and adapter (see `LLMEngine.add_request`)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_request = [lora_request] * len(prompts)
        if len(lora_request) != len(prompts):
            raise ValueError(f"got {len(lora_request)} LoRA requests for {len(prompts)} prompts")
        # Validate every prompt and adapter before queueing any, so a bad one leaves nothing
        # half-done.
        token_prompts = [self._tokens(p) for p in prompts]
        for lora in lora_request:
            if lora is not None:
                self.engine.add_lora(lora)
        ids = [
            self.engine.add_request(
                p, sp, cache_salt=cache_salt, lora_id=lora_id, lora_request=lora
            )
            for p, sp, lora in zip(token_prompts, params, lora_request, strict=True)
        ]
        results: dict[str, RequestOutput] = {}
        budget = {i: sp.max_tokens for i, sp in zip(ids, params, strict=True)}
        # Progress in tokens, so one long generation shows it is moving too.
        bar = tqdm(
            total=sum(p.max_tokens for p in params),
            desc="Generating",
            unit="tok",
            disable=not use_tqdm,
        )
        shown = self.engine.num_generated_tokens
        while self.engine.has_unfinished():
            for output in self.engine.step(running_outputs=False):  # the finished ones
                results[output.request_id] = output
                # A request that stops early gives back the rest of its budget.
                bar.update(budget[output.request_id] - len(output.token_ids))
            bar.update(self.engine.num_generated_tokens - shown)
            shown = self.engine.num_generated_tokens
        bar.close()
        return [results[i] for i in ids]

    def _tokens(self, prompt: str | list[int]) -> list[int]:
        tokens = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise ValueError("a prompt is empty: every prompt needs at least one token")
        return tokens
