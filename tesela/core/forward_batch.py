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

from tesela.core.device import device_key

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
    # block_tables, token_src, logits_indices, feed_dst and feed_src (all views of it). A FULL
    # graph derives its inputs from it on the device, after copying in (one op) the part it
    # reads; a FULL decode graph copies nothing when the batch was built in its buffer
    # (`build(into=...)`). A batch built field by field packs it on demand (`pack`).
    packed: torch.Tensor | None = None
    # [fed] int64 (overlap scheduling): tokens whose ids a step still in flight samples, and
    # that step's row for each (views of the pack; the pack also holds them per token as
    # `token_src`, -1 for an id the host sent, which a FULL decode graph's first kernel reads),
    # and that step's sampled tokens, which the ids come from: `feed_tokens` writes them in
    feed_dst: torch.Tensor | None = None
    feed_src: torch.Tensor | None = None
    fed_from: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_mode(self.mode, self.extend_lens_cpu, self.num_tokens)
        if self.token_rows is None:
            self.token_rows = torch.stack((self.input_ids, self.positions, self.out_cache_loc))

    def feed_tokens(self) -> None:
        """Write the ids of the fed tokens from `fed_from` (the in-flight step's sampled tokens,
        in its row order) into input_ids, on the device: ordered after that step's sampling,
        before this batch's forward reads them. The dispatcher does so for every runner but
        FULL decode graphs, whose first kernel reads them itself."""
        if self.feed_dst is not None:
            if self.fed_from is None:
                raise ValueError(
                    f"{self.stamp} feeds {self.feed_dst.numel()} token ids from a step in "
                    "flight: set fed_from to that step's sampled tokens"
                )
            self.input_ids.index_copy_(
                0, self.feed_dst, self.fed_from.index_select(0, self.feed_src)
            )

    def pack(self) -> torch.Tensor:
        """The batch's pack: `packed`, or for a batch built field by field the same layout up to
        its token_src (no fed tokens), packed now on the device (without waiting for it)."""
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
            tables = self.block_tables.to(torch.int32).reshape(-1)
            parts.append(torch.nn.functional.pad(tables, (0, _aligned(n * width) - n * width)))
            parts.append(torch.full((self.num_tokens,), -1, dtype=torch.int32, device=self.device))
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
        feed_dst: list[int] = (),
        feed_src: list[int] = (),
        into: torch.Tensor | None = None,
    ) -> ForwardBatch:
        """Build a batch from host lists: the new tokens of each row, its prefix length in the
        cache and its block table. `logits_rows` lists the rows that sample (their last token's
        logits are computed); by default every row does. `input_logprob_rows` want the logits
        of every new token (prompt logprobs): those come after the sampling rows' logits.
        `feed_dst` lists tokens whose ids a step still in flight samples (overlap scheduling),
        `feed_src` that step's row for each (`feed_tokens` writes them in on the device).
        `into` (int32, on `device`): where to upload the pack when it fits, a FULL graph's
        persistent pack buffer, so that planning the replay needs no copy; every batch built
        into a buffer must run before the next is built into it (the engine's steps do)."""
        if not token_ids:
            raise ValueError("a ForwardBatch needs at least one row")
        extend_lens = [len(t) for t in token_ids]
        if min(extend_lens) <= 0:
            raise ValueError("every row of a ForwardBatch needs at least one new token")
        if len(feed_dst) != len(feed_src):
            raise ValueError(
                f"feed_dst has {len(feed_dst)} entries but feed_src {len(feed_src)}: each fed "
                "token needs the in-flight row its id comes from"
            )
        mode = mode or infer_mode(extend_lens, prefix_lens)
        seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens, strict=True)]
        widths = [len(t) for t in block_tables]
        check_block_tables(widths, seq_lens, block_size)
        starts = list(itertools.accumulate(extend_lens, initial=0))
        num_tokens = starts.pop()
        rows = range(len(token_ids)) if logits_rows is None else logits_rows
        logits = [starts[r] + extend_lens[r] - 1 for r in rows]
        logits += [
            i for r in input_logprob_rows for i in range(starts[r], starts[r] + extend_lens[r])
        ]

        # The whole pack is written into one (pinned) host buffer and sent in one copy.
        n, width = len(token_ids), max(widths)
        sizes = _pack_sizes(n, num_tokens, width, len(logits), len(feed_dst))
        device = torch.device(device)
        host = torch.empty(sum(sizes), dtype=torch.int32, pin_memory=device.type == "cuda")
        words = host.numpy()
        at = list(itertools.accumulate(sizes, initial=0))  # where each part starts
        words[:4] = (n, num_tokens, width, 0)
        token_rows = words[at[1] : at[1] + 6 * num_tokens].view(np.int64)
        tables = words[at[9] : at[9] + n * width]
        token_src = words[at[11] : at[11] + num_tokens]
        write = _write_small if num_tokens <= SMALL_BATCH_TOKENS else _write_vectorized
        write(token_rows, tables, token_ids, prefix_lens, block_tables, block_size, width)
        words[at[3] : at[3] + n] = seq_lens
        words[at[5] : at[5] + n] = prefix_lens
        words[at[7] : at[7] + n] = starts
        token_src[:] = -1
        if feed_dst:
            token_src[list(feed_dst)] = feed_src
        words[at[13] : at[13] + 2 * len(logits)].view(np.int64)[:] = logits
        words[at[15] : at[15] + 2 * len(feed_dst)].view(np.int64)[:] = feed_dst
        words[at[17] : at[17] + 2 * len(feed_src)].view(np.int64)[:] = feed_src

        if (
            into is not None
            and device_key(into.device) == device_key(device)
            and into.numel() >= host.numel()
        ):
            packed = into[: host.numel()]  # a graph's own buffer: no copy before its replay
            packed.copy_(host, non_blocking=True)
        else:
            packed = host.to(device, non_blocking=True)
        # Every array as a view of the device pack, cut in one op (gaps are the alignment).
        parts = packed.split(sizes)
        token_rows = parts[1].view(torch.int64).view(3, num_tokens)
        input_ids, positions, out_cache_loc = token_rows.unbind()
        fed = feed_dst and (parts[15].view(torch.int64), parts[17].view(torch.int64))
        return cls(
            mode=mode,
            input_ids=input_ids,
            positions=positions,
            out_cache_loc=out_cache_loc,
            seq_lens=parts[3],
            prefix_lens=parts[5],
            extend_start_loc=parts[7],
            block_tables=parts[9].view(n, width),
            logits_indices=parts[13].view(torch.int64),
            token_rows=token_rows,
            packed=packed,
            seq_lens_cpu=seq_lens,
            prefix_lens_cpu=list(prefix_lens),
            request_ids=list(request_ids or []),
            lora_ids=list(lora_ids or []),
            return_input_logprobs=return_input_logprobs or bool(input_logprob_rows),
            batch_id=next(_batch_ids) if batch_id is None else batch_id,
            feed_dst=fed[0] if fed else None,
            feed_src=fed[1] if fed else None,
        )


# A batch of at most this many new tokens is laid out by plain Python loops, a larger one by
# numpy: numpy's fixed cost per call (some 20 calls a batch) is most of a small batch's build,
# and a decode step's build is host time every token waits for. Whole builds on a 2-core CPU,
# us, Python / numpy: 1 decode row 176 / 278, 64 rows 369 / 426, 128 rows 572 / 560, 256
# rows 927 / 796.
SMALL_BATCH_TOKENS = 64


def _pack_sizes(rows: int, tokens: int, width: int, logits: int, feeds: int) -> list[int]:
    """A pack's parts in int32 words, each array followed by the gap that aligns the next to
    16 bytes: header, token_rows (3 x tokens int64), seq_lens, prefix_lens, extend_start_loc,
    block_tables, token_src, logits_indices (int64), feed_dst, feed_src (int64); `pack_layout`
    gives the same offsets for the arrays up to the block tables, and the FULL decode planning
    kernel finds token_src after them (the planning kernels read those)."""
    sizes = [4]
    per_row = (rows, rows, rows, rows * width, tokens)
    for words in (6 * tokens, *per_row, 2 * logits, 2 * feeds, 2 * feeds):
        sizes += (words, _aligned(words) - words)
    return sizes


def _write_small(token_rows, tables, token_ids, prefix_lens, block_tables, block_size, width):
    """Each token's id, position and KV slot, and the padded block tables, by Python loops."""
    ids, positions, slots = [], [], []
    for row, prefix, table in zip(token_ids, prefix_lens, block_tables, strict=True):
        ids += row
        for pos in range(prefix, prefix + len(row)):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    token_rows[:] = ids + positions + slots
    flat = []
    for table in block_tables:
        flat += table
        flat += [0] * (width - len(table))
    tables[:] = flat


def _write_vectorized(token_rows, tables, token_ids, prefix_lens, block_tables, block_size, width):
    """`_write_small`'s values by numpy: row r's new tokens sit at positions prefix_r ..
    seq_r - 1, in the blocks its table lists."""
    lens = np.fromiter(map(len, token_ids), np.int64, len(token_ids))
    ends = np.cumsum(lens)
    row_of = np.repeat(np.arange(len(lens)), lens)
    positions = np.arange(ends[-1]) + np.repeat(np.asarray(prefix_lens) - (ends - lens), lens)
    widths = np.fromiter(map(len, block_tables), np.int64, len(block_tables))
    padded = tables.reshape(len(block_tables), width)
    padded[:] = 0
    # Row-major: the flat entries fill each row's first `width` columns, row after row.
    padded[np.arange(width) < widths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(block_tables), np.int32, int(widths.sum())
    )
    num_tokens = int(ends[-1])
    token_rows[:num_tokens] = np.fromiter(
        itertools.chain.from_iterable(token_ids), np.int64, num_tokens
    )
    token_rows[num_tokens : 2 * num_tokens] = positions
    slots = token_rows[2 * num_tokens :]
    slots[:] = padded[row_of, positions // block_size]
    slots *= block_size
    slots += positions % block_size


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
    feed_dst: tuple[int, ...] = ()  # overlap scheduling: tokens whose ids are still in flight
    feed_src: tuple[int, ...] = ()  # the in-flight step's row for each

    def build(self, device: torch.device | str, into: torch.Tensor | None = None) -> ForwardBatch:
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
            feed_dst=self.feed_dst,
            feed_src=self.feed_src,
            into=into,
        )


def check_block_tables(widths: list[int], seq_lens: list[int], block_size: int) -> None:
    """Raise if a row's block table (of `widths[row]` blocks) cannot hold its tokens."""
    for row, (width, seq_len) in enumerate(zip(widths, seq_lens, strict=True)):
        if width * block_size < seq_len:
            raise ValueError(
                f"row {row} has {seq_len} tokens but its block table holds {width} "
                f"blocks of {block_size}: give it at least {-(-seq_len // block_size)} blocks"
            )


ALIGN = 16  # bytes: where each array of a packed buffer starts


def to_device_packed(
    arrays: dict[str, tuple[list, torch.dtype]], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Several host lists on `device` in one copy (views of one packed buffer, each starting on
    a 16-byte boundary, so kernels see the alignment they would on their own allocation),
    without blocking the host: a step's metadata costs one copy, not eight. (A plain
    `torch.tensor(values, device="cuda")` would wait for the GPU's queued work, stalling the
    host while an earlier step runs: overlap scheduling builds batches then.) A batch's own
    pack is laid out by `ForwardBatch.build`."""
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
    return {
        name: on_device[at : at + array.nbytes].view(dtype).view(array.shape)
        for name, array, dtype, at in items
    }


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


def pack_words(rows: int, tokens: int, width: int, logits: int, feeds: int) -> int:
    """The size in int32 words of the pack `build` lays out for a batch of `rows` rows,
    `tokens` new tokens, block tables `width` wide, `logits` sampled rows and `feeds` fed ids
    (what a buffer passed as `build(into=...)` must hold for such a batch to go in place)."""
    return sum(_pack_sizes(rows, tokens, width, logits, feeds))


def token_src_at(rows: int, tokens: int, width: int) -> int:
    """Where a pack's token_src starts (int32 words): after its block tables of `rows` x
    `width` entries, aligned. The pack up to the end of token_src is what FULL decode graphs
    read (tesela/attention/triton_kernels/decode_plan.py computes the same offset)."""
    return pack_layout(rows, tokens)[-1] + _aligned(rows * width)


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
