"""fastattn::linformer_fwd / _bwd: fake kernels, autograd formula and the differentiable call.

The Triton ops (fastattn.triton_kernels.linformer) share these schemas, so they reuse the fake kernels
and the autograd formula defined here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import accumulation_dtype


def linformer_fwd_fake(q, k, v, proj_k, proj_v, key_padding_mask, scale):
    accumulation = accumulation_dtype(q.dtype)
    projected_shape = (q.shape[0], q.shape[1], proj_k.shape[-2], q.shape[3])
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty(q.shape[:3], dtype=accumulation),
        q.new_empty(projected_shape, dtype=accumulation),
        q.new_empty(projected_shape, dtype=accumulation),
    )


def linformer_bwd_fake(grad_out, q, k, v, proj_k, proj_v, out, lse, k_proj, v_proj, key_padding_mask, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, proj_k, proj_v))


def setup_context(ctx, inputs, output):
    q, k, v, proj_k, proj_v, key_padding_mask, scale = inputs
    out, lse, k_proj, v_proj = output
    ctx.save_for_backward(q, k, v, proj_k, proj_v, out, lse, k_proj, v_proj, key_padding_mask)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse, k_proj, v_proj)


def backward_through(bwd_op):
    """The autograd formula of a Linformer forward whose gradients ``bwd_op`` computes."""
    def backward(ctx, grad_out, _grad_lse, _grad_k_proj, _grad_v_proj):
        q, k, v, proj_k, proj_v, out, lse, k_proj, v_proj, key_padding_mask = ctx.saved_tensors
        grads = bwd_op(grad_out.contiguous(), q, k, v, proj_k, proj_v, out, lse, k_proj, v_proj, key_padding_mask,
                       ctx.scale)
        return (*grads, None, None)
    return backward


# The Triton ops import the helpers above even when fastattn._C (and so this schema) is missing.
if hasattr(torch.ops.fastattn, "linformer_fwd"):
    torch.library.register_fake("fastattn::linformer_fwd", linformer_fwd_fake)
    torch.library.register_fake("fastattn::linformer_bwd", linformer_bwd_fake)
    torch.library.register_autograd("fastattn::linformer_fwd", backward_through(torch.ops.fastattn.linformer_bwd),
                                    setup_context=setup_context)


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, proj_k: Tensor, proj_v: Tensor, *,
                        key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """Linformer attention with projections (kp, Nk) or (H, kp, Nk), already sliced to Nk; both receive gradients."""
    out, _, _, _ = torch.ops.fastattn.linformer_fwd(q, k, v, proj_k, proj_v, key_padding_mask, scale)
    return out
