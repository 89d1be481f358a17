"""Pieces the reference models share: outputs, activations, masks, sinusoidal positions."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import MultiheadAttention

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class ModelOutput(dict):
    """A dict whose entries are also attributes (``out.logits`` or ``out["logits"]``), as in transformers."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r} (fields: {list(self)})") from None


def activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def key_padding_mask(attention_mask: Tensor | None, input_ids: Tensor, name: str = "attention_mask") -> Tensor | None:
    """transformers' attention_mask (B, N), 1 = keep, 0 = padding -> bool key padding mask, True = padding."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"{name}: expected shape {tuple(input_ids.shape)} (that of the ids), got {tuple(attention_mask.shape)}"
        )
    return attention_mask == 0


def check_ids(input_ids, max_positions: int | None, name: str = "input_ids") -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        described = f"{input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor) \
            else type(input_ids).__name__
        raise ValueError(f"{name}: expected an integer (int64 or int32) tensor (batch, length), got {described}")
    if max_positions is not None and input_ids.shape[1] > max_positions:
        raise ValueError(
            f"{name}: expected at most {max_positions} positions (max_position_embeddings), got {input_ids.shape[1]}"
        )


def sinusoidal_positions(length: int, dim: int, *, offset: int = 0, device=None, dtype=None) -> Tensor:
    """The (length, dim) sinusoidal position encodings of "Attention Is All You Need"."""
    position = torch.arange(offset, offset + length, dtype=torch.float32, device=device).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim, device=device)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return encoding.to(dtype or torch.get_default_dtype())


def attention_options(options: dict | None) -> dict:
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"attention_options: expected a dict or None, got {type(options).__name__}")
    return dict(options or {})


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """BERT's and GPT-2's initialisation: weights N(0, std^2), biases 0, layer norms 1 and 0.

    Linformer's sequence projections keep their own initialisation.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MultiheadAttention):
            for weight in (module.in_proj_weight, module.q_proj_weight, module.k_proj_weight, module.v_proj_weight):
                if weight is not None:
                    nn.init.normal_(weight, std=std)
            if module.in_proj_bias is not None:
                nn.init.zeros_(module.in_proj_bias)
