"""The Triton attention backend: paged extend and split-KV decode kernels, FULL decode graphs.

`plan` turns a batch into `TritonMetadata`: the device tensors the kernels read (taken from
the batch as they are: no copies), the host-side maxima that size the launch grids, and for
decode the split count and the split-KV scratch. DECODE batches run the decode kernel; EXTEND
and MIXED batches run the extend kernel (a decode row is an extend of one token).

FULL decode graphs (`init_cuda_graph_state`, `plan_cuda_graph`, `decode_graph_prologue`) keep
the metadata in persistent buffers (`DecodeGraphState`) that the graph's first kernel rewrites
from the replayed batch's pack (one device copy before the replay), so a captured graph reads the
new batch. In that mode the split count depends only on the captured batch size and the
longest context the buffers allow, never on the lengths of the batch being run.

`forward` and the breakable runner's bound split calls (`bind_split`, `prepare_split_replay`)
run the same `BoundTritonAttention` launches through cached launchers
(triton_kernels/launcher.py); a bound call takes its tensors at capture and its batch values
once per replay.

The kernels run on CUDA, and on CPU only under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is first imported), which is how the CPU tests check them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

try:
    import triton  # noqa: F401
except ImportError as error:  # the registry imports this module only when triton is picked
    raise ImportError(
        "the triton attention backend needs the triton package: install it with "
        "`pip install triton`, or run the torch backend (--attention-backend torch)"
    ) from error

from tesela.attention.base import (
    AttentionBackend,
    AttentionLayout,
    AttentionMetadata,
    GraphSupport,
    SplitReplay,
)
from tesela.attention.triton_kernels import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    PagedAttentionShape,
)
from tesela.attention.triton_kernels.decode_attention import (
    STAGE1,
    STAGE2,
    STAGE2_OPTIONS,
    decode_config,
    decode_grids,
    num_kv_splits,
)
from tesela.attention.triton_kernels.decode_attention import batch_args as decode_batch_args
from tesela.attention.triton_kernels.decode_attention import layer_args as decode_layer_args
from tesela.attention.triton_kernels.decode_attention import shape_args as decode_shape_args
from tesela.attention.triton_kernels.decode_plan import derive_decode_plan
from tesela.attention.triton_kernels.extend_attention import (
    EXTEND,
    extend_config,
    extend_grid,
    kernels_interpreted,
    max_tiles,
    tile_args,
)
from tesela.attention.triton_kernels.extend_attention import batch_args as extend_batch_args
from tesela.attention.triton_kernels.extend_attention import layer_args as extend_layer_args
from tesela.attention.triton_kernels.extend_attention import shape_args as extend_shape_args
from tesela.attention.triton_kernels.launcher import Args, join, runtime_args
from tesela.attention.triton_kernels.mixed_plan import derive_mixed_plan
from tesela.attention.triton_kernels.store_kv import OPTIONS as STORE_OPTIONS
from tesela.attention.triton_kernels.store_kv import STORE_KV, pool_args, width_args
from tesela.attention.triton_kernels.store_kv import layer_args as store_layer_args
from tesela.core.forward_batch import (
    BatchModeError,
    ForwardBatch,
    ForwardMode,
    pack_layout,
    pack_words,
    token_src_at,
)
from tesela.core.kv_cache import DUMMY_SLOT, KVCachePool


@dataclass(frozen=True)
class TritonAttentionConfig:
    """Tuning of the Triton backend. The defaults are for Hopper; tests shrink the tiles and
    splits to exercise every loop on small inputs."""

    max_kv_splits: int = 32  # split-KV partials per (row, head) at most
    # KV tokens per split at least (each split a whole number of KV tiles). 64 rather than 128
    # made batch-1 decode steps 1-6% faster at 256-1024 cached tokens on an H200; no shape
    # measured got more than 2% slower (docs/bench-results.md, tenth session).
    min_split_len: int = 64
    programs_per_sm: int = 4  # decode programs to aim for per SM when choosing splits
    block_m: int | None = None  # extend query tile (None: per head_dim and dtype)
    block_n: int | None = None  # KV tile of both kernels (None: per head_dim and dtype)

    def __post_init__(self) -> None:
        for name in ("max_kv_splits", "min_split_len", "programs_per_sm"):
            if getattr(self, name) < 1:
                raise ValueError(f"TritonAttentionConfig.{name} must be >= 1")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(
                    f"TritonAttentionConfig.{name} must be a power of two >= 16 (tl.dot "
                    f"tiles), got {value}"
                )


@dataclass
class TritonMetadata(AttentionMetadata):
    use_decode_kernel: bool
    batch_size: int
    seq_lens: torch.Tensor  # [batch] int32
    block_tables: torch.Tensor  # [batch, max_blocks] int32
    max_seq_len: int  # longest row (in graph mode: longest the buffers allow)
    # Extend kernel only.
    prefix_lens: torch.Tensor | None = None  # [batch] int32
    extend_start_loc: torch.Tensor | None = None  # [batch] int32
    max_extend_len: int = 1
    # FULL mixed graphs only: the extend kernel's tile table (grid fixed per captured size).
    tiles: torch.Tensor | None = None  # [num_tiles, 2] int32 (row, first query); row -1: absent
    # FULL mixed graphs only: the decode rows (one new token), run by the split-KV decode kernel
    # through an entry table (row, query token); -1 = absent entry.
    decode_rows: torch.Tensor | None = None  # [entries] int32
    decode_tokens: torch.Tensor | None = None  # [entries] int32
    # Decode kernel only: split-KV partial outputs and their log2-sum-exp.
    num_kv_splits: int = 1
    partial_out: torch.Tensor | None = None  # [batch, heads, num_kv_splits, head_dim] fp32
    partial_lse: torch.Tensor | None = None  # [batch, heads, num_kv_splits] fp32


@dataclass
class DecodeGraphState:
    """Persistent buffers that FULL decode graphs read.

    Before a replay the decode batch's pack (`ForwardBatch.packed`) is copied into `raw`,
    device to device, in one op; the graph's first kernel (triton_kernels/decode_plan.py)
    writes its tokens into the static token buffers (a fed token's id from the in-flight
    step's sampled tokens, overlap scheduling), its lengths into `seq_lens` and its block
    tables into `block_tables`, and makes every row past the batch's, up to the graph's size, a
    padding row of length 1 on the dummy block. The split-KV scratch is one flat buffer: the
    graph of each batch size views the front of it with its own split count (graphs replay one
    at a time on one stream, so they can share).
    """

    max_batch_size: int
    max_blocks_per_seq: int
    max_context_len: int
    # int32 words: the replayed batch's pack (built here by the engine, whole; else copied in
    # up to its token_src), sized for the whole pack of the largest, widest batch
    raw: torch.Tensor
    seq_lens: torch.Tensor  # [max_batch_size] int32
    block_tables: torch.Tensor  # [max_batch_size, max_blocks_per_seq] int32
    partial_out: torch.Tensor  # flat fp32
    partial_lse: torch.Tensor  # flat fp32

    def load(self, batch: ForwardBatch) -> None:
        """Copy the batch's pack in, up to its token_src (no host work but one copy; none
        for a batch built into `raw`)."""
        n, width = batch.batch_size, batch.block_tables.shape[1]
        if batch.num_tokens != n:
            raise ValueError(
                f"a FULL decode graph runs one new token per row, but {batch.stamp} has "
                f"{batch.num_tokens} tokens for {n} rows: run it through the piecewise or "
                "eager path"
            )
        if n > self.max_batch_size or width > self.max_blocks_per_seq:
            raise ValueError(
                f"{batch.stamp} has {n} rows of up to {width} blocks, but the decode graph "
                f"buffers hold {self.max_batch_size} rows of {self.max_blocks_per_seq} blocks: "
                "call init_cuda_graph_state with larger limits"
            )
        pack = batch.pack()
        if pack.data_ptr() != self.raw.data_ptr():  # else built in place (`pack_buffer`)
            end = token_src_at(n, n, width) + n
            self.raw[:end].copy_(pack[:end], non_blocking=True)


@dataclass
class MixedGraphState:
    """Persistent buffers that FULL mixed graphs (any batch: extend, mixed, decode) read.

    Before a replay the batch's pack (`ForwardBatch.packed`) is copied into `raw`, device to
    device, in one op; the graph's first kernel (triton_kernels/mixed_plan.py) copies its
    tokens into the static token buffers and derives from it everything the attention kernels
    read, into `meta`, one int32 buffer: per row (R = max_rows) the sequence length, prefix
    length and first token; the decode entry table (row, query token) of the 1-token rows; the
    tile table, (row, first query) per query block of the other rows; then the block tables.
    Entries past the batch's hold -1 (absent: no program does anything for them), and rows
    past the batch's are never read. Every captured size reads the front of the shared
    tables."""

    max_rows: int
    max_blocks_per_seq: int
    max_tiles: int
    raw: torch.Tensor  # int32 words: the replayed batch's pack, up to its block tables
    # [5 * max_rows + 2 * max_tiles + max_rows * max_blocks_per_seq] int32
    meta: torch.Tensor
    partial_out: torch.Tensor  # flat fp32 split-KV scratch of the decode entries
    partial_lse: torch.Tensor  # flat fp32

    @property
    def tiles_at(self) -> int:
        return 5 * self.max_rows

    @property
    def tables_at(self) -> int:
        return self.tiles_at + 2 * self.max_tiles

    @property
    def block_tables(self) -> torch.Tensor:
        """[max_rows, max_blocks_per_seq] int32, the end of `meta`."""
        return self.meta[self.tables_at :].view(self.max_rows, self.max_blocks_per_seq)

    def segment(self, index: int) -> torch.Tensor:
        """0 seq_lens, 1 prefix_lens, 2 extend_start_loc, 3 decode rows, 4 decode tokens."""
        return self.meta[index * self.max_rows : (index + 1) * self.max_rows]

    def tiles(self, num_tiles: int) -> torch.Tensor:
        return self.meta[self.tiles_at : self.tiles_at + 2 * num_tiles].view(num_tiles, 2)

    def load(self, batch: ForwardBatch) -> None:
        """Copy the batch's pack in, up to its block tables (no host work but one copy)."""
        n, width = batch.batch_size, batch.block_tables.shape[1]
        if n > self.max_rows or width > self.max_blocks_per_seq:
            raise ValueError(
                f"{batch.stamp} has {n} rows of up to {width} blocks, but the FULL mixed graph "
                f"buffers hold {self.max_rows} rows of {self.max_blocks_per_seq} blocks: run it "
                "through the piecewise or eager path, or raise max_num_seqs / max_model_len"
            )
        end = pack_layout(n, batch.num_tokens)[-1] + n * width
        self.raw[:end].copy_(batch.pack()[:end], non_blocking=True)


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    cuda_graph_support = GraphSupport.ALWAYS
    fuses_kv_store = True  # every kernel reads the new tokens' K/V from the pool

    def __init__(
        self,
        layout: AttentionLayout,
        kv_cache: KVCachePool,
        config: TritonAttentionConfig | None = None,
    ) -> None:
        super().__init__(layout, kv_cache)
        _check_supported(layout, kv_cache)
        self.config = config or TritonAttentionConfig()
        self.shape = PagedAttentionShape(
            num_heads=layout.num_heads,
            num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim,
            page_size=kv_cache.block_size,
            scale=layout.scale,
            sliding_window=layout.sliding_window,
        )
        # Layers outside `sliding_window_layers` launch the same kernels without the window.
        self.full_shape = dataclasses.replace(self.shape, sliding_window=None)
        self.decode_config = decode_config(
            layout.head_dim, layout.dtype, self.config.max_kv_splits, self.config.block_n
        )
        self.target_programs = _target_programs(layout.device, self.config.programs_per_sm)
        self.graph_state: DecodeGraphState | None = None
        self.mixed_state: MixedGraphState | None = None
        self._mixed_templates: dict[tuple[int, bool], tuple] = {}
        self._decode_templates: dict[int, TritonMetadata] = {}
        self._store_constants, self._store_blocks = width_args(
            layout.num_kv_heads * layout.head_dim
        )
        self._pools: tuple[KVCachePool, list[Args]] | None = None  # per pool: its groups

    # Planning ---------------------------------------------------------------------------------

    def plan(self, batch: ForwardBatch) -> TritonMetadata:
        if batch.mode is ForwardMode.DECODE:
            return self._plan_decode(batch)
        return TritonMetadata(
            stamp=batch.stamp,
            use_decode_kernel=False,
            batch_size=batch.batch_size,
            seq_lens=batch.seq_lens,
            block_tables=batch.block_tables,
            max_seq_len=batch.max_seq_len,
            prefix_lens=batch.prefix_lens,
            extend_start_loc=batch.extend_start_loc,
            max_extend_len=max(batch.extend_lens_cpu),
        )

    def _plan_decode(self, batch: ForwardBatch) -> TritonMetadata:
        n, max_seq_len = batch.batch_size, batch.max_seq_len
        if batch.num_tokens != n:  # ForwardBatch refuses this label; guard the kernel anyway
            raise BatchModeError(
                f"triton decode attention runs one new token per row, but {batch.stamp} has "
                f"{batch.num_tokens} tokens: plan it as an EXTEND or MIXED batch"
            )
        splits = self.num_kv_splits(n, max_seq_len)
        layout = self.layout
        heads, dim = layout.num_heads, layout.head_dim
        device = batch.device
        return TritonMetadata(
            stamp=batch.stamp,
            use_decode_kernel=True,
            batch_size=n,
            seq_lens=batch.seq_lens,
            block_tables=batch.block_tables,
            max_seq_len=max_seq_len,
            num_kv_splits=splits,
            partial_out=torch.empty((n, heads, splits, dim), dtype=torch.float32, device=device),
            partial_lse=torch.empty((n, heads, splits), dtype=torch.float32, device=device),
        )

    def num_kv_splits(self, batch_size: int, max_seq_len: int) -> int:
        config = self.config
        return num_kv_splits(
            batch_size,
            self.layout.num_kv_heads,
            max_seq_len,
            max_kv_splits=config.max_kv_splits,
            min_split_len=config.min_split_len,
            target_programs=self.target_programs,
        )

    # FULL decode graphs -----------------------------------------------------------------------

    def init_cuda_graph_state(self, max_batch_size: int, max_blocks_per_seq: int) -> None:
        """Allocate the persistent buffers every FULL decode graph reads."""
        if max_batch_size < 1 or max_blocks_per_seq < 1:
            raise ValueError(
                f"decode graph buffers need max_batch_size >= 1 and max_blocks_per_seq >= 1, "
                f"got {max_batch_size} and {max_blocks_per_seq}"
            )
        device, layout = self.layout.device, self.layout
        max_context_len = max_blocks_per_seq * self.kv_cache.block_size
        # Scratch for the most (row, split) pairs any graph batch size launches.
        pairs = max(
            n * self.num_kv_splits(n, max_context_len) for n in range(1, max_batch_size + 1)
        )
        self._decode_templates = {}
        self.graph_state = DecodeGraphState(
            max_batch_size=max_batch_size,
            max_blocks_per_seq=max_blocks_per_seq,
            max_context_len=max_context_len,
            # Room for the whole pack of the largest batch (logits and fed ids included), so
            # the engine builds every decode batch in place (`decode_pack_buffer`).
            raw=torch.zeros(
                pack_words(
                    rows=max_batch_size,
                    tokens=max_batch_size,
                    width=max_blocks_per_seq,
                    logits=max_batch_size,
                    feeds=max_batch_size,
                ),
                dtype=torch.int32,
                device=device,
            ),
            seq_lens=torch.ones(max_batch_size, dtype=torch.int32, device=device),
            block_tables=torch.zeros(
                (max_batch_size, max_blocks_per_seq), dtype=torch.int32, device=device
            ),
            partial_out=torch.empty(
                pairs * layout.num_heads * layout.head_dim, dtype=torch.float32, device=device
            ),
            partial_lse=torch.empty(pairs * layout.num_heads, dtype=torch.float32, device=device),
        )

    def plan_cuda_graph(self, batch: ForwardBatch) -> TritonMetadata:
        """Metadata viewing the persistent buffers, after copying `batch`'s pack in (the graph's
        first kernel, `decode_graph_prologue`, writes the buffers from it on the device): the
        same call plans the warmup, the capture of each size and every replay. `batch` may
        have fewer rows than the captured size: the rows after it become padding rows."""
        self._decode_state().load(batch)
        metadata = copy.copy(self._decode_graph(batch.batch_size))  # this size's views
        metadata.stamp = batch.stamp
        return metadata

    def _decode_graph(self, n: int) -> TritonMetadata:
        """The metadata every n-row replay shares, but for its stamp: views of the persistent
        buffers and the split count, made once (slicing them anew was most of a replay's host
        time)."""
        if n not in self._decode_templates:
            state = self._decode_state()
            heads, dim = self.layout.num_heads, self.layout.head_dim
            splits = self.num_kv_splits(n, state.max_context_len)
            self._decode_templates[n] = TritonMetadata(
                stamp=None,
                use_decode_kernel=True,
                batch_size=n,
                seq_lens=state.seq_lens[:n],
                block_tables=state.block_tables[:n],
                max_seq_len=state.max_context_len,
                num_kv_splits=splits,
                partial_out=state.partial_out[: n * heads * splits * dim].view(
                    n, heads, splits, dim
                ),
                partial_lse=state.partial_lse[: n * heads * splits].view(n, heads, splits),
            )
        return self._decode_templates[n]

    def decode_graph_prologue(
        self, rows: int, token_rows: torch.Tensor, fed_tokens: torch.Tensor
    ) -> Callable[[], None]:
        """The first op of the FULL decode graph of `rows` rows: from the replayed batch's pack,
        writes its tokens into `token_rows` (the [3, max_tokens] int64 static token buffers;
        a fed token's id from `fed_tokens`, the persistent int64 buffer holding the in-flight
        step's sampled tokens), its lengths and block tables into the persistent buffers, and
        padding rows (token 0, position 0, the dummy KV slot, length 1 on the dummy block) up
        to `rows`."""
        return functools.partial(
            derive_decode_plan,
            self._decode_state(),
            token_rows,
            fed_tokens,
            rows=rows,
            dummy_block=DUMMY_SLOT // self.kv_cache.block_size,
        )

    def decode_pack_buffer(self) -> torch.Tensor | None:
        return None if self.graph_state is None else self.graph_state.raw

    def _decode_state(self) -> DecodeGraphState:
        if self.graph_state is None:
            raise RuntimeError(
                "triton attention has no decode graph buffers: call "
                "init_cuda_graph_state(max_batch_size, max_blocks_per_seq) before capture"
            )
        return self.graph_state

    # FULL mixed graphs ------------------------------------------------------------------------

    def init_mixed_graph_state(
        self, max_rows: int, max_blocks_per_seq: int, max_num_tokens: int
    ) -> None:
        """Allocate the persistent buffers every FULL mixed graph reads."""
        if min(max_rows, max_blocks_per_seq, max_num_tokens) < 1:
            raise ValueError(
                "FULL mixed graph buffers need max_rows, max_blocks_per_seq and "
                f"max_num_tokens >= 1, got {max_rows}, {max_blocks_per_seq}, {max_num_tokens}"
            )
        device, layout = self.layout.device, self.layout
        tiles = max_tiles(max_num_tokens, max_rows, self._mixed_config(1).block_m)
        max_context_len = max_blocks_per_seq * self.kv_cache.block_size
        # Split-KV scratch for the most (entry, split) pairs any captured size launches.
        pairs = max(
            e * self.num_kv_splits(e, max_context_len)
            for e in range(1, min(max_rows, max_num_tokens) + 1)
        )

        self._mixed_templates = {}
        numel = 5 * max_rows + 2 * tiles + max_rows * max_blocks_per_seq
        tables_in = pack_layout(max_rows, max_num_tokens)[-1]
        self.mixed_state = MixedGraphState(
            max_rows=max_rows,
            max_blocks_per_seq=max_blocks_per_seq,
            max_tiles=tiles,
            raw=torch.zeros(
                tables_in + max_rows * max_blocks_per_seq, dtype=torch.int32, device=device
            ),
            meta=torch.full((numel,), -1, dtype=torch.int32, device=device),
            partial_out=torch.empty(
                pairs * layout.num_heads * layout.head_dim, dtype=torch.float32, device=device
            ),
            partial_lse=torch.empty(pairs * layout.num_heads, dtype=torch.float32, device=device),
        )

    def _mixed_config(self, padded_num_tokens: int):
        # One query tile per captured size: the batch's longest row is at most its size.
        return extend_config(
            self.layout.head_dim,
            self.layout.dtype,
            padded_num_tokens,
            block_m=self.config.block_m,
            block_n=self.config.block_n,
        )

    def plan_mixed_graph(
        self, batch: ForwardBatch, padded_num_tokens: int, split_decode: bool = True
    ) -> TritonMetadata:
        """Metadata viewing the persistent buffers, after copying `batch`'s pack in (the graph's
        first kernel, `mixed_graph_prologue`, derives the rest on the device); its
        launch values depend only on `padded_num_tokens` (the captured size), `split_decode` and
        the buffers' limits, so the same call plans the warmup, the capture of each size and
        every replay. With `split_decode` the 1-token rows run the split-KV decode kernel (one
        more launch per layer); without, every row is tiled for the extend kernel."""
        state = self._mixed_state()
        if batch.num_tokens > padded_num_tokens:
            raise ValueError(f"{batch.stamp} does not fit a graph of {padded_num_tokens} tokens")
        template = self._mixed_graph(padded_num_tokens, split_decode)[0]
        state.load(batch)
        metadata = copy.copy(template)  # the views and launch values of this graph
        metadata.stamp = batch.stamp
        return metadata

    def mixed_graph_prologue(
        self, padded_num_tokens: int, split_decode: bool, token_rows: torch.Tensor
    ) -> Callable[[], None]:
        """The first op of the FULL mixed graph (`padded_num_tokens`, `split_decode`): from the
        replayed batch's pack, writes its tokens into `token_rows` (the [3, max_tokens] int64
        static token buffers), padded with token 0, position 0 and the dummy KV slot up to the
        graph's size, and derives its metadata."""
        _, block_m, num_tiles, entries = self._mixed_graph(padded_num_tokens, split_decode)
        return functools.partial(
            derive_mixed_plan,
            self._mixed_state(),
            token_rows,
            num_tiles=num_tiles,
            entries=entries,
            padded_tokens=padded_num_tokens,
            block_m=block_m,
        )

    def _mixed_state(self) -> MixedGraphState:
        if self.mixed_state is None:
            raise RuntimeError(
                "triton attention has no FULL mixed graph buffers: call "
                "init_mixed_graph_state(max_rows, max_blocks_per_seq, max_num_tokens) first"
            )
        return self.mixed_state

    def _mixed_graph(self, padded_num_tokens: int, split_decode: bool) -> tuple:
        key = (padded_num_tokens, split_decode)
        return self._mixed_templates.get(key) or self._mixed_template(*key)

    def _mixed_template(self, padded_num_tokens: int, split_decode: bool) -> tuple:
        """The metadata of one FULL mixed graph but its stamp, its query tile, tiles and decode
        entries (built once per graph: a replay only copies it, so its host cost is the
        buffers' rewrite)."""
        state = self.mixed_state
        block_m = self._mixed_config(padded_num_tokens).block_m
        num_tiles = max_tiles(padded_num_tokens, state.max_rows, block_m)
        max_context_len = state.max_blocks_per_seq * self.kv_cache.block_size
        metadata = TritonMetadata(
            stamp=None,
            use_decode_kernel=False,
            batch_size=state.max_rows,
            seq_lens=state.segment(0),
            block_tables=state.block_tables,
            max_seq_len=max_context_len,
            prefix_lens=state.segment(1),
            extend_start_loc=state.segment(2),
            max_extend_len=padded_num_tokens,
            tiles=state.tiles(num_tiles),
        )
        if split_decode:
            entries = min(state.max_rows, padded_num_tokens)
            heads, dim = self.layout.num_heads, self.layout.head_dim
            splits = self.num_kv_splits(entries, max_context_len)
            metadata.decode_rows = state.segment(3)[:entries]
            metadata.decode_tokens = state.segment(4)[:entries]
            metadata.num_kv_splits = splits
            metadata.partial_out = state.partial_out[: entries * heads * splits * dim].view(
                entries, heads, splits, dim
            )
            metadata.partial_lse = state.partial_lse[: entries * heads * splits].view(
                entries, heads, splits
            )
        entries = 0 if metadata.decode_rows is None else metadata.decode_rows.shape[0]
        graph = (metadata, block_m, num_tiles, entries)
        self._mixed_templates[padded_num_tokens, split_decode] = graph
        return graph

    # Forward ----------------------------------------------------------------------------------

    def forward(
        self, q, k, v, out, layer_id, batch, metadata: TritonMetadata, kv_stored: bool = False
    ) -> None:
        # Host-side checks and kernel launches only: the decode path allocates nothing and
        # never syncs, so it can be captured. The same launches as a bound split call.
        if metadata.use_decode_kernel and q.shape[0] != metadata.batch_size:
            raise RuntimeError(
                f"triton decode attention got {q.shape[0]} query tokens for "
                f"{metadata.batch_size} rows planned for {metadata.stamp}"
            )
        call = BoundTritonAttention(self, q, k, v, out, layer_id, kv_stored)
        call(self._split_replay(batch, metadata, k.shape[0]))

    def bind_kv_pool(self, kv_cache: KVCachePool) -> None:
        super().bind_kv_pool(kv_cache)
        self._pools = None  # drop the provisional pool's tensors

    def layer_shape(self, layer_id: int) -> PagedAttentionShape:
        # Layers outside `sliding_window_layers` launch the same kernels without the window.
        return self.shape if self.layout.window(layer_id) is not None else self.full_shape

    def bind_split(self, q, k, v, out, layer_id: int, kv_stored=False) -> BoundTritonAttention:
        return BoundTritonAttention(self, q, k, v, out, layer_id, kv_stored)

    def prepare_split_replay(self, batch, metadata: TritonMetadata) -> TritonSplitReplay:
        return self._split_replay(batch, metadata, batch.num_tokens)

    def _split_replay(self, batch, metadata: TritonMetadata, num_tokens: int) -> TritonSplitReplay:
        """The launch values every layer shares: grids, options and the batch's argument
        groups (their specialization keys computed here, once)."""
        if self._pools is None or self._pools[0] is not self.kv_cache:
            pools = zip(self.kv_cache.k_buffers, self.kv_cache.v_buffers, strict=True)
            self._pools = (self.kv_cache, [pool_args(k, v) for k, v in pools])
        replay = TritonSplitReplay(batch, metadata, num_tokens, pools=self._pools[1])
        if num_tokens > 0:
            replay.store = ((num_tokens, self._store_blocks, 1), runtime_args(batch.out_cache_loc))
        if metadata.use_decode_kernel:
            replay.decode = self._decode_launch(metadata, metadata.batch_size, None, None)
            return replay
        rows = metadata.seq_lens.shape[0]
        if rows > 0 and metadata.max_extend_len > 0:
            replay.extend = self._extend_launch(metadata, rows)
        if metadata.decode_rows is not None:
            entries = metadata.decode_rows.shape[0]
            rows, tokens = metadata.decode_rows, metadata.decode_tokens
            replay.decode = self._decode_launch(metadata, entries, rows, tokens)
        return replay

    def _extend_launch(self, metadata: TritonMetadata, rows: int) -> tuple:
        config = extend_config(
            self.layout.head_dim,
            self.layout.dtype,
            metadata.max_extend_len,
            block_m=self.config.block_m,
            block_n=self.config.block_n,
        )
        tiles = metadata.tiles
        grid = extend_grid(self.shape, config, metadata.max_extend_len, rows, tiles)
        batch = extend_batch_args(
            metadata.block_tables,
            metadata.seq_lens,
            metadata.prefix_lens,
            metadata.extend_start_loc,
            tiles,
        )
        options = (config.num_warps, config.num_stages)
        return grid, options, join(batch, tile_args(config, tiles is not None))

    def _decode_launch(self, metadata, entries: int, rows, tokens) -> tuple | None:
        if entries == 0:
            return None
        stage1, stage2 = decode_batch_args(
            metadata.block_tables,
            metadata.seq_lens,
            metadata.partial_out,
            metadata.partial_lse,
            rows,
            tokens,
            num_kv_splits=metadata.num_kv_splits,
            min_split_len=self.config.min_split_len,
            config=self.decode_config,
        )
        grids = decode_grids(self.shape, entries, metadata.num_kv_splits)
        options = (self.decode_config.num_warps, self.decode_config.num_stages)
        return grids, options, join(*stage1), join(*stage2)


@dataclass
class TritonSplitReplay(SplitReplay):
    """The launch values of one replay (or one eager call): None where nothing runs."""

    pools: list[Args] = dataclasses.field(default_factory=list)  # per layer: K/V pool group
    store: tuple | None = None  # grid, batch group
    extend: tuple | None = None  # grid, options, batch group (tiles joined)
    decode: tuple | None = None  # grids, options, stage 1 and stage 2 batch groups


class BoundTritonAttention:
    """One layer's attention launches with its tensors bound: the KV store (unless the rotary
    kernel stored K/V already: `kv_stored`), then the extend kernel and/or the split-KV decode
    kernels, through cached launchers (no JITFunction.run binding, no slicing: the grids cover
    only the real tokens and rows). The layer's argument groups are joined with its pool's once
    per pool, so a launch assembles three groups."""

    __slots__ = (
        "layer_id", "kv_stored", "layer", "constants", "pool", "store", "extend", "stage1",
        "stage2",
    )  # fmt: skip

    def __init__(
        self, backend: TritonAttentionBackend, q, k, v, out, layer_id: int, kv_stored=False
    ) -> None:
        layout, shape = backend.layout, backend.layer_shape(layer_id)
        width = layout.num_kv_heads * layout.head_dim
        if k.shape[1] != width or v.shape[1] != width:
            raise ValueError(f"k/v must be [tokens, {width}], got {tuple(k.shape)}")
        self.layer_id = layer_id
        self.kv_stored = kv_stored
        # per kernel (store, extend, stage 1, stage 2): the layer's group and the constants
        stage1, stage2 = decode_layer_args(q, out, shape)
        self.layer = (store_layer_args(k, v), extend_layer_args(q, out, shape), stage1, stage2)
        shape1, shape2 = decode_shape_args(shape, backend.decode_config, q.dtype)
        self.constants = (backend._store_constants, extend_shape_args(shape, q.dtype), shape1)
        self.stage2 = (stage2, shape2)
        self.pool = None

    def _bind_pool(self, pool: Args) -> None:
        store, extend, stage1, _ = self.layer
        self.store, self.extend, self.stage1 = (join(store, pool), join(extend, pool),
                                                join(stage1, pool))  # fmt: skip
        self.pool = pool

    def __call__(self, replay: TritonSplitReplay) -> None:
        pool = replay.pools[self.layer_id]
        if pool is not self.pool:
            self._bind_pool(pool)
        store_constants, extend_constants, stage1_constants = self.constants
        n = replay.num_tokens
        if replay.store is not None and not self.kv_stored:
            grid, batch = replay.store
            STORE_KV(grid, STORE_OPTIONS, self.store, batch, store_constants, num_tokens=n)
        if replay.extend is not None:
            grid, options, batch = replay.extend
            EXTEND(grid, options, self.extend, batch, extend_constants, num_tokens=n)
        if replay.decode is not None:
            (grid1, grid2), options, batch1, batch2 = replay.decode
            STAGE1(grid1, options, self.stage1, batch1, stage1_constants, num_tokens=n)
            layer2, constants2 = self.stage2
            STAGE2(grid2, STAGE2_OPTIONS, layer2, batch2, constants2, num_tokens=n)


def _target_programs(device: torch.device, programs_per_sm: int) -> int:
    """Decode programs that fill the device. The CPU interpreter has no SMs to fill: it asks for
    as many splits as the lengths allow, so that the CPU tests exercise the split-KV merge."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1 << 30
    return programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def _check_supported(layout: AttentionLayout, kv_cache: KVCachePool) -> None:
    """User errors: say what this backend cannot run, before any kernel is launched."""
    supported = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
    if layout.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton attention supports dtypes {supported}, not {layout.dtype}")
    pool_dtype = kv_cache.k_buffers[0].dtype if kv_cache.k_buffers else layout.dtype
    if pool_dtype != layout.dtype:
        raise ValueError(
            f"triton attention needs the KV pool in the model dtype ({layout.dtype}), got "
            f"{pool_dtype}: a quantized KV cache is not supported by these kernels"
        )
    if layout.num_kv_heads < 1 or layout.num_heads % layout.num_kv_heads:
        raise ValueError(
            f"num_heads ({layout.num_heads}) must be a multiple of num_kv_heads "
            f"({layout.num_kv_heads})"
        )
    if not 1 <= layout.head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"triton attention supports head_dim up to {MAX_HEAD_DIM}, got {layout.head_dim}: "
            "use the torch backend"
        )
    if layout.sliding_window is not None and layout.sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {layout.sliding_window}")
    if torch.device(layout.device).type != "cuda" and not kernels_interpreted():
        raise ValueError(
            f"triton attention runs on CUDA, not {layout.device} (on CPU only under the "
            "Triton interpreter: TRITON_INTERPRET=1 set before triton is imported); use the "
            "torch backend on CPU"
        )
    for buffers in (kv_cache.k_buffers, kv_cache.v_buffers):
        for pool in buffers:
            expected = (layout.num_kv_heads, layout.head_dim)
            if tuple(pool.shape[1:]) != expected or not pool.is_contiguous():
                raise ValueError(
                    f"triton attention needs contiguous KV pools of [slots, {expected[0]}, "
                    f"{expected[1]}], got {tuple(pool.shape)}"
                )
