"""A drop-in ``torch.nn.MultiheadAttention`` whose attention is full, BigBird, Linformer or Performer.

:class:`MultiheadAttention` keeps torch's constructor, parameter names, state_dict keys and forward
signature, so ``module.load_state_dict(torch_mha.state_dict())`` works both ways (Linformer adds its
learned sequence projections as extra keys). :func:`replace_attention` swaps every
``torch.nn.MultiheadAttention`` of a model for one, keeping the weights.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional
from .decoding import bigbird_attention_over_cache
from .features import random_features
from .layout import bigbird_layout
from .reference import RELU_KERNEL_EPSILON, performer_features, performer_logits

__all__ = ["MultiheadAttention", "replace_attention", "MECHANISM_OPTIONS"]

MECHANISM_OPTIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "bigbird": {"block_size": 64, "num_random_blocks": 3, "seed": 0, "backend": None},
    "linformer": {"projected_length": 256, "max_seq_len": None, "share_kv": False, "backend": None},
    "performer": {"num_features": None, "kernel": "softmax", "feature_redraw_interval": 1000, "backend": None},
}


def _decline_torch_fast_path(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook that only has to exist: ``nn.TransformerEncoderLayer`` declines its fast path when a
    submodule has hooks. That fast path would run torch's own fused dense attention on this module's
    weights, bypassing the mechanism chosen here."""


def _require(condition: Tensor, error: type[Exception], message: str) -> None:
    """Raise ``error(message)`` unless the bool tensor ``condition`` holds.

    A Python branch on tensor data breaks ``torch.compile(fullgraph=True)`` and ``torch.export``, so
    while tracing the check becomes an assertion inside the graph: it raises ``RuntimeError(message)``
    when the compiled or exported program runs on inputs that fail it.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise error(message)


def _bool_padding(key_padding_mask: Tensor | None, what: str) -> Tensor | None:
    """A bool key padding mask (True = pad) from torch's bool or additive float (-inf = pad) form.

    ``nn.TransformerEncoder`` turns a bool ``src_key_padding_mask`` into the float form, so that one is
    read as padding; other float values are additive biases that only ``"full"`` applies.
    """
    if key_padding_mask is None or key_padding_mask.dtype == torch.bool:
        return key_padding_mask
    is_pad = torch.isneginf(key_padding_mask)
    _require(torch.all(is_pad | (key_padding_mask == 0)), ValueError,
             f"key_padding_mask: {what} supports a float mask only with values 0 (keep) and -inf (pad); "
             "other additive biases need attention='full'")
    return is_pad


def _check_causal_mask(attn_mask: Tensor, query_len: int, key_len: int, what: str) -> None:
    """The efficient mechanisms take one ``attn_mask`` only: the (L, L) causal mask of ``nn.Transformer``
    (float -inf or bool True above the diagonal, float 0 elsewhere); it means ``causal=True``."""
    message = (
        f"attn_mask: {what} supports only no mask or the causal mask (float -inf or bool True above the "
        f"diagonal, shape (L, L)); got a {attn_mask.dtype} mask of shape {tuple(attn_mask.shape)}{{}}. Use "
        f"key_padding_mask for padding, or attention='full' for arbitrary masks"
    )
    if query_len != key_len or tuple(attn_mask.shape) != (query_len, key_len):
        raise ValueError(message.format(f" for {query_len} queries and {key_len} keys"))
    above = torch.ones(query_len, key_len, dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        is_causal = torch.all(attn_mask == above)
    else:
        is_causal = torch.all((torch.isneginf(attn_mask) == above) & ((attn_mask == 0) | above))
    _require(is_causal, ValueError, message.format(" that is not causal"))


class MultiheadAttention(nn.Module):
    """Drop-in replacement of ``torch.nn.MultiheadAttention`` with a choice of attention mechanism.

    The constructor, parameters (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/
    ``v_proj_weight`` when kdim/vdim differ, ``in_proj_bias``, ``out_proj``, ``bias_k``, ``bias_v``)
    and ``forward`` are torch's. ``attention`` picks the mechanism; its options:

    - ``"full"``: dense softmax attention, torch's semantics for every ``attn_mask`` and dropout.
    - ``"bigbird"``: ``block_size=64``, ``num_random_blocks=3``, ``seed=0`` (see
      ``fastattn.bigbird_attention``). Needs Nq == Nk, so no ``add_bias_kv``/``add_zero_attn``.
    - ``"linformer"``: ``projected_length=256`` (kp), ``max_seq_len`` (required), ``share_kv=False``.
      Adds the learned parameters ``proj_k`` (and ``proj_v`` unless ``share_kv``) of shape
      ``(kp, max_seq_len)``, shared by all heads; they are extra state_dict keys, so loading a
      torch state_dict into this module needs ``strict=False`` (or the keys added) and the reverse
      direction needs them dropped. Not causal: a causal mask raises ``ValueError``.
    - ``"performer"``: ``num_features`` (default ``int(D * ln D)``), ``kernel="softmax"`` or ``"relu"``,
      ``feature_redraw_interval=1000``: the (m, D) buffer ``projection`` (not saved in the state_dict)
      is redrawn with ``fastattn.random_features`` every that many training forwards (None: never),
      from a seed drawn at construction, so replicas of one model redraw identically.
    - every efficient mechanism: ``backend`` (None = automatic), passed to the fastattn op.

    ``attn_mask``: ``"full"`` accepts anything torch accepts, and like torch drops it for the
    ``is_causal=True`` hint when neither a padding mask nor the weights need it. The efficient
    mechanisms accept only no mask or the causal mask of ``nn.Transformer.generate_square_subsequent_mask``
    (float -inf or bool True above the diagonal), or ``is_causal=True``, mapped to ``causal=True``; any
    other mask raises ``ValueError``. ``key_padding_mask``: bool (True = pad) or float (-inf = pad;
    ``"full"`` also takes other additive values); integer masks raise ``TypeError``, as in torch. No
    Python branch reads mask data, so ``torch.compile(fullgraph=True)`` and ``torch.export`` work; the
    checks on mask values become assertions in the graph there (see ``_require``).

    ``need_weights=True`` (torch's default) also returns the mechanism's effective attention weights,
    computed only on request, shape (B, Nq, S) averaged over heads or (B, H, Nq, S):

    - full: the softmax weights (S = Nk);
    - bigbird: the softmax over the keys the block layout (and causal/padding masks) allows (S = Nk);
    - linformer: the softmax over the kp projected keys (S = kp);
    - performer: the normalised kernel matrix ``phi(q) phi(k)^T / normaliser`` (S = Nk).

    Dropout on the attention weights is applied exactly for ``"full"``; the efficient mechanisms do
    not apply it (a warning says so once). Rows that see no key give zeros (torch gives NaN).
    """

    _TORCH_ARGUMENTS = ("dropout", "bias", "add_bias_kv", "add_zero_attn", "kdim", "vdim", "batch_first")

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 attention: str = "full", **attention_options):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                f"embed_dim, num_heads: expected positive ints with embed_dim divisible by num_heads, got "
                f"embed_dim={embed_dim}, num_heads={num_heads}"
            )
        if attention not in MECHANISM_OPTIONS:
            raise ValueError(f"attention: expected one of {tuple(MECHANISM_OPTIONS)}, got {attention!r}")
        unknown = sorted(set(attention_options) - set(MECHANISM_OPTIONS[attention]))
        if unknown:
            raise TypeError(
                f"attention_options: {attention!r} attention accepts {sorted(MECHANISM_OPTIONS[attention])}, "
                f"got unexpected {unknown}"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = add_zero_attn
        self.attention = attention
        self.attention_options = {**MECHANISM_OPTIONS[attention], **attention_options}

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._init_mechanism(factory)
        self._reset_parameters()
        self.register_forward_pre_hook(_decline_torch_fast_path, with_kwargs=True)

    def _init_mechanism(self, factory: dict) -> None:
        options = self.attention_options
        if self.attention != "full" and self.dropout > 0:
            warnings.warn(
                f"fastattn.nn.MultiheadAttention: {self.attention} attention does not apply attention dropout "
                f"(dropout={self.dropout} is ignored; only attention='full' applies it)",
                stacklevel=3,
            )
        if self.attention == "bigbird" and (self.bias_k is not None or self.add_zero_attn):
            raise ValueError(
                "add_bias_kv, add_zero_attn: BigBird attention needs as many keys as queries, and these append keys; "
                "use attention='full', 'linformer' or 'performer' with them"
            )
        if self.attention == "linformer":
            max_seq_len, projected_length = options["max_seq_len"], options["projected_length"]
            for name, value in (("max_seq_len", max_seq_len), ("projected_length", projected_length)):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"{name}: linformer attention needs a positive int, got {value!r}")
            self.proj_k = nn.Parameter(torch.empty(projected_length, max_seq_len, **factory))
            if options["share_kv"]:
                self.register_parameter("proj_v", None)
            else:
                self.proj_v = nn.Parameter(torch.empty(projected_length, max_seq_len, **factory))
        if self.attention == "performer":
            if options["num_features"] is None:
                options["num_features"] = max(1, int(self.head_dim * math.log(self.head_dim)))
            if options["kernel"] not in functional.PERFORMER_KERNELS:
                raise ValueError(f"kernel: expected one of {functional.PERFORMER_KERNELS}, got {options['kernel']!r}")
            interval = options["feature_redraw_interval"]
            if interval is not None and (not isinstance(interval, int) or isinstance(interval, bool) or interval < 1):
                raise ValueError(f"feature_redraw_interval: expected a positive int or None, got {interval!r}")
            self._feature_seed = int(torch.randint(0, 2**62, ()).item())
            self._feature_draws = 0
            self._training_forwards = 0
            self.register_buffer("projection", self._draw_features(factory["device"]), persistent=False)

    def _draw_features(self, device) -> Tensor:
        generator = torch.Generator().manual_seed(self._feature_seed + self._feature_draws)
        self._feature_draws += 1
        return random_features(self.attention_options["num_features"], self.head_dim, generator=generator,
                               dtype=torch.float32, device=device)

    def redraw_features(self) -> None:
        """Draw a new Performer projection (in place, so optimisers and DDP keep their references)."""
        with torch.no_grad():
            self.projection.copy_(self._draw_features(self.projection.device))

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)
        if self.attention == "linformer":
            std = self.attention_options["projected_length"] ** -0.5
            nn.init.normal_(self.proj_k, std=std)
            if self.proj_v is not None:
                nn.init.normal_(self.proj_v, std=std)

    @classmethod
    def from_torch(cls, mha: nn.Module, attention: str = "full", **attention_options) -> "MultiheadAttention":
        """The same layer (configuration and weights, on the same device and dtype) with ``attention``.

        ``mha`` is a ``torch.nn.MultiheadAttention`` or a fastattn one (to switch mechanisms). Linformer's
        learned projections are kept when both layers have them with the same shape; otherwise they are
        dropped (leaving Linformer) or freshly initialised (entering it, or on a new shape), with a warning
        when ``mha`` is a fastattn layer being re-targeted.
        """
        if not isinstance(mha, (nn.MultiheadAttention, MultiheadAttention)):
            raise TypeError(f"mha: expected a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        reference = mha.out_proj.weight
        module = cls(
            mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
            batch_first=mha.batch_first, device=reference.device, dtype=reference.dtype,
            attention=attention, **attention_options,
        )
        state = mha.state_dict()
        ours = module.state_dict()
        projections = {name for name in ("proj_k", "proj_v") if name in state or name in ours}
        kept = {name for name in projections if name in state and name in ours and state[name].shape == ours[name].shape}
        dropped = sorted(name for name in projections - kept if name in state)
        fresh = sorted(name for name in projections - kept if name in ours)
        if isinstance(mha, MultiheadAttention) and (dropped or fresh):
            warnings.warn(
                f"fastattn.nn.MultiheadAttention.from_torch: {getattr(mha, 'attention', 'torch')} -> {attention} attention: "
                + "; ".join(part for part in (
                    f"drops the learned Linformer projections {dropped}" if dropped else "",
                    f"initialises the Linformer projections {fresh} randomly" if fresh else "") if part),
                stacklevel=2,
            )
        state = {name: value for name, value in state.items() if name not in dropped}
        missing, unexpected = module.load_state_dict(state, strict=False)
        if unexpected or set(missing) - set(fresh):
            raise ValueError(f"mha: state_dict does not match (missing {missing}, unexpected {unexpected})")
        module.train(mha.training)
        return module

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.attention_options.items())
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"attention={self.attention!r}" + (f", {options}" if options else ""))

    # projections -------------------------------------------------------------------------------

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, E) inputs -> q, k, v (B, L, E) after the input projections."""
        e = self.embed_dim
        biases = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.split(e)
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.split(e)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        if self._qkv_same_embed_dim and query is key and key is value:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge_heads(self, x: Tensor) -> Tensor:
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.embed_dim)

    # forward -----------------------------------------------------------------------------------

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """torch's forward: (L, B, E) inputs, or (B, L, E) with ``batch_first``, or unbatched (L, E).

        Nested tensors (B, ragged L, E), which ``nn.TransformerEncoder`` passes on its nested-tensor path,
        are taken as well: padded, attended with the padding masked, and returned nested.
        """
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query, key, value: expected 3-D (batched) or 2-D (unbatched) tensors, got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        output, weights = self._attend_batch_first(query, key, value, key_padding_mask, need_weights, attn_mask,
                                                   average_attn_weights, is_causal)
        if not batched:
            return output.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            output = output.transpose(0, 1)
        return output, weights

    def _forward_nested(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        if not (query.is_nested and key.is_nested and value.is_nested) or query.layout != torch.strided:
            raise ValueError(
                "query, key, value: expected all three nested (torch.strided layout) or none, got "
                f"is_nested {query.is_nested}, {key.is_nested}, {value.is_nested} and layout {query.layout}"
            )
        if not self.batch_first:
            raise ValueError("query: nested tensors are (batch, ragged length, embed): they need batch_first=True")
        if key_padding_mask is not None or attn_mask is not None or need_weights:
            raise ValueError(
                "key_padding_mask, attn_mask, need_weights: with nested tensors the lengths are the padding; pass "
                "need_weights=False and no masks (is_causal is allowed), as nn.TransformerEncoderLayer does"
            )

        def padded(x: Tensor) -> tuple[Tensor, Tensor, list[int]]:
            lengths = [piece.shape[0] for piece in x.unbind()]
            dense = x.to_padded_tensor(0.0)
            padding = torch.arange(dense.shape[1], device=dense.device)[None, :] >= torch.tensor(
                lengths, device=dense.device)[:, None]
            return dense, padding, lengths

        query_dense, _, query_lengths = padded(query)
        key_dense, key_padding, _ = padded(key)
        value_dense = key_dense if value is key else padded(value)[0]
        query_dense = key_dense if query is key else query_dense
        output, _ = self._attend_batch_first(query_dense, key_dense, value_dense, key_padding, False, None, True,
                                             is_causal)
        pieces = [output[i, :length] for i, length in enumerate(query_lengths)]
        return torch.nested.as_nested_tensor(pieces, layout=torch.strided), None

    def _attend_batch_first(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                            is_causal):
        batch, query_len, _ = query.shape
        if query.shape[-1] != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"query, key, value: expected feature sizes ({self.embed_dim}, {self.kdim}, {self.vdim}), got "
                f"({query.shape[-1]}, {key.shape[-1]}, {value.shape[-1]})"
            )
        if key.shape[:2] != value.shape[:2] or key.shape[0] != batch:
            raise ValueError(
                f"key, value: expected the same batch and length as each other and batch {batch} of query, got "
                f"shapes {tuple(key.shape)} and {tuple(value.shape)} (batch first)"
            )
        key_len = key.shape[1]
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            # torch rejects other dtypes too: an integer mask would otherwise be added as a bias of 0 and 1
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(f"{name}: expected a bool or floating-point tensor, got dtype {mask.dtype}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, key_len):
            raise ValueError(
                f"key_padding_mask: expected shape (batch, key length) = ({batch}, {key_len}), got "
                f"{tuple(key_padding_mask.shape)}"
            )
        if self.attention == "full":
            # torch's rule: the is_causal hint replaces the mask when nothing else needs the mask's values
            if is_causal and attn_mask is not None and key_padding_mask is None and not need_weights:
                attn_mask = None
            causal = is_causal and attn_mask is None
        else:
            if attn_mask is not None:
                _check_causal_mask(attn_mask, query_len, key_len, f"{self.attention} attention")
            causal = is_causal or attn_mask is not None
            attn_mask = None
        if causal and self.attention == "linformer":
            raise ValueError(
                "attn_mask, is_causal: Linformer attention has no causal form (projecting along the sequence mixes "
                "future keys into every row); use 'full', 'bigbird' or 'performer' for causal attention"
            )

        q, k, v = self._in_projection(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
            attn_mask, key_padding_mask = self._extend_masks(attn_mask, key_padding_mask)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, self.num_heads, 1, self.head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(batch, self.num_heads, 1, self.head_dim)], dim=2)
            attn_mask, key_padding_mask = self._extend_masks(attn_mask, key_padding_mask)
        if causal and k.shape[2] != query_len:
            raise ValueError(
                f"attn_mask, is_causal: causal attention needs as many keys as queries, got {query_len} queries and "
                f"{k.shape[2]} keys (add_bias_kv/add_zero_attn append keys)"
            )

        if self.attention == "full":
            out, weights = self._full(q, k, v, key_padding_mask, attn_mask, causal, need_weights)
        else:
            padding = _bool_padding(key_padding_mask, f"{self.attention} attention")
            out = getattr(self, f"_{self.attention}")(q, k, v, padding, causal)
            weights = getattr(self, f"_{self.attention}_weights")(q, k, padding, causal) if need_weights else None
        output = self.out_proj(self._merge_heads(out))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return output, weights

    @staticmethod
    def _extend_masks(attn_mask: Tensor | None, key_padding_mask: Tensor | None):
        """Masks for one more key appended (never masked), as torch pads them."""
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
        return attn_mask, key_padding_mask

    # mechanisms --------------------------------------------------------------------------------

    def _full(self, q, k, v, key_padding_mask, attn_mask, causal, need_weights):
        dropout = self.dropout if self.training else 0.0
        bool_padding = key_padding_mask is None or key_padding_mask.dtype == torch.bool
        if attn_mask is None and bool_padding and not need_weights and dropout == 0:
            return functional.full_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask), None
        bias = self._additive_bias(q, k, key_padding_mask, attn_mask, causal)
        sees_a_key = None if bias is None else ~torch.isneginf(bias).all(dim=-1, keepdim=True)
        if sees_a_key is not None:
            bias = bias.masked_fill(~sees_a_key, 0.0)  # rows that see no key: zeros, not softmax's NaN
        if not need_weights and dropout == 0:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return (out if sees_a_key is None else torch.where(sees_a_key, out, 0.0)), None
        scores = torch.matmul(q * self.head_dim**-0.5, k.transpose(-1, -2))
        if bias is not None:
            scores = scores + bias
        weights = torch.softmax(scores, dim=-1)
        if sees_a_key is not None:
            weights = torch.where(sees_a_key, weights, 0.0)
        out = torch.matmul(F.dropout(weights, p=dropout) if dropout > 0 else weights, v)
        return out, weights if need_weights else None

    def _additive_bias(self, q, k, key_padding_mask, attn_mask, causal) -> Tensor | None:
        """Sum of torch's masks as an additive float bias broadcastable to (B, H, Nq, Nk)."""
        batch, heads, query_len, _ = q.shape
        key_len = k.shape[2]
        bias = None

        def as_float(mask: Tensor) -> Tensor:
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
            return mask.to(q.dtype)

        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (query_len, key_len):
                bias = as_float(attn_mask)
            elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (batch * heads, query_len, key_len):
                bias = as_float(attn_mask).view(batch, heads, query_len, key_len)
            else:
                raise ValueError(
                    f"attn_mask: expected shape ({query_len}, {key_len}) or ({batch * heads}, {query_len}, {key_len}), "
                    f"got {tuple(attn_mask.shape)}"
                )
        elif causal:
            bias = as_float(torch.ones(query_len, key_len, dtype=torch.bool, device=q.device).triu(1))
        if key_padding_mask is not None:
            padding = as_float(key_padding_mask)[:, None, None, :]
            bias = padding if bias is None else bias + padding
        return bias

    def _bigbird_arguments(self) -> dict:
        options = self.attention_options
        return {"block_size": options["block_size"], "num_random_blocks": options["num_random_blocks"],
                "seed": options["seed"]}

    def _bigbird(self, q, k, v, padding, causal):
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"key: BigBird attention needs as many keys as queries, got {q.shape[2]} queries and {k.shape[2]} keys"
            )
        return functional.bigbird_attention(q, k, v, causal=causal, key_padding_mask=padding,
                                            backend=self.attention_options["backend"], **self._bigbird_arguments())

    def _bigbird_weights(self, q, k, padding, causal):
        layout = bigbird_layout(q.shape[2], num_heads=self.num_heads, causal=causal, **self._bigbird_arguments())
        size = layout.block_size
        allowed = layout.to_dense().to(q.device).repeat_interleave(size, 1).repeat_interleave(size, 2)
        allowed = allowed[:, : q.shape[2], : k.shape[2]].unsqueeze(0)
        if causal:
            allowed = allowed & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if padding is not None:
            allowed = allowed & ~padding[:, None, None, :]
        return _masked_softmax(torch.matmul(q * self.head_dim**-0.5, k.transpose(-1, -2)), allowed)

    def _linformer_projections(self, key_len: int) -> tuple[Tensor, Tensor]:
        max_seq_len = self.attention_options["max_seq_len"]
        if key_len > max_seq_len:
            raise ValueError(f"key: Linformer attention was built for max_seq_len={max_seq_len}, got {key_len} keys")
        return self.proj_k, self.proj_k if self.proj_v is None else self.proj_v

    def _linformer(self, q, k, v, padding, causal):
        proj_k, proj_v = self._linformer_projections(k.shape[2])
        return functional.linformer_attention(q, k, v, proj_k.to(q.dtype), proj_v.to(q.dtype), key_padding_mask=padding,
                                              backend=self.attention_options["backend"])

    def _linformer_weights(self, q, k, padding, causal):
        proj_k, _ = self._linformer_projections(k.shape[2])
        if padding is not None:
            k = k * (~padding)[:, None, :, None].to(k.dtype)
        projected = torch.einsum("pn,bhnd->bhpd", proj_k[:, : k.shape[2]].to(q.dtype), k)
        return torch.softmax(torch.matmul(q * self.head_dim**-0.5, projected.transpose(-1, -2)), dim=-1)

    def _performer_projection(self) -> Tensor:
        interval = self.attention_options["feature_redraw_interval"]
        if self.training and interval is not None:
            if self._training_forwards and self._training_forwards % interval == 0:
                self.redraw_features()
            self._training_forwards += 1
        return self.projection

    def _performer(self, q, k, v, padding, causal):
        projection = self._performer_projection().to(q.dtype)
        return functional.performer_attention(q, k, v, projection, kernel=self.attention_options["kernel"],
                                              causal=causal, key_padding_mask=padding,
                                              backend=self.attention_options["backend"])

    def _performer_weights(self, q, k, padding, causal):
        projection = self.projection.to(q.dtype)
        kernel = self.attention_options["kernel"]
        scale = self.head_dim**-0.5
        phi_q, _ = performer_features(q, projection, kernel=kernel, scale=scale)
        phi_k, key_max = performer_features(k, projection, kernel=kernel, scale=scale)
        keep = None if padding is None else (~padding)[:, None, :]
        if keep is not None:
            key_max = key_max.masked_fill(~keep, float("-inf"))
        if kernel == "softmax":
            reference = key_max.cummax(-1).values if causal else key_max.amax(-1, keepdim=True).expand_as(key_max)
            reference = torch.where(torch.isfinite(reference), reference, torch.zeros_like(reference))
        else:
            reference = torch.zeros_like(key_max)
        # phi_k is relative to each key's own maximum; rescale every key to the stabiliser of the query row
        # (the running maximum up to the query if causal): the same constants as the fastattn ops use
        key_offset = torch.where(torch.isfinite(key_max), key_max, torch.zeros_like(key_max)) if kernel == "softmax" \
            else torch.zeros_like(key_max)
        rescale = torch.exp(torch.clamp(key_offset.unsqueeze(-2) - reference.unsqueeze(-1), max=0.0))
        kernel_matrix = torch.matmul(phi_q, phi_k.transpose(-1, -2)) * rescale
        allowed = torch.ones_like(kernel_matrix, dtype=torch.bool)
        if causal:
            allowed = allowed & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if keep is not None:
            allowed = allowed & keep.unsqueeze(-2)
        kernel_matrix = kernel_matrix * allowed
        normaliser = kernel_matrix.sum(-1, keepdim=True)
        return torch.where(normaliser > 0, kernel_matrix / torch.where(normaliser > 0, normaliser, 1.0), 0.0)

    # incremental decoding ----------------------------------------------------------------------

    def decode(self, x: Tensor, state: dict | None = None, key_padding_mask: Tensor | None = None) -> tuple[Tensor, dict]:
        """Causal self-attention of new tokens ``x`` (B, T, E), given the ``state`` of the tokens before them.

        ``state=None`` starts a sequence. Returns the output (B, T, E) and the state to pass with the
        next tokens. ``key_padding_mask`` (bool, True = padding) covers every token so far, these
        included: (B, past + T); padding inside the prompt (a left-padded batch) is supported, new
        tokens after the prompt must not be padding. Full attention and BigBird keep a key-value cache
        (BigBird: a new token attends to its row's blocks only; the prefix-stable causal layout makes
        this the causal forward's output); causal Performer keeps its running sums (fp32
        ``sum_j phi(k_j) v_j^T`` and ``sum_j phi(k_j)`` relative to the running per-feature key maxima, the
        causal ops' stabilisers), so each new token costs the same whatever the length, and the outputs
        equal the causal forward's. Linformer has no
        incremental form. The first call (the prompt) runs the causal op.
        """
        if self.attention not in ("full", "bigbird", "performer"):
            raise ValueError(f"attention: incremental decoding supports 'full', 'bigbird' and 'performer', "
                             f"not {self.attention!r}")
        if self.bias_k is not None or self.add_zero_attn or not self._qkv_same_embed_dim:
            raise ValueError("decode: needs plain self-attention (no add_bias_kv, add_zero_attn, kdim or vdim)")
        if key_padding_mask is not None:
            self._check_decode_padding(key_padding_mask, x, state)
        q, k, v = (self._heads(t) for t in self._in_projection(x, x, x))
        if self.attention == "performer":
            out, state = self._performer_decode(q, k, v, state, key_padding_mask)
        elif state is None:
            out = functional.full_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask) \
                if self.attention == "full" else \
                functional.bigbird_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask,
                                             backend=self.attention_options["backend"], **self._bigbird_arguments())
            state = {"key": k, "value": v}
        else:
            keys = torch.cat([state["key"], k], dim=2)
            values = torch.cat([state["value"], v], dim=2)
            if self.attention == "full":
                allowed = torch.ones(q.shape[2], keys.shape[2], dtype=torch.bool, device=q.device).tril(
                    keys.shape[2] - q.shape[2])
                if key_padding_mask is not None:
                    allowed = allowed & ~key_padding_mask[:, None, None, :]
                out = _masked_softmax(torch.matmul(q * self.head_dim**-0.5, keys.transpose(-1, -2)), allowed)
                out = torch.matmul(out, values)
            else:
                out = bigbird_attention_over_cache(q, keys, values, key_padding_mask=key_padding_mask,
                                                   backend=self.attention_options["backend"], **self._bigbird_arguments())
            state = {"key": keys, "value": values}
        return self.out_proj(self._merge_heads(out)), state

    @staticmethod
    def _check_decode_padding(key_padding_mask, x: Tensor, state: dict | None) -> None:
        new = x.shape[1]
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool \
                or key_padding_mask.dim() != 2 or key_padding_mask.shape[0] != x.shape[0] \
                or key_padding_mask.shape[1] < new:
            raise ValueError(f"key_padding_mask: expected a bool tensor (B, past + T) with B={x.shape[0]}, T={new}, "
                             f"got {key_padding_mask!r}")
        if state is None and key_padding_mask.shape[1] != new:
            raise ValueError(f"key_padding_mask: expected ({x.shape[0]}, {new}) for the prompt, "
                             f"got {tuple(key_padding_mask.shape)}")
        if state is not None and "key" in state and key_padding_mask.shape[1] != state["key"].shape[2] + new:
            raise ValueError(f"key_padding_mask: expected ({x.shape[0]}, {state['key'].shape[2] + new}) (past + T), "
                             f"got {tuple(key_padding_mask.shape)}")
        if state is not None and key_padding_mask[:, -new:].any():
            raise ValueError("key_padding_mask: only the prompt may hold padding; the new tokens must not")

    def _performer_decode(self, q, k, v, state, key_padding_mask):
        # The causal ops' stabilisers: per feature, the running maximum s_f of the key logits; keys weigh
        # exp(l_f - s_f), a query exp(a_f - max a) with a_f = (l_f - max l) + (s_f - max s), so that no
        # normaliser underflows. relu: plain features (s = 0).
        projection = self.projection.to(q.dtype)
        kernel = self.attention_options["kernel"]
        scale = self.head_dim**-0.5
        accumulate = torch.float64 if q.dtype == torch.float64 else torch.float32
        key_logits = performer_logits(k, projection, kernel=kernel, scale=scale).to(accumulate)
        values = v.to(accumulate)
        if kernel == "relu":
            key_logits = F.relu(key_logits) + RELU_KERNEL_EPSILON

        def key_weights(logits, stabiliser):
            return logits if kernel == "relu" else torch.exp(logits - stabiliser)

        if state is None:
            # the prompt: outputs from the causal op, the state in closed form (padded keys weigh 0)
            out = functional.performer_attention(q, k, v, projection, kernel=kernel, causal=True,
                                                 key_padding_mask=key_padding_mask,
                                                 backend=self.attention_options["backend"])
            keep = torch.ones(key_logits.shape[:-1], dtype=torch.bool, device=q.device) if key_padding_mask is None \
                else (~key_padding_mask)[:, None, :].expand(key_logits.shape[:-1])
            stabiliser = key_logits.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(-2)
            stabiliser = torch.where(torch.isfinite(stabiliser), stabiliser, torch.zeros_like(stabiliser))
            if kernel == "relu":
                stabiliser = torch.zeros_like(stabiliser)
            weights = key_weights(key_logits, stabiliser.unsqueeze(-2)).masked_fill(~keep.unsqueeze(-1), 0.0)
            return out, {"kv": torch.einsum("bhnm,bhnd->bhmd", weights, values), "normaliser": weights.sum(-2),
                         "stabiliser": stabiliser}
        query_logits = performer_logits(q, projection, kernel=kernel, scale=scale).to(accumulate)
        kv, normaliser, stabiliser = state["kv"], state["normaliser"], state["stabiliser"]
        outputs = []
        for t in range(q.shape[2]):
            if kernel == "relu":
                weights, query_weights = key_logits[:, :, t], F.relu(query_logits[:, :, t]) + RELU_KERNEL_EPSILON
            else:
                new_stabiliser = torch.maximum(stabiliser, key_logits[:, :, t])
                decay = torch.exp(stabiliser - new_stabiliser)
                kv, normaliser, stabiliser = kv * decay.unsqueeze(-1), normaliser * decay, new_stabiliser
                weights = key_weights(key_logits[:, :, t], stabiliser)
                shifted = query_logits[:, :, t] - query_logits[:, :, t].amax(-1, keepdim=True)
                shifted = shifted + (stabiliser - stabiliser.amax(-1, keepdim=True))
                query_weights = torch.exp(shifted - shifted.amax(-1, keepdim=True))
            kv = kv + weights.unsqueeze(-1) * values[:, :, t].unsqueeze(-2)
            normaliser = normaliser + weights
            numerator = torch.einsum("bhm,bhmd->bhd", query_weights, kv)
            denominator = (query_weights * normaliser).sum(-1, keepdim=True)
            outputs.append(torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator, 1.0), 0.0))
        out = torch.stack(outputs, dim=2).to(q.dtype)
        return out, {"kv": kv, "normaliser": normaliser, "stabiliser": stabiliser}


def _masked_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over the allowed entries; rows with none allowed give zeros."""
    allowed = allowed.expand_as(scores)
    sees_a_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~sees_a_key, 0.0)
    return torch.softmax(scores, dim=-1) * sees_a_key


def replace_attention(model: nn.Module, attention: str = "full", **attention_options) -> int:
    """Swap every ``torch.nn.MultiheadAttention`` inside ``model`` for :class:`MultiheadAttention`.

    Layers already swapped are re-targeted to ``attention`` (see :meth:`MultiheadAttention.from_torch`
    for what happens to Linformer's projections), so a model switches mechanisms without being rebuilt.
    Weights, configuration, device, dtype and train/eval mode are kept. Returns the number of layers
    swapped. The fast path of ``nn.TransformerEncoderLayer`` is declined by the swapped module itself
    (see ``_decline_torch_fast_path``). ``nn.TransformerEncoder`` stacks found here get
    ``use_nested_tensor = False``: on their nested-tensor path every swapped layer would pad and unpad
    its input again (stacks built later around swapped layers keep that path, which works the same).
    """
    if isinstance(model, (nn.MultiheadAttention, MultiheadAttention)):
        raise TypeError("model: got a MultiheadAttention itself; use fastattn.nn.MultiheadAttention.from_torch(model)")
    replacements: dict[int, MultiheadAttention] = {}  # a layer shared by several parents stays shared
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.MultiheadAttention, MultiheadAttention)):
                if id(child) not in replacements:
                    replacements[id(child)] = MultiheadAttention.from_torch(child, attention=attention,
                                                                            **attention_options)
                setattr(parent, name, replacements[id(child)])
    swapped = len(replacements)
    if swapped:
        for module in model.modules():
            if isinstance(module, nn.TransformerEncoder):
                module.use_nested_tensor = False
    return swapped
