"""Multi-LoRA serving: PEFT adapters, device slots, segmented kernels, the per-batch state.

`request` (LoRARequest, no torch), `adapter` (PEFT loading and validation), `kernels` (Triton
shrink/expand and the torch path), `manager` (slots, LRU, per-batch plan and its stamp),
`layer` (the op a LoRA-enabled linear layer runs).
"""

from tesela.lora.request import LoRARequest

__all__ = ["LoRARequest"]
