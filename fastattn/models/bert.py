"""BERT (Devlin et al.) on fastattn attention: BertModel and BertForPreTraining (MLM + NSP heads).

Same architecture and forward conventions as transformers' BERT with absolute positions
(``input_ids``, ``attention_mask`` with 1 = keep, ``token_type_ids``, ``position_ids``), so
``from_hf`` loads a transformers model and, with ``attention="full"``, gives its outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import MultiheadAttention
from .common import ModelOutput, activation, attention_options as _options, check_ids, init_weights, key_padding_mask

__all__ = ["BertModel", "BertForPreTraining"]


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size, hidden_size, max_position_embeddings, type_vocab_size, layer_norm_eps, dropout):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None, position_ids: Tensor | None) -> Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
                      + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.norm(embeddings))


class BertLayer(nn.Module):
    """Post-norm encoder layer: attention, add & norm, feed-forward, add & norm."""

    def __init__(self, hidden_size, num_heads, intermediate_size, dropout, attention_dropout, layer_norm_eps,
                 hidden_act, attention, options):
        super().__init__()
        self.attention = MultiheadAttention(hidden_size, num_heads, dropout=attention_dropout, batch_first=True,
                                            attention=attention, **options)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.output = nn.Linear(intermediate_size, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.hidden_act = hidden_act

    def forward(self, hidden: Tensor, padding: Tensor | None) -> Tensor:
        attended, _ = self.attention(hidden, hidden, hidden, key_padding_mask=padding, need_weights=False)
        hidden = self.attention_norm(hidden + self.dropout(attended))
        feed_forward = self.output(activation(self.hidden_act)(self.intermediate(hidden)))
        return self.output_norm(hidden + self.dropout(feed_forward))


class BertModel(nn.Module):
    """BERT encoder (+ pooler): ``forward`` returns ``last_hidden_state`` (B, N, hidden) and ``pooler_output``.

    ``attention`` ("full", "bigbird", "linformer", "performer") and ``attention_options`` configure
    every self-attention layer (see :class:`fastattn.nn.MultiheadAttention`).
    """

    def __init__(self, vocab_size: int = 30522, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_attention_heads: int = 12, intermediate_size: int = 3072, max_position_embeddings: int = 512,
                 type_vocab_size: int = 2, hidden_dropout_prob: float = 0.1, attention_probs_dropout_prob: float = 0.1,
                 layer_norm_eps: float = 1e-12, hidden_act: str = "gelu", add_pooling_layer: bool = True, *,
                 attention: str = "full", attention_options: dict | None = None):
        super().__init__()
        activation(hidden_act)
        options = _options(attention_options)
        self.max_position_embeddings = max_position_embeddings
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
                                         layer_norm_eps, hidden_dropout_prob)
        self.layers = nn.ModuleList(
            BertLayer(hidden_size, num_attention_heads, intermediate_size, hidden_dropout_prob,
                      attention_probs_dropout_prob, layer_norm_eps, hidden_act, attention, options)
            for _ in range(num_hidden_layers)
        )
        self.pooler = nn.Linear(hidden_size, hidden_size) if add_pooling_layer else None
        init_weights(self)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None) -> ModelOutput:
        check_ids(input_ids, self.max_position_embeddings)
        padding = key_padding_mask(attention_mask, input_ids)
        hidden = self.embeddings(input_ids, token_type_ids, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, padding)
        pooled = None if self.pooler is None else torch.tanh(self.pooler(hidden[:, 0]))
        return ModelOutput(last_hidden_state=hidden, pooler_output=pooled)

    @classmethod
    def from_hf(cls, hf_model, attention: str = "full", **attention_options) -> "BertModel":
        """A copy of a transformers ``BertModel`` (or the ``bert`` of a ``BertForPreTraining``) with ``attention``."""
        from transformers import BertForPreTraining as HFBertForPreTraining
        from transformers import BertModel as HFBertModel

        if isinstance(hf_model, HFBertForPreTraining):
            hf_model = hf_model.bert
        if not isinstance(hf_model, HFBertModel):
            raise TypeError(
                f"hf_model: expected a transformers BertModel or BertForPreTraining, got {type(hf_model).__name__}"
            )
        model = cls(**_config_arguments(hf_model.config), add_pooling_layer=hf_model.pooler is not None,
                    attention=attention, attention_options=attention_options)
        model.load_state_dict(_bert_state_dict(hf_model.state_dict(), model), strict=True)
        return model.to(hf_model.device, hf_model.dtype).train(hf_model.training)


class BertForPreTraining(nn.Module):
    """BERT with the masked-LM head (decoder tied to the word embeddings) and the next-sentence head.

    ``forward`` returns ``prediction_logits`` (B, N, vocab), ``seq_relationship_logits`` (B, 2),
    ``last_hidden_state`` and, given ``labels`` (-100 = ignored) and/or ``next_sentence_label``, ``loss``.
    """

    def __init__(self, vocab_size: int = 30522, hidden_size: int = 768, *, hidden_act: str = "gelu",
                 layer_norm_eps: float = 1e-12, attention: str = "full", attention_options: dict | None = None,
                 **bert_arguments):
        super().__init__()
        self.bert = BertModel(vocab_size, hidden_size, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
                              attention=attention, attention_options=attention_options, **bert_arguments)
        self.transform = nn.Linear(hidden_size, hidden_size)
        self.transform_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.hidden_act = hidden_act
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size))
        self.seq_relationship = nn.Linear(hidden_size, 2)
        init_weights(self.seq_relationship)
        init_weights(self.transform)
        init_weights(self.transform_norm)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, labels: Tensor | None = None,
                next_sentence_label: Tensor | None = None) -> ModelOutput:
        outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        hidden = self.transform_norm(activation(self.hidden_act)(self.transform(outputs.last_hidden_state)))
        prediction_logits = F.linear(hidden, self.bert.embeddings.word_embeddings.weight, self.decoder_bias)
        if outputs.pooler_output is None:
            raise ValueError("BertForPreTraining: the next-sentence head needs the pooler (add_pooling_layer=True)")
        seq_relationship_logits = self.seq_relationship(outputs.pooler_output)
        result = ModelOutput(prediction_logits=prediction_logits, seq_relationship_logits=seq_relationship_logits,
                             last_hidden_state=outputs.last_hidden_state)
        if labels is not None or next_sentence_label is not None:
            loss = prediction_logits.new_zeros(())
            if labels is not None:
                loss = loss + F.cross_entropy(prediction_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            if next_sentence_label is not None:
                loss = loss + F.cross_entropy(seq_relationship_logits, next_sentence_label.flatten())
            result["loss"] = loss
        return result

    @classmethod
    def from_hf(cls, hf_model, attention: str = "full", **attention_options) -> "BertForPreTraining":
        """A copy of a transformers ``BertForPreTraining`` with ``attention``."""
        from transformers import BertForPreTraining as HFBertForPreTraining

        if not isinstance(hf_model, HFBertForPreTraining):
            raise TypeError(f"hf_model: expected a transformers BertForPreTraining, got {type(hf_model).__name__}")
        model = cls(**_config_arguments(hf_model.config), attention=attention, attention_options=attention_options)
        hf_state = hf_model.state_dict()
        bert_state = {key[len("bert."):]: value for key, value in hf_state.items() if key.startswith("bert.")}
        state = {f"bert.{key}": value for key, value in _bert_state_dict(bert_state, model.bert).items()}
        state.update({
            "transform.weight": hf_state["cls.predictions.transform.dense.weight"],
            "transform.bias": hf_state["cls.predictions.transform.dense.bias"],
            "transform_norm.weight": hf_state["cls.predictions.transform.LayerNorm.weight"],
            "transform_norm.bias": hf_state["cls.predictions.transform.LayerNorm.bias"],
            "decoder_bias": hf_state["cls.predictions.decoder.bias"],
            "seq_relationship.weight": hf_state["cls.seq_relationship.weight"],
            "seq_relationship.bias": hf_state["cls.seq_relationship.bias"],
        })
        if not torch.equal(hf_state["cls.predictions.decoder.weight"], hf_state["bert.embeddings.word_embeddings.weight"]):
            raise ValueError("hf_model: the MLM decoder is not tied to the word embeddings; only tied heads are supported")
        model.load_state_dict(state, strict=True)
        return model.to(hf_model.device, hf_model.dtype).train(hf_model.training)


def _config_arguments(config) -> dict:
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"hf_model: only absolute position embeddings are supported, got {position_type!r}")
    if config.is_decoder:
        raise ValueError("hf_model: BERT configured as a decoder (is_decoder=True) is not supported")
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size, "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size, "hidden_dropout_prob": config.hidden_dropout_prob,
        "attention_probs_dropout_prob": config.attention_probs_dropout_prob, "layer_norm_eps": config.layer_norm_eps,
        "hidden_act": config.hidden_act,
    }


def _bert_state_dict(hf_state: dict, model: BertModel) -> dict:
    """Our BertModel's state_dict from a transformers BertModel's (keys without the ``bert.`` prefix)."""
    state = {
        "embeddings.word_embeddings.weight": hf_state["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": hf_state["embeddings.position_embeddings.weight"],
        "embeddings.token_type_embeddings.weight": hf_state["embeddings.token_type_embeddings.weight"],
        "embeddings.norm.weight": hf_state["embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": hf_state["embeddings.LayerNorm.bias"],
    }
    for index in range(len(model.layers)):
        hf, ours = f"encoder.layer.{index}.", f"layers.{index}."
        projections = [f"{hf}attention.self.{name}" for name in ("query", "key", "value")]
        state.update({
            f"{ours}attention.in_proj_weight": torch.cat([hf_state[f"{p}.weight"] for p in projections]),
            f"{ours}attention.in_proj_bias": torch.cat([hf_state[f"{p}.bias"] for p in projections]),
            f"{ours}attention.out_proj.weight": hf_state[f"{hf}attention.output.dense.weight"],
            f"{ours}attention.out_proj.bias": hf_state[f"{hf}attention.output.dense.bias"],
            f"{ours}attention_norm.weight": hf_state[f"{hf}attention.output.LayerNorm.weight"],
            f"{ours}attention_norm.bias": hf_state[f"{hf}attention.output.LayerNorm.bias"],
            f"{ours}intermediate.weight": hf_state[f"{hf}intermediate.dense.weight"],
            f"{ours}intermediate.bias": hf_state[f"{hf}intermediate.dense.bias"],
            f"{ours}output.weight": hf_state[f"{hf}output.dense.weight"],
            f"{ours}output.bias": hf_state[f"{hf}output.dense.bias"],
            f"{ours}output_norm.weight": hf_state[f"{hf}output.LayerNorm.weight"],
            f"{ours}output_norm.bias": hf_state[f"{hf}output.LayerNorm.bias"],
        })
    if model.pooler is not None:
        state["pooler.weight"] = hf_state["pooler.dense.weight"]
        state["pooler.bias"] = hf_state["pooler.dense.bias"]
    # parameters the chosen mechanism adds (Linformer's projections) keep their fresh initialisation
    own = model.state_dict()
    state.update({key: own[key] for key in own if key not in state and key.split(".")[-1] in ("proj_k", "proj_v")})
    return state
