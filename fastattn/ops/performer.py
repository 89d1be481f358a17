"""fastattn::performer_fwd / _bwd: fake kernels, autograd formula and the differentiable call.

The Triton ops (fastattn.triton_kernels.performer) share these schemas, so they reuse the fake kernels
and the autograd formula defined here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import accumulation_dtype


def performer_fwd_fake(q, k, v, projection, kernel, causal, key_padding_mask, scale):
    accumulation = accumulation_dtype(q.dtype)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty(q.shape[:3], dtype=accumulation),
        # Per query head (with grouped-query attention and a per-head projection, each query head has its own key
        # features): one per key (the running prefix maximum) when causal, else one per feature (notes/performer_spec.md).
        q.new_empty((q.shape[0], q.shape[1], k.shape[2] if causal else projection.shape[-2]), dtype=accumulation),
        q.new_empty((q.shape[0], q.shape[1], projection.shape[-2], q.shape[3] + 1), dtype=accumulation),
    )


def performer_bwd_fake(grad_out, q, k, v, projection, out, normaliser, key_stabiliser, state, kernel, causal,
                       key_padding_mask, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def setup_context(ctx, inputs, output):
    q, k, v, projection, kernel, causal, key_padding_mask, scale = inputs
    out, normaliser, key_stabiliser, state = output
    ctx.save_for_backward(q, k, v, projection, out, normaliser, key_stabiliser, state, key_padding_mask)
    ctx.kernel, ctx.causal, ctx.scale = kernel, causal, scale
    ctx.mark_non_differentiable(normaliser, key_stabiliser, state)


def backward_through(bwd_op):
    """The autograd formula of a Performer forward whose gradients ``bwd_op`` computes."""
    def backward(ctx, grad_out, _grad_normaliser, _grad_key_stabiliser, _grad_state):
        q, k, v, projection, out, normaliser, key_stabiliser, state, key_padding_mask = ctx.saved_tensors
        grad_q, grad_k, grad_v = bwd_op(
            grad_out.contiguous(), q, k, v, projection, out, normaliser, key_stabiliser, state, ctx.kernel,
            ctx.causal, key_padding_mask, ctx.scale,
        )
        return grad_q, grad_k, grad_v, None, None, None, None, None
    return backward


# The Triton ops import the helpers above even when fastattn._C (and so this schema) is missing.
if hasattr(torch.ops.fastattn, "performer_fwd"):
    torch.library.register_fake("fastattn::performer_fwd", performer_fwd_fake)
    torch.library.register_fake("fastattn::performer_bwd", performer_bwd_fake)
    torch.library.register_autograd("fastattn::performer_fwd", backward_through(torch.ops.fastattn.performer_bwd),
                                    setup_context=setup_context)


def performer_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *, kernel: str, causal: bool,
                        key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """Performer attention with random features ``projection`` (m, D) or (H, m, D).

    The projection receives no gradient: it is a random draw, redrawn rather than learned.
    """
    out, _, _, _ = torch.ops.fastattn.performer_fwd(q, k, v, projection, kernel, causal, key_padding_mask, scale)
    return out
