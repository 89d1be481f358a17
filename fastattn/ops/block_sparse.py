"""fastattn::block_sparse_fwd / _bwd: fake kernels, autograd formula and the differentiable call."""
from __future__ import annotations

import torch
from torch import Tensor

from ..layout import BlockLayout
from .common import accumulation_dtype


@torch.library.register_fake("fastattn::block_sparse_fwd")
def _block_sparse_fwd_fake(q, k, v, row_offsets, col_indices, col_offsets, row_indices, block_size, causal,
                           key_padding_mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


@torch.library.register_fake("fastattn::block_sparse_bwd")
def _block_sparse_bwd_fake(grad_out, q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices,
                           block_size, causal, key_padding_mask, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, row_offsets, col_indices, col_offsets, row_indices, block_size, causal, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices, key_padding_mask)
    ctx.block_size, ctx.causal, ctx.scale = block_size, causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices, key_padding_mask = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.fastattn.block_sparse_bwd(
        grad_out.contiguous(), q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices,
        ctx.block_size, ctx.causal, key_padding_mask, ctx.scale,
    )
    return grad_q, grad_k, grad_v, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastattn::block_sparse_fwd", _backward, setup_context=_setup_context)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, causal: bool,
                           key_padding_mask: Tensor | None, scale: float) -> Tensor:
    out, _ = torch.ops.fastattn.block_sparse_fwd(
        q, k, v, *layout.csr(q.device), layout.block_size, causal, key_padding_mask, scale
    )
    return out
