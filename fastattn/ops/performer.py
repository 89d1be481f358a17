"""fastattn::performer_fwd / _bwd: fake kernels, autograd formula and the differentiable call."""
from __future__ import annotations

import torch
from torch import Tensor

from .common import accumulation_dtype


@torch.library.register_fake("fastattn::performer_fwd")
def _performer_fwd_fake(q, k, v, projection, kernel, causal, key_padding_mask, scale):
    accumulation = accumulation_dtype(q.dtype)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty(q.shape[:3], dtype=accumulation),
        q.new_empty((q.shape[0], q.shape[1], k.shape[2]), dtype=accumulation),  # per query head (GQA: k has Hkv)
        q.new_empty((q.shape[0], q.shape[1], projection.shape[-2], q.shape[3] + 1), dtype=accumulation),
    )


@torch.library.register_fake("fastattn::performer_bwd")
def _performer_bwd_fake(grad_out, q, k, v, projection, out, normaliser, key_stabiliser, state, kernel, causal,
                        key_padding_mask, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, projection, kernel, causal, key_padding_mask, scale = inputs
    out, normaliser, key_stabiliser, state = output
    ctx.save_for_backward(q, k, v, projection, out, normaliser, key_stabiliser, state, key_padding_mask)
    ctx.kernel, ctx.causal, ctx.scale = kernel, causal, scale
    ctx.mark_non_differentiable(normaliser, key_stabiliser, state)


def _backward(ctx, grad_out, _grad_normaliser, _grad_key_stabiliser, _grad_state):
    q, k, v, projection, out, normaliser, key_stabiliser, state, key_padding_mask = ctx.saved_tensors
    grad_q, grad_k, grad_v = torch.ops.fastattn.performer_bwd(
        grad_out.contiguous(), q, k, v, projection, out, normaliser, key_stabiliser, state, ctx.kernel, ctx.causal,
        key_padding_mask, ctx.scale,
    )
    return grad_q, grad_k, grad_v, None, None, None, None, None


torch.library.register_autograd("fastattn::performer_fwd", _backward, setup_context=_setup_context)


def performer_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *, kernel: str, causal: bool,
                        key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """Performer attention with random features ``projection`` (m, D) or (H, m, D).

    The projection receives no gradient: it is a random draw, redrawn rather than learned.
    """
    out, _, _, _ = torch.ops.fastattn.performer_fwd(q, k, v, projection, kernel, causal, key_padding_mask, scale)
    return out
