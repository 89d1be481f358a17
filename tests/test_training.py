"""Training sanity: each mechanism learns a small synthetic task to a loss far below chance (fixed seeds)."""
from __future__ import annotations

import math

import pytest
import torch

from fastattn.models import BertForPreTraining, GPTLMHeadModel

# None = automatic backend selection: the tests run the fused kernels of this machine.
BACKEND = None

VOCAB = 10  # token 0 is unused, so targets are uniform over 9 tokens
CHANCE = math.log(VOCAB - 1)


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def periodic_batch(generator: torch.Generator, batch: int, length: int, period: int) -> torch.Tensor:
    """Random first ``period`` tokens, then repeated: the next token is the one ``period`` positions back."""
    head = torch.randint(1, VOCAB, (batch, period), generator=generator)
    return head.repeat(1, math.ceil(length / period))[:, :length]


def train(model, batch_fn, steps: int, lr: float = 3e-3) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = batch_fn(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


GPT_CASES = {
    "full": {},
    # 6 blocks of 4: each query block sees its window, the first block and one random block, not all
    "bigbird": {"block_size": 4, "num_random_blocks": 1},
    "performer": {"num_features": 16},
}


@pytest.mark.parametrize("attention", tuple(GPT_CASES))
def test_gpt_learns_to_continue_a_periodic_sequence(attention, one_thread):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    options = dict(GPT_CASES[attention], **({"backend": BACKEND} if attention != "full" else {}))
    model = GPTLMHeadModel(VOCAB, 32, num_layers=2, num_heads=4, max_position_embeddings=24, dropout=0.0,
                           attention_dropout=0.0, attention=attention, attention_options=options)
    period = 3

    def batch_loss(model):
        ids = periodic_batch(generator, 16, 24, period)
        labels = ids.clone()
        labels[:, :period] = -100  # the random head cannot be predicted
        return model(ids, labels=labels).loss

    final = train(model, batch_loss, steps=150)
    assert final < 0.1 * CHANCE, f"{attention}: final loss {final:.3f} vs chance {CHANCE:.3f}"


def test_linformer_encoder_learns_to_reverse(one_thread):
    """Linformer has no causal form: a BERT-style encoder learns to output its input reversed."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = BertForPreTraining(VOCAB, 32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               attention="linformer",
                               attention_options={"projected_length": 8, "max_seq_len": 8, "backend": BACKEND})

    def batch_loss(model):
        ids = torch.randint(1, VOCAB, (16, 8), generator=generator)
        return model(ids, labels=ids.flip(1)).loss

    final = train(model, batch_loss, steps=250, lr=5e-3)
    assert final < 0.1 * CHANCE, f"linformer: final loss {final:.3f} vs chance {CHANCE:.3f}"
