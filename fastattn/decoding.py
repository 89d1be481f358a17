"""Causal attention of the newest tokens over a key-value cache: q holds the last Nq of Nk positions.

Each function returns exactly the last Nq rows of the causal op over all Nk positions (what a forward
over the whole sequence gives them), without recomputing the cached positions' outputs. One new token
(Nq = 1) costs what its row costs: BigBird reads its row's blocks only, which the prefix-stable causal
layout makes exact; Performer attends non-causally to the cached keys (all precede it). Several new
tokens (chunked prefill) are placed after zero queries and the causal op runs over all Nk positions.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import functional
from .layout import causal_bigbird_row_layout

__all__ = ["bigbird_attention_over_cache", "performer_attention_over_cache", "last_rows_of_causal"]


def _check_lengths(q: Tensor, k: Tensor) -> None:
    for name, value in (("q", q), ("k", k)):
        if not isinstance(value, Tensor) or value.dim() != 4:
            raise ValueError(f"{name}: expected a 4-dim tensor (B, H, N, D), got {value!r}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q: expected at most Nk = {k.shape[2]} queries (the newest positions), got {q.shape[2]}")


def last_rows_of_causal(causal_op: Callable[[Tensor], Tensor], q: Tensor, key_len: int) -> Tensor:
    """The last Nq rows of ``causal_op`` over ``key_len`` queries, q being those last Nq."""
    query_len = q.shape[2]
    if query_len == key_len:
        return causal_op(q)
    # each causal output reads keys up to its own position only, so the zero queries change nothing
    front = q.new_zeros(*q.shape[:2], key_len - query_len, q.shape[3])
    return causal_op(torch.cat([front, q], dim=2))[:, :, key_len - query_len:]


def bigbird_attention_over_cache(q, k, v, *, block_size=64, num_random_blocks=3, seed=0, key_padding_mask=None,
                                 scale=None, backend=None) -> Tensor:
    """Causal ``bigbird_attention`` rows of the last Nq of Nk positions (q: (B, H, Nq, D), k, v: (B, Hkv, Nk, D))."""
    _check_lengths(q, k)
    if q.shape[2] == 1 and k.shape[2] > 1:
        layout = causal_bigbird_row_layout(k.shape[2] - 1, block_size=block_size, num_heads=q.shape[1],
                                           num_random_blocks=num_random_blocks, seed=int(seed))
        return functional.block_sparse_attention(q, k, v, layout, key_padding_mask=key_padding_mask, scale=scale,
                                                 backend=backend)
    return last_rows_of_causal(
        lambda queries: functional.bigbird_attention(queries, k, v, block_size=block_size,
                                                     num_random_blocks=num_random_blocks, seed=seed, causal=True,
                                                     key_padding_mask=key_padding_mask, scale=scale, backend=backend),
        q, k.shape[2])


def performer_attention_over_cache(q, k, v, projection, *, kernel="softmax", key_padding_mask=None, scale=None,
                                   backend=None) -> Tensor:
    """Causal ``performer_attention`` rows of the last Nq of Nk positions (q: (B, H, Nq, D), k, v: (B, Hkv, Nk, D))."""
    _check_lengths(q, k)
    if q.shape[2] == 1:
        # every key precedes the query: the causal row is the non-causal one (same keys, same stabiliser)
        return functional.performer_attention(q, k, v, projection, kernel=kernel, key_padding_mask=key_padding_mask,
                                              scale=scale, backend=backend)
    return last_rows_of_causal(
        lambda queries: functional.performer_attention(queries, k, v, projection, kernel=kernel, causal=True,
                                                       key_padding_mask=key_padding_mask, scale=scale,
                                                       backend=backend),
        q, k.shape[2])
