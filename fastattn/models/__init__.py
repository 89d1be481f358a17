"""Reference models on fastattn attention: Transformer (encoder-decoder), BERT and GPT-2.

Each takes ``attention=`` ("full", "bigbird", "linformer", "performer"; GPT and causal decoders
exclude Linformer) and ``attention_options=``; BERT and GPT load transformers weights with ``from_hf``.
"""
from .bert import BertForPreTraining, BertModel
from .common import ModelOutput
from .gpt import GPTLMHeadModel, GPTModel
from .transformer import Transformer

__all__ = ["BertForPreTraining", "BertModel", "GPTLMHeadModel", "GPTModel", "ModelOutput", "Transformer"]
