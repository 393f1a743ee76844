"""Small-M linear layers (M <= 16 tokens, the decode batch): a weight-streaming Triton kernel,
used only where a tuning run measured it faster than cuBLAS.

At batch 1-16 a linear layer is a GEMV: it reads the whole weight once and does almost no math,
so its time is the weight's bytes over the bandwidth it reaches. Each program of `gemv_kernel`
streams BLOCK_N full weight rows (all of K, no split-K, so the result is deterministic and each
output row's sum runs in the same order whatever M is: a row's tokens do not depend on the rest
of the batch).

Which kernel serves a shape is data, not a guess: `gemv_table.json` beside this file maps
device name -> dtype -> "N,K" -> M bucket (1, 2, 4, 8, 16) -> kernel config, and holds only
the shapes where the Triton kernel beat cuBLAS on that device (written by
`python -m tesela.layers.gemv_tune` on the GPU, then checked in). A shape, device or dtype not
in the table runs F.linear (cuBLAS), as does every M > 16.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tesela.layers import fused

TABLE_PATH = Path(__file__).with_name("gemv_table.json")
M_BUCKETS = (1, 2, 4, 8, 16)
MAX_M = M_BUCKETS[-1]


def m_bucket(m: int) -> int:
    return next(b for b in M_BUCKETS if b >= m)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr,
        M, N, K, stride_xm, stride_wn, stride_om,
        HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        row_mask, m_mask = rows < N, ms < M
        w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + ks[None, :]
        x_ptrs = x_ptr + ms[:, None] * stride_xm + ks[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + ks) < K
            w = tl.load(w_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if USE_DOT:  # tensor cores (M padded to 16): worth it from a few tokens up
                acc += tl.dot(x, tl.trans(w))
            else:
                prod = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
                acc += tl.sum(prod, axis=2)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + ms[:, None] * stride_om + rows[None, :]
        tl.store(
            out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & row_mask[None, :]
        )

    return gemv_kernel


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: dict):
    """x [M, K] @ weight[N, K]^T (+ bias) with the Triton kernel and `config` (block_n,
    block_k, use_dot, num_warps, num_stages)."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_M or weight.shape[1] != k or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"gemv serves [<= {MAX_M}, K] @ [N, K]^T row-major, got {x.shape}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    bucket = m_bucket(m)
    block_m = max(bucket, 16) if config["use_dot"] else bucket
    grid = (-(-n // config["block_n"]),)
    _kernel()[grid](
        x, weight, bias if bias is not None else weight, out,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, USE_DOT=config["use_dot"],
        BLOCK_M=block_m, BLOCK_N=config["block_n"], BLOCK_K=config["block_k"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return out


@functools.cache
def _device_table(device_name: str, dtype: str, path: Path = TABLE_PATH) -> dict:
    """{(N, K, bucket): config} for this device and dtype; empty when not tuned."""
    if not path.is_file():
        return {}
    table = json.loads(path.read_text()).get(device_name, {}).get(dtype, {})
    result = {}
    for shape, buckets in table.items():
        n, k = (int(v) for v in shape.split(","))
        for bucket, config in buckets.items():
            result[(n, k, int(bucket))] = config
    return result


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def lookup(x: torch.Tensor, weight: torch.Tensor) -> dict | None:
    """The tuned Triton config for this call, or None for F.linear."""
    if x.dim() != 2 or x.shape[0] > MAX_M or x.shape[0] == 0 or not fused.fused_enabled(x):
        return None
    dtype = str(x.dtype).removeprefix("torch.")
    table = _device_table(_device_name(x.device.index or 0), dtype)
    return table.get((weight.shape[0], weight.shape[1], m_bucket(x.shape[0])))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    config = lookup(x, weight)
    if config is None:
        return F.linear(x, weight, bias)
    return gemv(x, weight, bias, config)
