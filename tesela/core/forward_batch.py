"""ForwardBatch: everything one forward pass needs, as device tensors plus host copies.

A batch is a list of request rows. Row i has `prefix_lens[i]` tokens already in the paged KV
cache and `extend_lens[i]` new tokens in this batch (1 for a decode row). The new tokens of all
rows are laid out back to back in the token dimension, row by row.

The mode comes from the rows, never from request state: `build` derives it, and a mode given
to either constructor is checked against the rows (a DECODE batch has exactly one new token per
row), so a batch whose label disagrees with its shape cannot exist. After preemption a
recompute chunk past the prompt is extend work, whatever the request has generated.
"""

from __future__ import annotations

import enum
import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

_batch_ids = itertools.count(1)


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # rows bring chunks of new tokens (prefill, a chunk, a recompute)
    DECODE = "decode"  # every row brings exactly one token on a prefix already in the cache
    MIXED = "mixed"  # both kinds of rows in one batch

    @property
    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE


@dataclass(frozen=True)
class BatchStamp:
    """The identity of a batch; attention metadata carries the stamp of the batch it planned."""

    batch_id: int
    mode: ForwardMode
    num_tokens: int
    batch_size: int

    def __str__(self) -> str:
        return (
            f"batch #{self.batch_id} ({self.mode.value}, {self.num_tokens} tokens, "
            f"{self.batch_size} rows)"
        )


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    out_cache_loc: torch.Tensor  # [num_tokens] int64: KV slot every new token writes
    seq_lens: torch.Tensor  # [batch] int32: tokens in cache after this pass
    prefix_lens: torch.Tensor  # [batch] int32: tokens in cache before this pass
    extend_start_loc: torch.Tensor  # [batch] int32: first token of each row in the token dim
    block_tables: torch.Tensor  # [batch, max_blocks] int32, padded with block 0 (dummy)
    logits_indices: torch.Tensor  # [num_logits] int64: token rows whose logits are needed
    seq_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    request_ids: list[str] = field(default_factory=list)
    lora_ids: list[int] = field(default_factory=list)  # per row; 0 (or empty): the base model
    return_input_logprobs: bool = False
    batch_id: int = field(default_factory=lambda: next(_batch_ids))
    # [3, num_tokens] int64: input_ids, positions and out_cache_loc as the rows of one tensor
    # (`build` packs them so, the three fields being its rows), which graph runners copy into
    # their static buffers in one op; a batch built field by field gets a stacked copy
    token_rows: torch.Tensor | None = None
    # The device buffer `build` uploads in one copy, as int32 words (`pack_layout`): a header
    # (rows, tokens, table width), token_rows, seq_lens, prefix_lens, extend_start_loc,
    # block_tables (all views of it), then logits_indices. A FULL mixed graph copies it whole,
    # in one op, and derives its inputs from it on the device. A batch built field by field
    # packs it on demand (`pack`).
    packed: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_mode(self.mode, self.extend_lens_cpu, self.num_tokens)
        if self.token_rows is None:
            self.token_rows = torch.stack((self.input_ids, self.positions, self.out_cache_loc))

    def pack(self) -> torch.Tensor:
        """The batch's pack: `packed`, or for a batch built field by field the same layout up to
        its block tables, packed now on the device (without waiting for it)."""
        if self.packed is None:
            n, width = self.batch_size, self.block_tables.shape[1]
            header = torch.tensor([n, self.num_tokens, width, 0], dtype=torch.int32)
            parts = [header.to(self.device, non_blocking=True)]
            words = self.token_rows.to(torch.int64).contiguous().view(-1).view(torch.int32)
            parts.append(
                torch.nn.functional.pad(words, (0, _aligned(words.numel()) - words.numel()))
            )
            for row in (self.seq_lens, self.prefix_lens, self.extend_start_loc):
                parts.append(torch.nn.functional.pad(row.to(torch.int32), (0, _aligned(n) - n)))
            parts.append(self.block_tables.to(torch.int32).reshape(-1))
            self.packed = torch.cat(parts)
        return self.packed

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @functools.cached_property  # a batch's rows never change (`replace` makes a new batch)
    def extend_lens_cpu(self) -> list[int]:
        return [s - p for s, p in zip(self.seq_lens_cpu, self.prefix_lens_cpu, strict=True)]

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @functools.cached_property
    def stamp(self) -> BatchStamp:
        return BatchStamp(self.batch_id, self.mode, self.num_tokens, self.batch_size)

    @classmethod
    def build(
        cls,
        *,
        token_ids: list[list[int]],
        prefix_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        logits_rows: list[int] | None = None,
        request_ids: list[str] | None = None,
        mode: ForwardMode | None = None,
        return_input_logprobs: bool = False,
        lora_ids: list[int] | None = None,
        input_logprob_rows: list[int] = (),
        batch_id: int | None = None,
    ) -> ForwardBatch:
        """Build a batch from host lists: the new tokens of each row, its prefix length in the
        cache and its block table. `logits_rows` lists the rows that sample (their last token's
        logits are computed); by default every row does. `input_logprob_rows` want the logits
        of every new token (prompt logprobs): those come after the sampling rows' logits."""
        if not token_ids:
            raise ValueError("a ForwardBatch needs at least one row")
        extend_lens = [len(t) for t in token_ids]
        if min(extend_lens) <= 0:
            raise ValueError("every row of a ForwardBatch needs at least one new token")
        mode = mode or infer_mode(extend_lens, prefix_lens)
        seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens, strict=True)]
        # Every token's position and KV slot, vectorised (a batch is built on the host every
        # step, so its cost is per-step host time): row r's new tokens sit at positions
        # prefix_r .. seq_r - 1, in the blocks its table lists.
        lens = np.asarray(extend_lens, dtype=np.int64)
        ends = np.cumsum(lens)
        starts = ends - lens
        row_of = np.repeat(np.arange(len(lens)), lens)
        positions = np.arange(ends[-1]) + np.repeat(np.asarray(prefix_lens) - starts, lens)
        tables = padded_block_tables(block_tables, seq_lens, block_size)
        slots = tables[row_of, positions // block_size].astype(np.int64) * block_size
        slots += positions % block_size
        ids = np.fromiter(itertools.chain.from_iterable(token_ids), np.int64, ends[-1])
        rows = range(len(token_ids)) if logits_rows is None else logits_rows
        last = ends - 1

        tensors, packed = pack_to_device(
            {  # in `pack_layout`'s order
                "header": ([len(lens), ends[-1], tables.shape[1], 0], torch.int32),
                "token_rows": (np.stack((ids, positions, slots)), torch.int64),
                "seq_lens": (seq_lens, torch.int32),
                "prefix_lens": (prefix_lens, torch.int32),
                "extend_start_loc": (starts, torch.int32),
                "block_tables": (tables, torch.int32),
                "logits_indices": (
                    [last[r] for r in rows]
                    + [i for r in input_logprob_rows for i in range(starts[r], last[r] + 1)],
                    torch.int64,
                ),
            },
            device,
        )
        del tensors["header"]
        token_rows = tensors["token_rows"]
        return cls(
            mode=mode,
            input_ids=token_rows[0],
            positions=token_rows[1],
            out_cache_loc=token_rows[2],
            **tensors,
            packed=packed.view(torch.int32),
            seq_lens_cpu=seq_lens,
            prefix_lens_cpu=list(prefix_lens),
            request_ids=list(request_ids or []),
            lora_ids=list(lora_ids or []),
            return_input_logprobs=return_input_logprobs or bool(input_logprob_rows),
            batch_id=next(_batch_ids) if batch_id is None else batch_id,
        )


@dataclass(frozen=True)
class BatchInputs:
    """A batch as the scheduler decided it, in host lists: cheap to send to other tensor-
    parallel ranks, each of which builds the identical ForwardBatch (same batch id, hence the
    same stamp) on its own device with `build`."""

    token_ids: list[list[int]]
    prefix_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    logits_rows: list[int] | None = None
    request_ids: list[str] | None = None
    mode: ForwardMode | None = None
    return_input_logprobs: bool = False
    input_logprob_rows: tuple[int, ...] = ()
    lora_ids: list[int] | None = None  # per row; 0 (or None): the base model
    batch_id: int = field(default_factory=lambda: next(_batch_ids))

    def build(self, device: torch.device | str) -> ForwardBatch:
        return ForwardBatch.build(
            token_ids=self.token_ids,
            prefix_lens=self.prefix_lens,
            block_tables=self.block_tables,
            block_size=self.block_size,
            device=device,
            logits_rows=self.logits_rows,
            request_ids=self.request_ids,
            mode=self.mode,
            return_input_logprobs=self.return_input_logprobs,
            input_logprob_rows=self.input_logprob_rows,
            lora_ids=self.lora_ids,
            batch_id=self.batch_id,
        )


def padded_block_tables(
    block_tables: list[list[int]], seq_lens: list[int], block_size: int
) -> np.ndarray:
    """[rows, widest table] int32, short rows padded with block 0 (the dummy block); raises if
    a row's table cannot hold its tokens."""
    widths = np.fromiter(map(len, block_tables), np.int64, len(block_tables))
    short = np.flatnonzero(widths * block_size < np.asarray(seq_lens))
    if len(short):
        row = int(short[0])
        raise ValueError(
            f"row {row} has {seq_lens[row]} tokens but its block table holds {widths[row]} "
            f"blocks of {block_size}: give it at least {-(-seq_lens[row] // block_size)} blocks"
        )
    tables = np.zeros((len(block_tables), widths.max()), dtype=np.int32)
    # Row-major: the flat entries fill each row's first `width` columns, row after row.
    tables[np.arange(tables.shape[1]) < widths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(block_tables), np.int32, int(widths.sum())
    )
    return tables


ALIGN = 16  # bytes: where each array of a packed buffer starts


def to_device_packed(
    arrays: dict[str, tuple[list, torch.dtype]], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Several host lists on `device` in one copy (views of one packed buffer, each starting on
    a 16-byte boundary, so kernels see the alignment they would on their own allocation),
    without blocking the host: a step's metadata costs one copy, not eight. (A plain
    `torch.tensor(values, device="cuda")` would wait for the GPU's queued work, stalling the
    host while an earlier step runs: overlap scheduling builds batches then.)"""
    return pack_to_device(arrays, device)[0]


def pack_to_device(
    arrays: dict[str, tuple[list, torch.dtype]], device: torch.device | str
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`to_device_packed`'s views, and the whole device buffer (uint8) they view."""
    device = torch.device(device)
    items, total = [], 0
    for name, (values, dtype) in arrays.items():
        array = np.asarray(values, dtype=_numpy_dtype(dtype))
        items.append((name, array, dtype, total))
        total += -(-array.nbytes // ALIGN) * ALIGN
    packed = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    flat = packed.numpy()
    for _, array, _, at in items:
        flat[at : at + array.nbytes].view(array.dtype)[:] = array.reshape(-1)
    on_device = packed.to(device, non_blocking=True)
    views = {
        name: on_device[at : at + array.nbytes].view(dtype).view(array.shape)
        for name, array, dtype, at in items
    }
    return views, on_device


def pack_layout(rows: int, tokens: int) -> tuple[int, int, int, int, int]:
    """Where token_rows, seq_lens, prefix_lens, extend_start_loc and block_tables start, in
    int32 words, in a batch's pack (`ForwardBatch.packed`): after a 4-word header (rows,
    tokens, block table width, 0), each on a 16-byte boundary, as `to_device_packed` lays out
    the arrays `build` gives it (token_rows: 3 x tokens int64, 2 words each). The FULL mixed
    planning kernel (tesela/attention/triton_kernels/mixed_plan.py) computes the same offsets
    from the header."""
    seq_at = 4 + _aligned(6 * tokens)
    aligned = _aligned(rows)
    return 4, seq_at, seq_at + aligned, seq_at + 2 * aligned, seq_at + 3 * aligned


def _aligned(n: int) -> int:
    """n int32 words rounded up to a 16-byte boundary (`to_device_packed`'s alignment)."""
    words = ALIGN // 4
    return -(-n // words) * words


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (those the packed host lists use)."""
    return torch.empty((), dtype=dtype).numpy().dtype


class BatchModeError(ValueError):
    """A forward mode that the batch's rows contradict (a runner would fail on its shapes)."""


def check_mode(mode: ForwardMode, extend_lens: list[int], num_tokens: int) -> None:
    """Refuse a DECODE label on rows that are not one new token each: decode kernels and FULL
    decode graphs size everything by the row count."""
    if not isinstance(mode, ForwardMode):
        raise TypeError(f"mode must be a ForwardMode, got {mode!r}")
    if sum(extend_lens) != num_tokens:
        raise ValueError(
            f"the rows' new tokens add up to {sum(extend_lens)}, but the batch has "
            f"{num_tokens} tokens: seq_lens - prefix_lens must count each row's new tokens"
        )
    if mode is ForwardMode.DECODE and any(n != 1 for n in extend_lens):
        shown = extend_lens if len(extend_lens) <= 8 else [*extend_lens[:8], "..."]
        raise BatchModeError(
            f"a DECODE batch has exactly one new token per row, but these rows bring {shown} "
            f"({num_tokens} tokens for {len(extend_lens)} rows): label it EXTEND or MIXED, or "
            "let ForwardBatch.build derive the mode"
        )


def infer_mode(extend_lens: list[int], prefix_lens: list[int]) -> ForwardMode:
    # A decode row brings one token after a non-empty prefix; a 1-token prompt chunk is
    # indistinguishable and is served identically by every backend.
    decode_rows = [n == 1 and p > 0 for n, p in zip(extend_lens, prefix_lens, strict=True)]
    if all(decode_rows):
        return ForwardMode.DECODE
    if any(decode_rows):
        return ForwardMode.MIXED
    return ForwardMode.EXTEND
