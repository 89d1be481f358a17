"""GPT-2 (Radford et al.) on fastattn attention: GPTModel and GPTLMHeadModel with greedy ``generate``.

Same architecture (pre-norm blocks, learned positions, tied LM head) and forward conventions as
transformers' GPT2 (``input_ids``, ``attention_mask`` with 1 = keep, ``position_ids``, ``labels``),
so ``from_hf`` loads a transformers GPT2Model / GPT2LMHeadModel and, with ``attention="full"``,
gives its outputs. Attention is causal, so Linformer (which has no causal form) is not accepted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import MultiheadAttention
from .common import ModelOutput, activation, attention_options as _options, check_ids, init_weights, key_padding_mask

__all__ = ["GPTModel", "GPTLMHeadModel"]

class GPTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, intermediate_size, dropout, attention_dropout, layer_norm_eps,
                 activation_function, attention, options):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.attn = MultiheadAttention(hidden_size, num_heads, dropout=attention_dropout, batch_first=True,
                                       attention=attention, **options)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.c_fc = nn.Linear(hidden_size, intermediate_size)
        self.c_proj = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.activation_function = activation_function

    def forward(self, hidden: Tensor, padding: Tensor | None, state: dict | None, use_cache: bool):
        normed = self.ln_1(hidden)
        if use_cache:
            attended, state = self.attn.decode(normed, state, key_padding_mask=padding)
        else:
            attended, _ = self.attn(normed, normed, normed, key_padding_mask=padding, need_weights=False,
                                    is_causal=True)
        hidden = hidden + self.dropout(attended)
        feed_forward = self.c_proj(activation(self.activation_function)(self.c_fc(self.ln_2(hidden))))
        return hidden + self.dropout(feed_forward), state


class GPTModel(nn.Module):
    """GPT-2 decoder stack: ``forward`` returns ``last_hidden_state`` (B, N, hidden) and ``past_key_values``.

    ``attention`` ("full", "bigbird", "performer") and ``attention_options`` configure every causal
    self-attention layer. With ``use_cache=True`` the returned ``past_key_values`` (one state per
    layer: a key-value cache for full attention and BigBird, Performer's running feature sums) let the
    next call take only the new tokens; its ``attention_mask`` then covers the past tokens and the new
    ones, (B, past + N), and only the first call's tokens may be padding (left-padded prompts).
    """

    def __init__(self, vocab_size: int = 50257, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 max_position_embeddings: int = 1024, intermediate_size: int | None = None, dropout: float = 0.1,
                 attention_dropout: float = 0.1, layer_norm_eps: float = 1e-5, activation_function: str = "gelu_new",
                 *, attention: str = "full", attention_options: dict | None = None):
        super().__init__()
        if attention == "linformer":
            raise ValueError("attention: GPT is causal and Linformer attention has no causal form; "
                             "use 'full', 'bigbird' or 'performer'")
        activation(activation_function)
        options = _options(attention_options)
        self.attention = attention
        self.max_position_embeddings = max_position_embeddings
        self.wte = nn.Embedding(vocab_size, hidden_size)
        self.wpe = nn.Embedding(max_position_embeddings, hidden_size)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(
            GPTBlock(hidden_size, num_heads, intermediate_size or 4 * hidden_size, dropout, attention_dropout,
                     layer_norm_eps, activation_function, attention, options)
            for _ in range(num_layers)
        )
        self.ln_f = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        init_weights(self)
        for block in self.h:  # GPT-2 scales the residual projections by 1/sqrt(2 * layers)
            nn.init.normal_(block.attn.out_proj.weight, std=0.02 / (2 * num_layers) ** 0.5)
            nn.init.normal_(block.c_proj.weight, std=0.02 / (2 * num_layers) ** 0.5)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: list | None = None, use_cache: bool = False) -> ModelOutput:
        check_ids(input_ids, None)
        past_length = 0 if past_key_values is None else past_key_values[0]["length"]
        if input_ids.shape[1] + past_length > self.max_position_embeddings:
            raise ValueError(
                f"input_ids: expected at most {self.max_position_embeddings} positions (max_position_embeddings), "
                f"got {past_length} past + {input_ids.shape[1]} new"
            )
        use_cache = use_cache or past_key_values is not None
        if attention_mask is not None and not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask: expected a Tensor or None, got {type(attention_mask).__name__}")
        if past_length and attention_mask is not None:
            expected = (input_ids.shape[0], past_length + input_ids.shape[1])
            if tuple(attention_mask.shape) != expected:
                raise ValueError(f"attention_mask: expected shape {expected} (past + new tokens), "
                                 f"got {tuple(attention_mask.shape)}")
            padding = attention_mask == 0
        else:
            padding = key_padding_mask(attention_mask, input_ids)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids.unsqueeze(0)
        hidden = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        states = past_key_values or [None] * len(self.h)
        new_states = []
        for block, state in zip(self.h, states):
            hidden, state = block(hidden, padding, None if state is None else state["attention"], use_cache)
            new_states.append({"attention": state, "length": past_length + input_ids.shape[1]})
        return ModelOutput(last_hidden_state=self.ln_f(hidden), past_key_values=new_states if use_cache else None)

    @classmethod
    def from_hf(cls, hf_model, attention: str = "full", **attention_options) -> "GPTModel":
        """A copy of a transformers ``GPT2Model`` (or the ``transformer`` of a ``GPT2LMHeadModel``) with ``attention``."""
        from transformers import GPT2LMHeadModel as HFGPT2LMHeadModel
        from transformers import GPT2Model as HFGPT2Model

        if isinstance(hf_model, HFGPT2LMHeadModel):
            hf_model = hf_model.transformer
        if not isinstance(hf_model, HFGPT2Model):
            raise TypeError(f"hf_model: expected a transformers GPT2Model or GPT2LMHeadModel, got {type(hf_model).__name__}")
        model = cls(**_config_arguments(hf_model.config), attention=attention, attention_options=attention_options)
        model.load_state_dict(_gpt_state_dict(hf_model.state_dict(), model), strict=True)
        return model.to(hf_model.device, hf_model.dtype).train(hf_model.training)


class GPTLMHeadModel(nn.Module):
    """GPT-2 with the LM head tied to the token embeddings.

    ``forward`` returns ``logits`` (B, N, vocab), ``last_hidden_state``, ``past_key_values`` and, given
    ``labels`` (-100 = ignored; shifted inside, as in transformers), ``loss``.
    """

    def __init__(self, vocab_size: int = 50257, hidden_size: int = 768, *, attention: str = "full",
                 attention_options: dict | None = None, **gpt_arguments):
        super().__init__()
        self.transformer = GPTModel(vocab_size, hidden_size, attention=attention, attention_options=attention_options,
                                    **gpt_arguments)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None, past_key_values: list | None = None,
                use_cache: bool = False) -> ModelOutput:
        outputs = self.transformer(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        logits = F.linear(outputs.last_hidden_state, self.transformer.wte.weight)
        result = ModelOutput(logits=logits, last_hidden_state=outputs.last_hidden_state,
                             past_key_values=outputs.past_key_values)
        if labels is not None:
            result["loss"] = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return result

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, attention_mask: Tensor | None = None) -> Tensor:
        """Greedy decoding: ``input_ids`` (B, N) followed by ``max_new_tokens`` argmax tokens.

        Every mechanism decodes incrementally, giving the tokens the full forward gives: full attention
        and BigBird with a key-value cache (BigBird's causal layout is prefix-stable, so a new token
        attends to its row's blocks only), Performer with its running sums (constant work per token).
        ``attention_mask`` (B, N), 1 = token, 0 = padding, serves left-padded batches: positions count
        from each row's first token. Call ``model.eval()`` first for deterministic decoding (dropout).
        """
        check_ids(input_ids, None)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        sequence = input_ids
        if max_new_tokens == 0:
            return sequence
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask: expected a Tensor (B, N) or None, got {type(attention_mask).__name__}")
        key_padding_mask(attention_mask, input_ids)  # checks the shape
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        outputs = self(input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
        for step in range(max_new_tokens):
            next_token = outputs.logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
            if step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
            positions = positions[:, -1:] + 1
            outputs = self(next_token, attention_mask=attention_mask, position_ids=positions,
                           past_key_values=outputs.past_key_values)
        return sequence

    @classmethod
    def from_hf(cls, hf_model, attention: str = "full", **attention_options) -> "GPTLMHeadModel":
        """A copy of a transformers ``GPT2LMHeadModel`` with ``attention`` (its LM head must be tied)."""
        from transformers import GPT2LMHeadModel as HFGPT2LMHeadModel

        if not isinstance(hf_model, HFGPT2LMHeadModel):
            raise TypeError(f"hf_model: expected a transformers GPT2LMHeadModel, got {type(hf_model).__name__}")
        if not torch.equal(hf_model.lm_head.weight, hf_model.transformer.wte.weight):
            raise ValueError("hf_model: the LM head is not tied to the token embeddings; only tied heads are supported")
        model = cls(**_config_arguments(hf_model.config), attention=attention, attention_options=attention_options)
        model.transformer.load_state_dict(_gpt_state_dict(hf_model.transformer.state_dict(), model.transformer),
                                          strict=True)
        return model.to(hf_model.device, hf_model.dtype).train(hf_model.training)


def _config_arguments(config) -> dict:
    if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx:
        raise ValueError("hf_model: only GPT-2's attention scaling 1/sqrt(head_dim) is supported "
                         "(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)")
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "num_layers": config.n_layer,
        "num_heads": config.n_head, "max_position_embeddings": config.n_positions,
        "intermediate_size": config.n_inner, "dropout": config.resid_pdrop, "attention_dropout": config.attn_pdrop,
        "layer_norm_eps": config.layer_norm_epsilon, "activation_function": config.activation_function,
    }


def _gpt_state_dict(hf_state: dict, model: GPTModel) -> dict:
    """Our GPTModel's state_dict from a transformers GPT2Model's (Conv1D weights are (in, out): transposed)."""
    state = {name: hf_state[name] for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for index in range(len(model.h)):
        prefix = f"h.{index}."
        state.update({
            f"{prefix}ln_1.weight": hf_state[f"{prefix}ln_1.weight"],
            f"{prefix}ln_1.bias": hf_state[f"{prefix}ln_1.bias"],
            f"{prefix}attn.in_proj_weight": hf_state[f"{prefix}attn.c_attn.weight"].T,
            f"{prefix}attn.in_proj_bias": hf_state[f"{prefix}attn.c_attn.bias"],
            f"{prefix}attn.out_proj.weight": hf_state[f"{prefix}attn.c_proj.weight"].T,
            f"{prefix}attn.out_proj.bias": hf_state[f"{prefix}attn.c_proj.bias"],
            f"{prefix}ln_2.weight": hf_state[f"{prefix}ln_2.weight"],
            f"{prefix}ln_2.bias": hf_state[f"{prefix}ln_2.bias"],
            f"{prefix}c_fc.weight": hf_state[f"{prefix}mlp.c_fc.weight"].T,
            f"{prefix}c_fc.bias": hf_state[f"{prefix}mlp.c_fc.bias"],
            f"{prefix}c_proj.weight": hf_state[f"{prefix}mlp.c_proj.weight"].T,
            f"{prefix}c_proj.bias": hf_state[f"{prefix}mlp.c_proj.bias"],
        })
    return state
