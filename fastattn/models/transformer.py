"""The encoder-decoder Transformer of "Attention Is All You Need" on fastattn attention.

Token embeddings scaled by sqrt(d_model), sinusoidal positions, post-norm encoder and decoder stacks
(torch's ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` with their attention swapped
for :class:`fastattn.nn.MultiheadAttention`), and an output projection tied to the target embeddings.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

from ..nn import MultiheadAttention
from .common import ModelOutput, attention_options as _options, check_ids, key_padding_mask, sinusoidal_positions

__all__ = ["Transformer"]


class Transformer(nn.Module):
    """Encoder-decoder Transformer: ``forward(input_ids, decoder_input_ids, ...)`` returns ``logits``.

    ``attention`` sets the encoder self-attention; ``decoder_attention`` (default: ``attention``) the
    causal decoder self-attention, so it cannot be "linformer"; ``cross_attention`` (default "full")
    the decoder's attention to the encoder output, where queries and keys differ in length (BigBird
    needs equal lengths there). ``attention_options`` configure the layers using ``attention``;
    ``decoder_attention_options`` and ``cross_attention_options`` default to ``attention_options``
    when their mechanism is ``attention``, else to no options.
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int | None = None, d_model: int = 512, nhead: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 2048,
                 dropout: float = 0.1, *, attention: str = "full", decoder_attention: str | None = None,
                 cross_attention: str = "full", attention_options: dict | None = None,
                 decoder_attention_options: dict | None = None, cross_attention_options: dict | None = None):
        super().__init__()
        decoder_attention = attention if decoder_attention is None else decoder_attention
        if decoder_attention == "linformer":
            raise ValueError("decoder_attention: the decoder self-attention is causal and Linformer has no causal form; "
                             "pass decoder_attention='full', 'bigbird' or 'performer'")
        options = _options(attention_options)

        def options_for(mechanism: str, given: dict | None) -> dict:
            return _options(given) if given is not None else dict(options) if mechanism == attention else {}

        decoder_options = options_for(decoder_attention, decoder_attention_options)
        cross_options = options_for(cross_attention, cross_attention_options)
        self.d_model = d_model
        self.src_embeddings = nn.Embedding(src_vocab_size, d_model)
        self.tgt_embeddings = nn.Embedding(tgt_vocab_size or src_vocab_size, d_model)
        self.dropout = nn.Dropout(dropout)

        def attention_layer(mechanism: str, layer_options: dict) -> MultiheadAttention:
            return MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True, attention=mechanism,
                                      **layer_options)

        encoder_layers = []
        for _ in range(num_encoder_layers):
            layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
            layer.self_attn = attention_layer(attention, options)
            encoder_layers.append(layer)
        decoder_layers = []
        for _ in range(num_decoder_layers):
            layer = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
            layer.self_attn = attention_layer(decoder_attention, decoder_options)
            layer.multihead_attn = attention_layer(cross_attention, cross_options)
            decoder_layers.append(layer)
        self.encoder_layers = nn.ModuleList(encoder_layers)
        self.decoder_layers = nn.ModuleList(decoder_layers)
        self.output_projection = nn.Linear(d_model, self.tgt_embeddings.num_embeddings, bias=False)
        self.output_projection.weight = self.tgt_embeddings.weight
        for embeddings in (self.src_embeddings, self.tgt_embeddings):
            nn.init.normal_(embeddings.weight, std=d_model**-0.5)

    def _embed(self, embeddings: nn.Embedding, ids: Tensor) -> Tensor:
        hidden = embeddings(ids) * math.sqrt(self.d_model)
        positions = sinusoidal_positions(ids.shape[1], self.d_model, device=ids.device, dtype=hidden.dtype)
        return self.dropout(hidden + positions)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The encoder output (B, N_src, d_model); ``attention_mask`` 1 = keep, 0 = padding."""
        check_ids(input_ids, None)
        padding = key_padding_mask(attention_mask, input_ids)
        hidden = self._embed(self.src_embeddings, input_ids)
        for layer in self.encoder_layers:
            hidden = layer(hidden, src_key_padding_mask=padding)
        return hidden

    def decode(self, decoder_input_ids: Tensor, memory: Tensor, attention_mask: Tensor | None = None,
               decoder_attention_mask: Tensor | None = None) -> Tensor:
        """The decoder output (B, N_tgt, d_model), causal over the targets, attending to ``memory``."""
        check_ids(decoder_input_ids, None, "decoder_input_ids")
        memory_padding = None if attention_mask is None else attention_mask == 0
        target_padding = key_padding_mask(decoder_attention_mask, decoder_input_ids, "decoder_attention_mask")
        hidden = self._embed(self.tgt_embeddings, decoder_input_ids)
        for layer in self.decoder_layers:
            hidden = layer(hidden, memory, tgt_key_padding_mask=target_padding, memory_key_padding_mask=memory_padding,
                           tgt_is_causal=True)
        return hidden

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, attention_mask: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None) -> ModelOutput:
        """``logits`` (B, N_tgt, tgt_vocab), ``last_hidden_state`` (decoder) and ``encoder_last_hidden_state``."""
        memory = self.encode(input_ids, attention_mask)
        hidden = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)
        return ModelOutput(logits=self.output_projection(hidden), last_hidden_state=hidden,
                           encoder_last_hidden_state=memory)
