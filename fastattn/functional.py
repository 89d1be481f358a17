"""The public ops: validate the inputs, pick a backend, call its differentiable op.

Every function takes q (B, H, Nq, D), k and v (B, Hkv, Nk, D) with H % Hkv == 0 (grouped-query
attention: query head h reads kv head h // (H / Hkv)) and returns (B, H, Nq, D) in the input dtype.
``key_padding_mask`` is bool (B, Nk) with True marking padding. ``scale`` defaults to D ** -0.5.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .layout import BlockLayout, TracedBigBirdLayout, bigbird_layout

__all__ = [
    "full_attention",
    "block_sparse_attention",
    "bigbird_attention",
    "linformer_attention",
    "performer_attention",
]

PERFORMER_KERNELS = ("softmax", "relu")


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"Tensor(dtype={value.dtype}, shape={tuple(value.shape)}, device={value.device})"
    return f"{type(value).__name__} {value!r}"


def _check_tensor(name: str, value, rank: int) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {_describe(value)}")
    if value.dim() != rank:
        raise ValueError(f"{name}: expected {rank} dims (B, H, N, D), got shape {tuple(value.shape)}")


def _check_inputs(q, k, v, *, causal: bool, key_padding_mask, scale) -> tuple[Tensor, Tensor, Tensor, float]:
    """Check the arguments every op shares; returns q, k, v with a unit last stride and the scale."""
    for name, value in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, value, 4)
    if not q.is_floating_point():
        raise TypeError(f"q: expected a floating-point tensor, got dtype {q.dtype}")
    for name, value in (("k", k), ("v", v)):
        if value.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (that of q), got {value.dtype}")
        if value.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (that of q), got {value.device}")
    batch, heads, query_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k: expected shape ({batch}, Hkv, Nk, {head_dim}) to match q, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if 0 in q.shape or k.shape[2] == 0:
        raise ValueError(f"q, k: expected non-empty tensors, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ValueError(f"k: expected Hkv heads dividing H={heads} (the heads of q; grouped-query attention), "
                         f"got Hkv={k.shape[1]} in shape {tuple(k.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {_describe(causal)}")
    if causal and query_len != k.shape[2]:
        raise ValueError(f"causal: expected Nq == Nk, got Nq={query_len} and Nk={k.shape[2]}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected a bool tensor (True = padding), got {_describe(key_padding_mask)}")
        if tuple(key_padding_mask.shape) != (batch, k.shape[2]):
            raise ValueError(
                f"key_padding_mask: expected shape (B, Nk) = ({batch}, {k.shape[2]}), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: expected device {q.device} (that of q), got {key_padding_mask.device}")
    if scale is None:
        scale = head_dim**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale: expected a positive finite float or None, got {_describe(scale)}")
    unit_stride = tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return (*unit_stride, float(scale))


def _kv_for(chosen: backends.Backend, mechanism: str, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """k and v as ``chosen`` reads them: as given where its kernels read grouped-query heads natively,
    else repeated to H heads (query head h reads kv head h // (H / Hkv); autograd sums each group's gradients)."""
    group = q.shape[1] // k.shape[1]
    if group == 1 or mechanism in chosen.gqa_mechanisms:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _padding_mask(key_padding_mask: Tensor | None) -> Tensor | None:
    return None if key_padding_mask is None else key_padding_mask.contiguous()


def full_attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None) -> Tensor:
    """Dense softmax attention through ``scaled_dot_product_attention`` (FlashAttention where available).

    Unlike plain SDPA, a query that sees no key (all padding) gives zeros, not NaN.
    """
    q, k, v, scale = _check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    grouped = k.shape[1] != q.shape[1]
    nan = _nan_rows(q, k, causal, key_padding_mask)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=grouped) + nan
    allowed = ~key_padding_mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    sees_a_key = allowed.any(dim=-1, keepdim=True)
    # Padded keys are ignored and rows that see no key reach nothing, even where they hold NaN or inf:
    # scaled_dot_product_attention adds the mask to the scores (NaN + -inf is NaN) and multiplies zero weights by
    # the values. masked_fill, so that their gradients are exactly 0 too.
    padded = key_padding_mask[:, None, :, None]
    q = q.masked_fill(~sees_a_key, 0.0)
    k, v = k.masked_fill(padded, 0.0), v.masked_fill(padded, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~sees_a_key, scale=scale, enable_gqa=grouped)
    return torch.where(sees_a_key, out + nan, 0.0)


def _nan_rows(q: Tensor, k: Tensor, causal: bool, key_padding_mask: Tensor | None) -> Tensor:
    """NaN (B, H, Nq, 1) for the query rows that hold a NaN or read a key that does, else 0.

    torch's CPU scaled_dot_product_attention gives zeros for a row whose scores are all NaN (a NaN
    query, or NaN in every key the row reads); NaN must reach the outputs it touches. O(N * D).
    """
    nan_key = torch.isnan(k).any(dim=-1).repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, Nk)
    if key_padding_mask is not None:
        nan_key = nan_key & ~key_padding_mask[:, None, :]
    reads_nan = nan_key.cumsum(dim=-1) > 0 if causal else nan_key.any(dim=-1, keepdim=True)
    return q.sum(dim=-1, keepdim=True) * 0 + torch.where(reads_nan, float("nan"), 0.0).unsqueeze(-1).to(q.dtype)


def block_sparse_attention(q, k, v, layout, *, causal=False, key_padding_mask=None, scale=None, backend=None) -> Tensor:
    """Softmax attention where query block i attends to the key blocks ``layout`` lists for it.

    ``layout`` is a :class:`BlockLayout` with ceil(Nq / block_size) x ceil(Nk / block_size) blocks and
    1 or H heads; lengths need not be multiples of the block size. With ``causal`` listed blocks above
    the diagonal are skipped and the diagonal block is masked element-wise.
    """
    q, k, v, scale = _check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a fastattn.BlockLayout, got {_describe(layout)}")
    layout.check_fits(q.shape[1], q.shape[2], k.shape[2])
    return _block_sparse(q, k, v, layout, causal, key_padding_mask, scale, backend)


def _block_sparse(q, k, v, layout, causal, key_padding_mask, scale, backend) -> Tensor:
    chosen = backends.select("block_sparse", q, backend, block_size=layout.block_size, causal=causal)
    k, v = _kv_for(chosen, "block_sparse", q, k, v)
    return chosen.implementation("block_sparse")(
        q, k, v, layout, causal=causal, key_padding_mask=_padding_mask(key_padding_mask), scale=scale
    )


def bigbird_attention(q, k, v, *, block_size=64, num_random_blocks=3, seed=0, causal=False,
                      key_padding_mask=None, scale=None, backend=None) -> Tensor:
    """BigBird attention: ``block_sparse_attention`` with ``bigbird_layout(N, num_heads=H, ...)``.

    The layout (global first and last blocks, a window of 3, random blocks drawn per head from
    ``seed``; with ``causal`` prefix-stable: block 0, the window i - 1, i and random blocks left of it,
    drawn from (seed, head, i) alone) is built for Nq == Nk and cached per argument set. Under
    torch.compile the length may be symbolic (one graph for every length).
    """
    # the layout is built from q's shape: check the tensors first, so that errors name them, not num_heads
    _check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"k: BigBird expects Nk == Nq = {q.shape[2]}, got Nk={k.shape[2]}")
    arguments = dict(block_size=block_size, num_heads=q.shape[1], num_random_blocks=num_random_blocks, seed=seed,
                     causal=causal)
    if torch.compiler.is_compiling():
        # The layout fits q by construction; building it inside the graph keeps N (and H) symbolic.
        q, k, v, scale = _check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        return _block_sparse(q, k, v, TracedBigBirdLayout(q.shape[2], **arguments), causal, key_padding_mask,
                             scale, backend)
    return block_sparse_attention(q, k, v, bigbird_layout(q.shape[2], **arguments), causal=causal,
                                  key_padding_mask=key_padding_mask, scale=scale, backend=backend)


def _check_projection(name: str, projection, q: Tensor, *, expected: str, size_dim: int, size: int, size_name: str) -> None:
    """A (rows, cols) or (H, rows, cols) matrix whose dimension ``size_dim`` (-1 or -2 of the last two) must match."""
    if not isinstance(projection, Tensor):
        raise TypeError(f"{name}: expected a Tensor of shape {expected}, got {_describe(projection)}")
    if not projection.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {projection.dtype}")
    if projection.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} (that of q), got {projection.device}")
    heads = q.shape[1]
    if projection.dim() not in (2, 3) or (projection.dim() == 3 and projection.shape[0] != heads):
        raise ValueError(f"{name}: expected shape {expected} with H={heads}, got {tuple(projection.shape)}")
    if projection.shape[-2] == 0:
        raise ValueError(f"{name}: expected at least one row, got shape {tuple(projection.shape)}")
    actual = projection.shape[size_dim]
    if (size_dim == -1 and actual < size) or (size_dim == -2 and actual != size):
        relation = ">=" if size_dim == -1 else "=="
        raise ValueError(f"{name}: expected {size_name} {relation} {size}, got shape {tuple(projection.shape)}")


def linformer_attention(q, k, v, proj_k, proj_v=None, *, key_padding_mask=None, scale=None, backend=None) -> Tensor:
    """Linformer attention: keys and values projected along the sequence (Nk -> kp), then softmax attention.

    ``proj_k`` is (kp, N) or (H, kp, N) with N >= Nk (sliced to Nk); ``proj_v`` likewise, defaulting to
    ``proj_k``. Padded keys are zeroed before the projection. The projections receive gradients.
    There is no causal Linformer: projecting along the sequence mixes future keys into every row.
    """
    q, k, v, scale = _check_inputs(q, k, v, causal=False, key_padding_mask=key_padding_mask, scale=scale)
    key_len = k.shape[2]
    _check_projection("proj_k", proj_k, q, expected="(kp, N) or (H, kp, N)", size_dim=-1, size=key_len, size_name="N")
    if proj_v is None:
        proj_v = proj_k
    else:
        _check_projection("proj_v", proj_v, q, expected="(kp, N) or (H, kp, N)", size_dim=-1, size=key_len, size_name="N")
        if proj_v.shape[-2] != proj_k.shape[-2]:
            raise ValueError(f"proj_v: expected kp = {proj_k.shape[-2]} (that of proj_k), got shape {tuple(proj_v.shape)}")
    for name, projection in (("proj_k", proj_k), ("proj_v", proj_v)):
        if projection.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (that of q), got {projection.dtype}")
    chosen = backends.select("linformer", q, backend)
    k, v = _kv_for(chosen, "linformer", q, k, v)
    return chosen.implementation("linformer")(
        q, k, v, proj_k[..., :key_len], proj_v[..., :key_len], key_padding_mask=_padding_mask(key_padding_mask), scale=scale
    )


def performer_attention(q, k, v, projection, *, kernel="softmax", causal=False, key_padding_mask=None, scale=None,
                        backend=None) -> Tensor:
    """Performer attention with random features ``projection`` (m, D) or (H, m, D).

    ``kernel="softmax"`` uses FAVOR+ positive features ``exp(w.x - |x|^2/2 - c) / sqrt(m)``,
    ``kernel="relu"`` uses ``relu(w.x) + 1e-3``; x is scaled by ``scale ** 0.5``. ``causal`` uses
    prefix sums over keys j <= i. Running sums are float32 (float64 for float64 inputs). The
    projection receives no gradient: it is a random draw (see ``fastattn.random_features``), redrawn
    rather than learned.
    """
    q, k, v, scale = _check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    _check_projection("projection", projection, q, expected="(m, D) or (H, m, D)", size_dim=-1,
                      size=q.shape[-1], size_name="D")
    if projection.shape[-1] != q.shape[-1]:
        raise ValueError(f"projection: expected D = {q.shape[-1]} (head dim of q), got shape {tuple(projection.shape)}")
    if kernel not in PERFORMER_KERNELS:
        raise ValueError(f"kernel: expected one of {PERFORMER_KERNELS}, got {kernel!r}")
    chosen = backends.select("performer", q, backend, kernel=kernel, causal=causal, features=projection.shape[-2])
    k, v = _kv_for(chosen, "performer", q, k, v)
    return chosen.implementation("performer")(
        q, k, v, projection.detach(), kernel=kernel, causal=causal, key_padding_mask=_padding_mask(key_padding_mask),
        scale=scale,
    )
