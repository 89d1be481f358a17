"""Helpers of the test files only (the tolerance rule itself is fastattn.testing)."""
from __future__ import annotations

import torch

import fastattn


def describe_case(**params) -> str:
    """A readable test id such as B2-H3-N200-D64-causal."""
    parts = []
    for key, value in params.items():
        if isinstance(value, bool):
            if value:
                parts.append(key)
        elif isinstance(value, torch.dtype):
            parts.append(str(value).replace("torch.", ""))
        else:
            parts.append(f"{key}{value}")
    return "-".join(parts)


def block_sparse_case_id(case) -> str:
    """Id of a (B, H, Nq, Nk, D, block, dtype, causal, padded, per_head) block-sparse test case."""
    batch, heads, query_len, key_len, head_dim, block_size, dtype, causal, padded, per_head = case
    lengths = {"N": query_len} if query_len == key_len else {"Nq": query_len, "Nk": key_len}
    return describe_case(B=batch, H=heads, **lengths, D=head_dim, block=block_size, dtype=dtype, causal=causal,
                         padded=padded, per_head=per_head)


def random_block_layout(heads: int, query_len: int, key_len: int, block_size: int, per_head: bool, seed: int):
    """A random layout that lists each diagonal block (so causal rows see a key) and a third of the rest."""
    generator = torch.Generator().manual_seed(seed)
    query_blocks, key_blocks = -(-query_len // block_size), -(-key_len // block_size)
    mask = torch.rand(heads if per_head else 1, query_blocks, key_blocks, generator=generator) < 0.35
    diagonal = torch.arange(min(query_blocks, key_blocks))
    mask[:, diagonal, diagonal] = True
    return fastattn.BlockLayout.from_dense(mask, block_size)


def random_padding(batch: int, key_len: int, seed: int) -> torch.Tensor:
    """About a fifth of the keys padded, and the second half of batch 0's keys."""
    generator = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(batch, key_len, generator=generator) < 0.2
    mask[0, key_len // 2:] = True  # a long padded tail, whole key tiles of padding included
    return mask


class RecordingLaunch:
    """Stands in for a Triton kernel: records each launch grid and writes nothing (tests of grid limits,
    whose launches would take many minutes in the interpreter)."""

    def __init__(self, grids):
        self.grids = grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None
