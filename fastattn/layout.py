"""Block layouts: which key blocks each query block attends to, per head, as CSR (and its transpose)."""
from __future__ import annotations

import functools
import math
import operator
import random

import torch
from torch import Tensor

__all__ = ["BlockLayout", "bigbird_layout"]


def _csr(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head CSR of a bool (h, rows, cols) mask; column lists padded to the longest head with -1."""
    counts = mask.sum(-1, dtype=torch.int32)
    offsets = torch.zeros(mask.shape[0], mask.shape[1] + 1, dtype=torch.int32)
    offsets[:, 1:] = counts.cumsum(-1)
    nnz_max = max(int(offsets[:, -1].max()), 1)
    indices = torch.full((mask.shape[0], nnz_max), -1, dtype=torch.int32)
    for head in range(mask.shape[0]):
        cols = mask[head].nonzero()[:, 1].to(torch.int32)
        indices[head, : cols.numel()] = cols
    return offsets, indices


class BlockLayout:
    """A block-sparse attention pattern: query block i attends to the key blocks listed for it.

    Stored per head as CSR (``row_offsets`` (h, nqb + 1), ``col_indices`` (h, nnz_max)) and its
    transpose (``col_offsets`` (h, nkb + 1), ``row_indices``), int32, which the backward pass reads to
    gather, for each key block, the query blocks that attend to it. ``h`` is 1 (one layout shared by
    every head) or the number of heads.
    """

    def __init__(self, mask: Tensor, block_size: int):
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor, got {_describe(mask)}")
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if mask.dim() != 3 or 0 in mask.shape:
            raise ValueError(
                f"mask: expected a non-empty bool tensor of shape (heads, query_blocks, key_blocks) or "
                f"(query_blocks, key_blocks), got shape {tuple(mask.shape)}"
            )
        self._mask = mask.detach().to("cpu", copy=True)
        self.block_size = block_size
        self.row_offsets, self.col_indices = _csr(self._mask)
        self.col_offsets, self.row_indices = _csr(self._mask.transpose(1, 2))
        self._on_device: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    @classmethod
    def from_dense(cls, mask: Tensor, block_size: int) -> "BlockLayout":
        """Layout from a bool mask of shape (h, nqb, nkb) or (nqb, nkb); h is 1 or the number of heads."""
        return cls(mask, block_size)

    @property
    def num_heads(self) -> int:
        return self._mask.shape[0]

    @property
    def num_query_blocks(self) -> int:
        return self._mask.shape[1]

    @property
    def num_key_blocks(self) -> int:
        return self._mask.shape[2]

    @property
    def nnz(self) -> int:
        """Number of (query block, key block) pairs listed, summed over heads."""
        return int(self.row_offsets[:, -1].sum())

    @property
    def density(self) -> float:
        """Fraction of the blocks listed, over all heads."""
        return self.nnz / self._mask.numel()

    def to_dense(self) -> Tensor:
        """The layout as a bool tensor (h, nqb, nkb)."""
        return self._mask.clone()

    def csr(self, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(row_offsets, col_indices, col_offsets, row_indices) on ``device``, copied once and cached."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = tuple(
                t.to(device) for t in (self.row_offsets, self.col_indices, self.col_offsets, self.row_indices)
            )
        return self._on_device[device]

    def check_fits(self, num_heads: int, query_len: int, key_len: int) -> None:
        """Raise ValueError unless this layout covers exactly these lengths and this many heads."""
        query_blocks = math.ceil(query_len / self.block_size)
        key_blocks = math.ceil(key_len / self.block_size)
        if (self.num_query_blocks, self.num_key_blocks) != (query_blocks, key_blocks):
            raise ValueError(
                f"layout: expected {query_blocks} x {key_blocks} blocks of size {self.block_size} for "
                f"Nq={query_len}, Nk={key_len}, got {self.num_query_blocks} x {self.num_key_blocks}"
            )
        if self.num_heads not in (1, num_heads):
            raise ValueError(f"layout: expected 1 or {num_heads} heads (H of q), got {self.num_heads}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockLayout):
            return NotImplemented
        return self.block_size == other.block_size and torch.equal(self._mask, other._mask)

    __hash__ = None

    def __repr__(self) -> str:
        return (
            f"BlockLayout(heads={self.num_heads}, query_blocks={self.num_query_blocks}, "
            f"key_blocks={self.num_key_blocks}, block_size={self.block_size}, density={self.density:.3f})"
        )


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"Tensor(dtype={value.dtype}, shape={tuple(value.shape)}, device={value.device})"
    return type(value).__name__


def _check_bigbird_arguments(seq_len, block_size, num_heads, num_random_blocks, seed=0) -> None:
    for name, value, low in (("seq_len", seq_len, 1), ("block_size", block_size, 1),
                             ("num_heads", num_heads, 1), ("num_random_blocks", num_random_blocks, 0)):
        # torch.SymInt: a symbolic length or head count while torch.compile or torch.export traces
        if not isinstance(value, (int, torch.SymInt)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    # The seed reaches the layout op as an int64 (fastattn::bigbird_layout_csr).
    if isinstance(seed, bool) or not hasattr(type(seed), "__index__") or not -2**63 <= operator.index(seed) < 2**63:
        raise ValueError(f"seed: expected an int in [-2**63, 2**63), got {seed!r}")


def bigbird_layout(
    seq_len: int,
    *,
    block_size: int = 64,
    num_heads: int = 1,
    num_random_blocks: int = 3,
    seed: int = 0,
    causal: bool = False,
) -> BlockLayout:
    """BigBird's ITC layout: global first and last blocks, a window of 3 blocks, random blocks per row.

    The first and last query blocks attend to every key block and every query block attends to them;
    every block attends to itself and its neighbours; each other row gets ``num_random_blocks`` blocks
    drawn from the rest, reproducibly from ``seed``, independently per head.

    ``causal=True`` is prefix-stable: query block i lists block 0, the window i - 1, i and
    ``num_random_blocks`` blocks drawn from those left of the window (all of them where there are
    fewer), drawn from (seed, head, i) alone. So a row never depends on the length: the layout of N
    tokens is the top-left corner of that of any longer sequence, and decoding with a key-value cache
    gives exactly the full forward's outputs. Layouts are cached per argument set.
    """
    _check_bigbird_arguments(seq_len, block_size, num_heads, num_random_blocks, seed)
    # Under torch.compile a length or head count may be symbolic; the BlockLayout (a Python object with
    # a dense mask) exists for one length only, so operator.index specialises to this call's value and
    # Dynamo guards on it. (bigbird_attention keeps the length symbolic: see TracedBigBirdLayout.)
    seq_len, num_heads = operator.index(seq_len), operator.index(num_heads)
    return _BIGBIRD_LAYOUTS[_cache_bigbird_layout(seq_len, block_size, num_heads, num_random_blocks,
                                                  operator.index(seed), bool(causal))]


_BIGBIRD_LAYOUTS: dict[str, BlockLayout] = {}
_BIGBIRD_CACHE_SIZE = 256


@torch._dynamo.assume_constant_result
def _cache_bigbird_layout(seq_len, block_size, num_heads, num_random_blocks, seed, causal) -> str:
    """Build the layout once into the cache and return its key.

    torch.compile runs this eagerly instead of tracing it (the layout is built with data-dependent ops
    and a torch.Generator, which Dynamo cannot trace); the compiled graph then reads the cache.
    """
    key = f"{seq_len}/{block_size}/{num_heads}/{num_random_blocks}/{seed}/{causal}"
    if key not in _BIGBIRD_LAYOUTS:
        if len(_BIGBIRD_LAYOUTS) >= _BIGBIRD_CACHE_SIZE:
            del _BIGBIRD_LAYOUTS[next(iter(_BIGBIRD_LAYOUTS))]
        _BIGBIRD_LAYOUTS[key] = _build_bigbird_layout(seq_len, block_size, num_heads, num_random_blocks, seed, causal)
    return key


@torch.library.custom_op("fastattn::bigbird_layout_csr", mutates_args=())
def _bigbird_layout_csr(seq_len: int, block_size: int, num_heads: int, num_random_blocks: int, seed: int,
                        causal: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The CSR of ``bigbird_layout(...)`` on ``device`` (copies: a custom op may not return its cache)."""
    layout = bigbird_layout(seq_len, block_size=block_size, num_heads=num_heads,
                            num_random_blocks=num_random_blocks, seed=seed, causal=causal)
    return tuple(t.clone() for t in layout.csr(device))


@_bigbird_layout_csr.register_fake
def _(seq_len, block_size, num_heads, num_random_blocks, seed, causal, device):
    blocks = (seq_len + block_size - 1) // block_size
    context = torch.library.get_ctx()
    offsets = torch.empty(num_heads, blocks + 1, dtype=torch.int32, device=device)
    return (offsets, offsets.new_empty(num_heads, context.new_dynamic_size(min=1)), torch.empty_like(offsets),
            offsets.new_empty(num_heads, context.new_dynamic_size(min=1)))


class TracedBigBirdLayout:
    """What the block-sparse ops read of a BigBird layout (``block_size`` and ``csr(device)``), for
    ``bigbird_attention`` under torch.compile.

    The CSR comes from the opaque op ``fastattn::bigbird_layout_csr``, which builds (or finds in the
    cache) the layout when the graph runs, so the length and head count may stay symbolic: one graph
    serves every length (``dynamic=True``, ``mark_dynamic``) instead of one recompilation per length.
    """

    def __init__(self, seq_len, *, block_size: int, num_heads, num_random_blocks: int, seed: int, causal: bool):
        _check_bigbird_arguments(seq_len, block_size, num_heads, num_random_blocks, seed)
        self.block_size = block_size
        self._arguments = (seq_len, block_size, num_heads, num_random_blocks, operator.index(seed), bool(causal))

    def csr(self, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return torch.ops.fastattn.bigbird_layout_csr(*self._arguments, torch.device(device))


def _build_bigbird_layout(seq_len, block_size, num_heads, num_random_blocks, seed, causal) -> BlockLayout:
    blocks = math.ceil(seq_len / block_size)
    mask = torch.zeros(num_heads, blocks, blocks, dtype=torch.bool)
    if causal:
        for head in range(num_heads):
            for row in range(blocks):
                mask[head, row, _causal_bigbird_row(row, num_random_blocks, seed, head)] = True
    else:
        _fill_bigbird_layout(mask, num_random_blocks, seed)
    return BlockLayout(mask, block_size)


def _causal_bigbird_row(row: int, num_random_blocks: int, seed: int, head: int) -> list[int]:
    """Key blocks of query block ``row`` in a causal layout: block 0, the window ``row - 1, row``, and
    ``num_random_blocks`` of the blocks 1 .. row - 2 (all of them where there are fewer).

    The draw depends on (seed, head, row) only, never on the length, so the layout of a length is the
    top-left corner of the layout of any longer length: a token's output does not depend on how many
    tokens follow, and decoding with a key-value cache is exact.
    """
    fixed = sorted({0, max(row - 1, 0), row})
    candidates = range(1, max(row - 1, 1))
    picks = random.Random(mixed_seed(seed, head, row)).sample(candidates, min(num_random_blocks, len(candidates)))
    return fixed + picks


def mixed_seed(seed: int, *values: int) -> int:
    """A well-mixed 64-bit seed from ``seed`` and ``values`` (splitmix64 steps), the same in every process."""
    state = seed & _MASK64
    for value in values:
        state = (state ^ value) * 0x9E3779B97F4A7C15 & _MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state


_MASK64 = 2**64 - 1


@functools.lru_cache(maxsize=64)
def causal_bigbird_row_layout(position: int, *, block_size: int, num_heads: int, num_random_blocks: int,
                              seed: int) -> BlockLayout:
    """The row of query ``position`` in the causal ``bigbird_layout``, as a layout of one query over the
    keys 0 .. position: (num_heads, 1, ceil((position + 1) / block_size)) blocks.

    For decoding with a key-value cache: the new token attends to its row's blocks only, with
    ``causal=False`` (no listed key lies after it), and gets exactly the output of the full causal forward.
    """
    _check_bigbird_arguments(position + 1, block_size, num_heads, num_random_blocks, seed)
    row = position // block_size
    mask = torch.zeros(num_heads, 1, row + 1, dtype=torch.bool)
    for head in range(num_heads):
        mask[head, 0, _causal_bigbird_row(row, num_random_blocks, seed, head)] = True
    return BlockLayout(mask, block_size)


def _fill_bigbird_layout(mask: Tensor, num_random_blocks: int, seed: int) -> None:
    """The non-causal layout into an empty (h, blocks, blocks) mask: the first and last blocks global,
    the window ``row - 1 .. row + 1``, random blocks drawn from all the others (one draw from ``seed``)."""
    num_heads, blocks, _ = mask.shape
    last = blocks - 1
    generator = torch.Generator().manual_seed(seed)
    for head in range(num_heads):
        for row in range(blocks):
            if row in (0, last):
                mask[head, row, :] = True
                continue
            fixed = {row - 1, row, row + 1, 0, last}
            mask[head, row, sorted(fixed)] = True
            rest = [col for col in range(blocks) if col not in fixed]
            if rest and num_random_blocks:
                picks = torch.randperm(len(rest), generator=generator)[:num_random_blocks]
                mask[head, row, [rest[i] for i in picks.tolist()]] = True
