"""fastattn::block_sparse_fwd / _bwd: fake kernels, autograd formula and the differentiable call.

The Triton ops (fastattn.triton_kernels.block_sparse) share these schemas, so they reuse the fake
kernels and the autograd formula defined here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..layout import BlockLayout
from .common import accumulation_dtype


def block_sparse_fwd_fake(q, k, v, row_offsets, col_indices, col_offsets, row_indices, block_size, causal,
                           key_padding_mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


def block_sparse_bwd_fake(grad_out, q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices,
                           block_size, causal, key_padding_mask, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def setup_context(ctx, inputs, output):
    q, k, v, row_offsets, col_indices, col_offsets, row_indices, block_size, causal, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices, key_padding_mask)
    ctx.block_size, ctx.causal, ctx.scale = block_size, causal, scale
    ctx.mark_non_differentiable(lse)


def backward_through(bwd_op):
    """The autograd formula of a block-sparse forward whose gradients ``bwd_op`` computes."""
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices, key_padding_mask = ctx.saved_tensors
        grad_q, grad_k, grad_v = bwd_op(
            grad_out.contiguous(), q, k, v, out, lse, row_offsets, col_indices, col_offsets, row_indices,
            ctx.block_size, ctx.causal, key_padding_mask, ctx.scale,
        )
        return grad_q, grad_k, grad_v, None, None, None, None, None, None, None, None
    return backward


# The Triton ops import the helpers above even when fastattn._C (and so this schema) is missing.
if hasattr(torch.ops.fastattn, "block_sparse_fwd"):
    torch.library.register_fake("fastattn::block_sparse_fwd", block_sparse_fwd_fake)
    torch.library.register_fake("fastattn::block_sparse_bwd", block_sparse_bwd_fake)
    torch.library.register_autograd("fastattn::block_sparse_fwd",
                                    backward_through(torch.ops.fastattn.block_sparse_bwd), setup_context=setup_context)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, causal: bool,
                           key_padding_mask: Tensor | None, scale: float) -> Tensor:
    out, _ = torch.ops.fastattn.block_sparse_fwd(
        q, k, v, *layout.csr(q.device), layout.block_size, causal, key_padding_mask, scale
    )
    return out
