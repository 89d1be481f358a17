"""fastattn::linformer_fwd / _bwd: fake kernels, autograd formula and the differentiable call."""
from __future__ import annotations

import torch
from torch import Tensor

from .common import accumulation_dtype


@torch.library.register_fake("fastattn::linformer_fwd")
def _linformer_fwd_fake(q, k, v, proj_k, proj_v, key_padding_mask, scale):
    accumulation = accumulation_dtype(q.dtype)
    projected_shape = (q.shape[0], q.shape[1], proj_k.shape[-2], q.shape[3])
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty(q.shape[:3], dtype=accumulation),
        q.new_empty(projected_shape, dtype=accumulation),
        q.new_empty(projected_shape, dtype=accumulation),
    )


@torch.library.register_fake("fastattn::linformer_bwd")
def _linformer_bwd_fake(grad_out, q, k, v, proj_k, proj_v, out, lse, k_proj, v_proj, key_padding_mask, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, proj_k, proj_v))


def _setup_context(ctx, inputs, output):
    q, k, v, proj_k, proj_v, key_padding_mask, scale = inputs
    out, lse, k_proj, v_proj = output
    ctx.save_for_backward(q, k, v, proj_k, proj_v, out, lse, k_proj, v_proj, key_padding_mask)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse, k_proj, v_proj)


def _backward(ctx, grad_out, _grad_lse, _grad_k_proj, _grad_v_proj):
    q, k, v, proj_k, proj_v, out, lse, k_proj, v_proj, key_padding_mask = ctx.saved_tensors
    grads = torch.ops.fastattn.linformer_bwd(
        grad_out.contiguous(), q, k, v, proj_k, proj_v, out, lse, k_proj, v_proj, key_padding_mask, ctx.scale
    )
    return (*grads, None, None)


torch.library.register_autograd("fastattn::linformer_fwd", _backward, setup_context=_setup_context)


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, proj_k: Tensor, proj_v: Tensor, *,
                        key_padding_mask: Tensor | None, scale: float) -> Tensor:
    """Linformer attention with projections (kp, Nk) or (H, kp, Nk), already sliced to Nk; both receive gradients."""
    out, _, _, _ = torch.ops.fastattn.linformer_fwd(q, k, v, proj_k, proj_v, key_padding_mask, scale)
    return out
