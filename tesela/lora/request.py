"""LoRARequest: which adapter a request runs with (vLLM's shape). Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name, a positive integer id unique per adapter, and its PEFT folder.

    The id is what batches and caches key on (0 means the base model); the name is what the
    server's `model` field and `/v1/models` use."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("a LoRARequest needs a non-empty name")
        if not isinstance(self.lora_int_id, int) or self.lora_int_id <= 0:
            raise ValueError(
                f"LoRARequest {self.lora_name!r}: lora_int_id must be a positive integer "
                f"(0 is the base model), got {self.lora_int_id!r}"
            )
