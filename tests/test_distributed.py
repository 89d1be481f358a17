"""DistributedDataParallel on two CPU processes (gloo): gradients equal one process's on the same global batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from fastattn.models import GPTLMHeadModel

# None = automatic backend selection: the tests run the fused kernels of this machine.
BACKEND = None

WORLD_SIZE = 2
STEPS = 3
MECHANISMS = {
    "bigbird": {"block_size": 4, "num_random_blocks": 1},
    # redrawn at every step after the first: replicas must redraw the same features
    "performer": {"num_features": 16, "feature_redraw_interval": 1},
}


def make_model(attention: str) -> GPTLMHeadModel:
    torch.manual_seed(0)
    return GPTLMHeadModel(20, 32, num_layers=2, num_heads=4, max_position_embeddings=24, dropout=0.0,
                          attention_dropout=0.0, attention=attention,
                          attention_options={**MECHANISMS[attention], "backend": BACKEND})


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, 20, (4, 22), generator=torch.Generator().manual_seed(step))


def train(model: torch.nn.Module, rank: int, world_size: int) -> list[dict[str, torch.Tensor]]:
    """STEPS of SGD on this rank's share of each global batch; the gradients of every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gradients = []
    for step in range(STEPS):
        ids = global_batch(step).chunk(world_size)[rank]
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        gradients.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
        optimizer.step()
    return gradients


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {attention: _train_replica(attention, rank) for attention in MECHANISMS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train_replica(attention: str, rank: int) -> list[dict[str, torch.Tensor]]:
    # The DDP model (and its reducer) dies on return, while the process group still lives: a reducer
    # outliving the group would destroy it at exit, joining gloo's worker thread while holding the
    # GIL that thread needs, which deadlocks.
    model = DistributedDataParallel(make_model(attention))
    return [{name.removeprefix("module."): g for name, g in step.items()} for step in train(model, rank, WORLD_SIZE)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_gradients_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for attention in MECHANISMS:
        expected = train(make_model(attention), rank=0, world_size=1)
        for rank, results in enumerate(ranks):
            for step, (actual, reference) in enumerate(zip(results[attention], expected)):
                assert actual.keys() == reference.keys()
                for name, gradient in reference.items():
                    torch.testing.assert_close(actual[name], gradient, atol=2e-6, rtol=1e-4,
                                               msg=f"{attention} rank {rank} step {step} {name}")
