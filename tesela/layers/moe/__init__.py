"""Mixture-of-experts layers: the router, the fused experts (Triton) and their torch reference.

- `router.py`: top-k expert selection with each architecture's normalisation rule.
- `reference.py`: the experts as a loop over experts in PyTorch (CPU path and the oracle).
- `align.py`: `moe_align_block_size`, the device-side grouping of (token, expert) pairs by expert,
  padded to the kernel's block size, with buffers sized by the token count (no host sync).
- `kernels.py`: the Triton grouped GEMM (prefill) and per-pair GEMV (decode) kernels.
- `fused_moe.py`: `fused_experts`, which runs align + gate/up (SiLU·mul fused) + down + the
  weighted top-k sum, and the `tesela::fused_moe` custom op the layer calls.
- `tile_configs.py` + `tile_configs.json`: tile sizes per (E, N, K, M bucket), filled by
  `python -m tesela.tune.moe` on a GPU.
- `layer.py`: `SparseMoeBlock`, the module a decoder layer uses as its MLP.
"""
