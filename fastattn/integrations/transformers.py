"""fastattn's mechanisms behind transformers' attention registry.

Importing this module registers ``"fastattn_bigbird"``, ``"fastattn_block_sparse"`` and
``"fastattn_performer"`` with default options, so any model that routes its attention through
``transformers.AttentionInterface`` (Llama, Qwen2, Mistral, GPT-2 and most decoders of transformers
4.57) runs on fastattn::

    import fastattn.integrations.transformers
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fastattn_bigbird")

``register(name, mechanism, **options)`` registers other option sets. Each name gets an attention
function and a mask builder (``transformers.AttentionMaskInterface``): the builder hands the attention
function the (B, Nk) padding mask, or None, instead of a dense (B, 1, Nq, Nk) mask.

What is supported: causal (decoder) and non-causal self-attention with padding (left or right),
grouped-query attention, and decoding over transformers' key-value cache: a single new token
(BigBird: it attends to its row's blocks only, exact thanks to the prefix-stable causal layout;
Performer: non-causal attention over the cached keys, exact) and several new tokens (chunked prefill:
the queries are placed after the cache and the causal op runs over the whole sequence). What raises a
``ValueError`` that points to ``attn_implementation="sdpa"``: custom 4-D masks (anything but causal +
padding), packed sequences, sliding windows shorter than the sequence, chunked attention, logit
softcapping, attention sinks and ``head_mask``. Attention weights are never returned (None); attention
dropout is not applied (a warning says so once).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from typing import Any, Callable

import torch
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface
from transformers import masking_utils

from .. import functional
from ..features import random_features
from ..decoding import bigbird_attention_over_cache, last_rows_of_causal, performer_attention_over_cache
from ..layout import BlockLayout, mixed_seed

__all__ = ["register", "DEFAULT_OPTIONS"]

DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "bigbird": {"block_size": 64, "num_random_blocks": 3, "seed": 0, "backend": None},
    # layout(seq_len, num_heads) -> BlockLayout for seq_len queries and keys; required.
    "block_sparse": {"layout": None, "backend": None},
    "performer": {"num_features": 256, "kernel": "softmax", "seed": 0, "backend": None},
}

SDPA_HINT = 'load the model with attn_implementation="sdpa" (or "eager") for this'

# Models of transformers 4.57 whose attention does not go through AttentionInterface: (module, table, family).
_UNROUTED_MODELS = (
    ("transformers.models.bert.modeling_bert", "BERT_SELF_ATTENTION_CLASSES", "BERT"),
    ("transformers.models.roberta.modeling_roberta", "ROBERTA_SELF_ATTENTION_CLASSES", "RoBERTa"),
    ("transformers.models.modernbert.modeling_modernbert", "MODERNBERT_ATTENTION_FUNCTION", "ModernBERT"),
)

_warned: set[str] = set()


def register(name: str, mechanism: str, **options) -> None:
    """Register fastattn ``mechanism`` ("bigbird", "block_sparse" or "performer") under ``name`` with
    transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    Options (defaults in ``DEFAULT_OPTIONS``): bigbird: ``block_size``, ``num_random_blocks``, ``seed``
    (see ``fastattn.bigbird_attention``); block_sparse: ``layout``, a callable ``(seq_len, num_heads) ->
    BlockLayout`` (prefix-stable layouts make cached decoding equal the full forward); performer:
    ``num_features``, ``kernel``, ``seed`` (each layer's features are drawn from (seed, layer index):
    nothing is added to the state_dict and every process draws the same); all: ``backend``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    if mechanism not in DEFAULT_OPTIONS:
        raise ValueError(f"mechanism: expected one of {sorted(DEFAULT_OPTIONS)}, got {mechanism!r}")
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS[mechanism]))
    if unknown:
        raise TypeError(f"options: {mechanism} takes {sorted(DEFAULT_OPTIONS[mechanism])}, got unknown {unknown}")
    options = {**DEFAULT_OPTIONS[mechanism], **options}
    if mechanism == "block_sparse" and options["layout"] is not None and not callable(options["layout"]):
        raise TypeError(f"layout: expected a callable (seq_len, num_heads) -> BlockLayout, got {options['layout']!r}")

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        return _attention(name, mechanism, options, module, query, key, value, attention_mask, dropout, scaling,
                          is_causal, kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _padding_mask_builder)
    for module_name, table, family in _UNROUTED_MODELS:
        _reject_in_unrouted_model(module_name, table, family, name)


def _reject_in_unrouted_model(module_name: str, table: str, family: str, name: str) -> None:
    """Make ``name`` raise a clear error in a model that looks its attention up in its own table
    (transformers' own error would be a bare KeyError)."""
    message = (f'attn_implementation="{name}": {family} models of transformers do not route attention through '
               f"transformers.AttentionInterface; use fastattn.models.BertModel.from_hf(model, attention=...) "
               f"(fastattn's BERT with BigBird, Linformer or Performer attention), or {SDPA_HINT}")

    class Unsupported:
        def __init__(self, *args, **kwargs):
            raise ValueError(message)

    def unsupported(*args, **kwargs):
        raise ValueError(message)

    module = importlib.import_module(module_name)
    getattr(module, table)[name] = Unsupported if table.endswith("CLASSES") else unsupported


# mask builder -------------------------------------------------------------------------------------


def _padding_mask_builder(batch_size: int, cache_position: Tensor, kv_length: int, kv_offset: int = 0,
                          mask_function: Callable = masking_utils.causal_mask_function,
                          attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """The (B, Nk) bool mask (True = attend) when some key is padding, else None, as transformers'
    flash-attention builder returns; raises where ``mask_function`` is more than causal + padding."""
    for part in _conjuncts(mask_function):
        _check_mask_part(part, kv_offset + kv_length)
    if kv_offset + kv_length != int(cache_position[-1]) + 1:
        # a pre-allocated cache hands the attention every slot, filled or not
        raise ValueError(f"fastattn attention needs the keys to end at the last query ({int(cache_position[-1]) + 1} "
                         f"positions), got {kv_offset + kv_length}: a static (pre-allocated) cache; use the default "
                         f"DynamicCache, or {SDPA_HINT}")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    return None if attention_mask.all() else attention_mask


def _conjuncts(mask_function: Callable) -> list[Callable]:
    """The mask functions that ``masking_utils.and_masks`` combined, flattened."""
    if getattr(mask_function, "__qualname__", "").startswith("and_masks."):
        parts = inspect.getclosurevars(mask_function).nonlocals["mask_functions"]
        return [conjunct for part in parts for conjunct in _conjuncts(part)]
    return [mask_function]


def _check_mask_part(part: Callable, total_length: int) -> None:
    if part is masking_utils.causal_mask_function:
        return
    qualname = getattr(part, "__qualname__", repr(part))
    captured = inspect.getclosurevars(part).nonlocals if inspect.isfunction(part) else {}
    if qualname.startswith("sliding_window_overlay."):
        if captured["sliding_window"] < total_length:
            raise ValueError(f"fastattn attention has no sliding window: the window ({captured['sliding_window']}) is "
                             f"shorter than the sequence ({total_length} tokens); {SDPA_HINT}")
        return
    if qualname.startswith("packed_sequence_mask_function."):
        # transformers infers packing from position_ids whenever no attention_mask and no cache are given;
        # positions that simply count up in each row are one sequence per row, which is plain causal.
        if (captured["packed_sequence_mask"][:, -1] != 0).any():
            raise ValueError(f"fastattn attention does not support packed sequences (position_ids that restart "
                             f"within a row); pass an attention_mask per sequence instead, or {SDPA_HINT}")
        return
    raise ValueError(f"fastattn attention supports causal and padding masks only, got the mask function {qualname} "
                     f"(chunked attention, or a model-specific mask); {SDPA_HINT}")


# attention function -------------------------------------------------------------------------------


def _attention(name, mechanism, options, module, query, key, value, attention_mask, dropout, scaling, is_causal,
               kwargs) -> tuple[Tensor, None]:
    for argument in ("head_mask", "softcap", "s_aux"):
        if kwargs.get(argument) is not None:
            raise ValueError(f"{argument}: fastattn attention ({name}) does not support it; {SDPA_HINT}")
    query_len, key_len = query.shape[2], key.shape[2]
    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None and sliding_window < key_len:
        raise ValueError(f"sliding_window: fastattn attention has no sliding window, and the window ({sliding_window}) "
                         f"is shorter than the {key_len} keys; {SDPA_HINT}")
    if dropout and name not in _warned:
        _warned.add(name)
        warnings.warn(f"{name}: fastattn attention does not apply attention dropout (dropout={dropout} is ignored)",
                      stacklevel=3)
    causal = bool(getattr(module, "is_causal", True if is_causal is None else is_causal))
    padding = _key_padding_mask(attention_mask, query, key, causal)
    out = _run(mechanism, options, module, query, key, value, padding, causal, _scale(module, query, scaling))
    return out.transpose(1, 2).contiguous(), None


def _scale(module, query: Tensor, scaling: float | None) -> float:
    if scaling is not None:
        return float(scaling)
    # GPT-2 passes no scaling: its module says how it scales
    scale = query.shape[-1] ** -0.5 if getattr(module, "scale_attn_weights", True) else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= module.layer_idx + 1
    return scale


def _key_padding_mask(attention_mask, query: Tensor, key: Tensor, causal: bool) -> Tensor | None:
    """fastattn's (B, Nk) key padding mask (True = padding) from the mask transformers passes."""
    if attention_mask is None:
        return None
    batch, query_len, key_len = query.shape[0], query.shape[2], key.shape[2]
    if not isinstance(attention_mask, Tensor):
        raise ValueError(f"attention_mask: fastattn attention takes a tensor or None, got "
                         f"{type(attention_mask).__name__}; {SDPA_HINT}")
    # bool: True = attend; integer 1 / 0 (2-D masks); float: additive, 0 = attend
    keep = attention_mask if attention_mask.dtype == torch.bool else \
        (attention_mask != 0 if attention_mask.dim() == 2 else attention_mask == 0)
    if keep.dim() == 2 and keep.shape[0] == batch and keep.shape[1] >= key_len:
        return ~keep[:, :key_len]
    if keep.dim() == 4 and keep.shape[0] == batch and keep.shape[1] == 1 and keep.shape[3] >= key_len:
        keep = keep[..., :key_len]
        if keep.shape[2] == 1:
            return ~keep[:, 0, 0]
        if keep.shape[2] == query_len:
            padding = ~keep[:, 0, -1]
            expected = ~padding[:, None, :].expand(batch, query_len, key_len)
            if causal:
                expected = expected & torch.ones(query_len, key_len, dtype=torch.bool, device=keep.device).tril(
                    key_len - query_len)
            if torch.equal(keep[:, 0], expected):
                return padding
            raise ValueError(f"attention_mask: fastattn attention takes causal + padding masks only, and this "
                             f"(B, 1, Nq, Nk) mask is something else (a custom mask); {SDPA_HINT}")
    raise ValueError(f"attention_mask: expected None, (B, Nk), (B, 1, 1, Nk) or (B, 1, Nq, Nk) with B={batch}, "
                     f"Nq={query_len}, Nk={key_len}, got shape {tuple(attention_mask.shape)}; {SDPA_HINT}")


def _run(mechanism, options, module, q, k, v, padding, causal, scale) -> Tensor:
    query_len, key_len = q.shape[2], k.shape[2]
    if query_len > key_len:
        raise ValueError(f"query: expected at most as many queries as keys, got {query_len} queries and {key_len} keys")
    backend = options["backend"]
    if mechanism == "performer":
        projection = _performer_projection(options, module, q)
        if causal:
            return performer_attention_over_cache(q, k, v, projection, kernel=options["kernel"],
                                                  key_padding_mask=padding, scale=scale, backend=backend)
        return functional.performer_attention(q, k, v, projection, kernel=options["kernel"], key_padding_mask=padding,
                                              scale=scale, backend=backend)
    if mechanism == "bigbird" and causal:
        return bigbird_attention_over_cache(q, k, v, block_size=options["block_size"],
                                            num_random_blocks=options["num_random_blocks"], seed=options["seed"],
                                            key_padding_mask=padding, scale=scale, backend=backend)
    if query_len != key_len and not causal:
        raise ValueError(f"query: block-sparse attention of transformers models needs as many queries as keys "
                         f"(self-attention), got {query_len} queries and {key_len} keys; {SDPA_HINT}")
    if mechanism == "bigbird":
        return functional.bigbird_attention(q, k, v, block_size=options["block_size"],
                                            num_random_blocks=options["num_random_blocks"], seed=options["seed"],
                                            key_padding_mask=padding, scale=scale, backend=backend)
    # over a cache: the last rows of the causal op over every position (prefix-stable layouts make them the
    # full forward's rows)
    return last_rows_of_causal(
        lambda queries: functional.block_sparse_attention(
            queries, k, v, _block_sparse_layout(options, key_len, q.shape[1]), causal=causal,
            key_padding_mask=padding, scale=scale, backend=backend),
        q, key_len)


def _block_sparse_layout(options, seq_len: int, num_heads: int) -> BlockLayout:
    if options["layout"] is None:
        raise ValueError('layout: "block_sparse" needs a layout factory: call fastattn.integrations.transformers.'
                         'register(name, "block_sparse", layout=lambda seq_len, num_heads: BlockLayout...) and load '
                         'the model with attn_implementation=name')
    return options["layout"](seq_len, num_heads)


def _performer_projection(options, module, q: Tensor) -> Tensor:
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError(f"module: fastattn Performer draws each layer's features from its layer_idx, and this "
                         f"{type(module).__name__} has none; {SDPA_HINT}")
    return _features(int(options["seed"]), int(layer), options["num_features"], q.shape[-1], q.device, q.dtype)


@functools.lru_cache(maxsize=256)
def _features(seed: int, layer: int, num_features: int, head_dim: int, device: torch.device,
              dtype: torch.dtype) -> Tensor:
    generator = torch.Generator().manual_seed(mixed_seed(seed, layer))
    return random_features(num_features, head_dim, generator=generator, dtype=dtype, device=device)


register("fastattn_bigbird", "bigbird")
register("fastattn_block_sparse", "block_sparse")
register("fastattn_performer", "performer")
