"""Exact pure-PyTorch references of every fastattn op: the ground truth of the tests and benchmarks.

They follow the public signatures, materialise the full attention matrix, and run in the dtype of
their inputs (the tests evaluate them in float64). k and v may have fewer heads than q (grouped-query
attention: query head h reads kv head h // (H / Hkv)). Semantics shared with every backend are stated
in the docstrings; a row of queries that sees no key gives zeros.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import BlockLayout

__all__ = [
    "full_attention",
    "block_sparse_attention",
    "linformer_attention",
    "performer_attention",
    "performer_features",
    "RELU_KERNEL_EPSILON",
]

RELU_KERNEL_EPSILON = 1e-3


def _scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _padding_allowed(key_padding_mask: Tensor | None) -> Tensor | None:
    return None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]


def _kv_heads_of_queries(q: Tensor, *kv: Tensor) -> tuple[Tensor, ...]:
    """k, v (B, Hkv, N, D) indexed to the heads of q (grouped-query attention): query head h reads kv head
    h // (H / Hkv)."""
    if kv[0].shape[1] == q.shape[1]:
        return kv
    heads = torch.arange(q.shape[1], device=q.device) // (q.shape[1] // kv[0].shape[1])
    return tuple(t.index_select(1, heads) for t in kv)


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float) -> Tensor:
    """softmax(q k^T * scale) v over the allowed (query, key) pairs; rows with none allowed give zeros."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    allowed = allowed.expand_as(scores)
    row_sees_a_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~row_sees_a_key, 0.0)
    probs = torch.softmax(scores, dim=-1) * row_sees_a_key
    return torch.matmul(probs, v)


def _causal_allowed(query_len: int, key_len: int, device) -> Tensor:
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril()


def _and(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


def full_attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None) -> Tensor:
    """Dense softmax attention."""
    k, v = _kv_heads_of_queries(q, k, v)
    allowed = _padding_allowed(key_padding_mask)
    if causal:
        allowed = _and(allowed, _causal_allowed(q.shape[2], k.shape[2], q.device))
    return _masked_attention(q, k, v, allowed, _scale(q, scale))


def block_sparse_attention(q, k, v, layout: BlockLayout, *, causal=False, key_padding_mask=None, scale=None) -> Tensor:
    """Softmax attention restricted to the key blocks that ``layout`` lists for each query block.

    With ``causal`` the keys after each query are masked too, so listed blocks above the diagonal
    contribute nothing and the diagonal block is masked element-wise.
    """
    k, v = _kv_heads_of_queries(q, k, v)
    size = layout.block_size
    blocks = layout.to_dense().to(q.device)
    allowed = blocks.repeat_interleave(size, 1).repeat_interleave(size, 2)[:, : q.shape[2], : k.shape[2]]
    allowed = _and(allowed.unsqueeze(0), _padding_allowed(key_padding_mask))
    if causal:
        allowed = allowed & _causal_allowed(q.shape[2], k.shape[2], q.device)
    return _masked_attention(q, k, v, allowed, _scale(q, scale))


def _project_sequence(x: Tensor, projection: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, H, kp, D) with a (kp, >=N) or (H, kp, >=N) projection sliced to N."""
    projection = projection[..., : x.shape[2]]
    if projection.dim() == 2:
        return torch.einsum("pn,bhnd->bhpd", projection, x)
    return torch.einsum("hpn,bhnd->bhpd", projection, x)


def linformer_attention(q, k, v, proj_k, proj_v=None, *, key_padding_mask=None, scale=None) -> Tensor:
    """Linformer: K' = proj_k[..., :Nk] @ K and V' = proj_v[..., :Nk] @ V, then softmax(Q K'^T * scale) V'.

    Padded keys and values are zeroed before the projection; ``proj_v`` defaults to ``proj_k``.
    """
    k, v = _kv_heads_of_queries(q, k, v)
    if key_padding_mask is not None:
        keep = (~key_padding_mask)[:, None, :, None].to(k.dtype)
        k, v = k * keep, v * keep
    k_projected = _project_sequence(k, proj_k)
    v_projected = _project_sequence(v, proj_k if proj_v is None else proj_v)
    return _masked_attention(q, k_projected, v_projected, None, _scale(q, scale))


def performer_logits(x: Tensor, projection: Tensor, *, kernel: str, scale: float) -> Tensor:
    """The random-feature logits (B, H, N, m): ``w.x - |x|^2 / 2`` (``kernel="softmax"``) or ``w.x``
    (``kernel="relu"``), x scaled by ``scale ** 0.5``."""
    x = x * scale**0.5
    if projection.dim() == 2:
        wx = torch.einsum("md,bhnd->bhnm", projection.to(x.dtype), x)
    else:
        wx = torch.einsum("hmd,bhnd->bhnm", projection.to(x.dtype), x)
    return wx if kernel == "relu" else wx - 0.5 * (x * x).sum(-1, keepdim=True)


def performer_features(x: Tensor, projection: Tensor, *, kernel: str, scale: float) -> tuple[Tensor, Tensor]:
    """Random-feature logits of FAVOR+ and their per-row maxima, or the ReLU features.

    Returns ``(features, row_max)``. For ``kernel="softmax"``: ``features = exp(logits - row_max)``
    with ``logits`` those of :func:`performer_logits` and ``row_max`` the largest logit of each row
    (B, H, N); the 1/sqrt(m) of the paper cancels in the ratio and is left out. For ``kernel="relu"``:
    ``relu(w.x) + RELU_KERNEL_EPSILON`` and ``row_max`` zeros.
    """
    logits = performer_logits(x, projection, kernel=kernel, scale=scale)
    if kernel == "relu":
        return F.relu(logits) + RELU_KERNEL_EPSILON, logits.new_zeros(logits.shape[:-1])
    row_max = logits.amax(-1).detach()
    return torch.exp(logits - row_max.unsqueeze(-1)), row_max


def performer_attention(q, k, v, projection, *, kernel="softmax", causal=False, key_padding_mask=None, scale=None) -> Tensor:
    """Performer: phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1), with prefix sums over keys j <= i if causal.

    ``phi(x) = exp(w.x - |x|^2/2 - c) / sqrt(m)`` (``kernel="softmax"``, FAVOR+) or
    ``relu(w.x) + 1e-3`` (``kernel="relu"``), x scaled by ``scale ** 0.5``. The stabilising constants
    ``c`` cancel exactly: each query uses its own largest logit; keys use the largest key logit over
    all unpadded keys (non-causal) or over the keys up to the query (causal, so that later keys never
    change an earlier output). Padded keys contribute to neither numerator nor normaliser; a query whose
    normaliser is zero (it sees no key) gives zeros.
    """
    k, v = _kv_heads_of_queries(q, k, v)
    scale = _scale(q, scale)
    phi_q, _ = performer_features(q, projection, kernel=kernel, scale=scale)
    phi_k, key_max = performer_features(k, projection, kernel=kernel, scale=scale)
    keep = None if key_padding_mask is None else (~key_padding_mask)[:, None, :]
    if kernel == "softmax":
        if keep is not None:
            key_max = key_max.masked_fill(~keep, float("-inf"))
        stabiliser = key_max.cummax(-1).values if causal else key_max.amax(-1, keepdim=True).expand_as(key_max)
        stabiliser = torch.where(torch.isfinite(stabiliser), stabiliser, torch.zeros_like(stabiliser))
        key_weight = torch.exp(torch.clamp(key_max - stabiliser, max=0.0))
    else:
        stabiliser = key_max
        key_weight = torch.ones_like(key_max)
    if keep is not None:
        key_weight = key_weight * keep
    phi_k = phi_k * key_weight.unsqueeze(-1)
    if causal:
        kernel_matrix = torch.matmul(phi_q, phi_k.transpose(-1, -2))
        if kernel == "softmax":
            # entry (i, j) rescales key j from its own stabiliser to query i's: M_j - M_i <= 0 for j <= i
            kernel_matrix = kernel_matrix * torch.exp(
                torch.clamp(stabiliser.unsqueeze(-2) - stabiliser.unsqueeze(-1), max=0.0)
            )
        # masked_fill, not a product: a NaN in a later key must not reach earlier rows as 0 * NaN.
        kernel_matrix = kernel_matrix.masked_fill(~_causal_allowed(q.shape[2], k.shape[2], q.device), 0.0)
        numerator = torch.matmul(kernel_matrix, v)
        normaliser = kernel_matrix.sum(-1, keepdim=True)
    else:
        numerator = torch.matmul(phi_q, torch.matmul(phi_k.transpose(-1, -2), v))
        normaliser = torch.matmul(phi_q, phi_k.sum(-2).unsqueeze(-1))
    # A row sees a key where its normaliser is not 0, and where the mask lets it (a NaN query's normaliser is NaN:
    # NaN where it sees keys, never hidden as a zero row, and 0 where it sees none).
    sees_a_key = normaliser != 0
    if keep is not None:
        keys_seen = keep.cumsum(-1) if causal else keep.sum(-1, keepdim=True)
        sees_a_key = sees_a_key & (keys_seen[..., : q.shape[2]] > 0).unsqueeze(-1)
    return torch.where(sees_a_key, numerator / torch.where(sees_a_key, normaliser, 1.0), 0.0)
