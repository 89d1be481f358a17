"""fastattn.random_features: orthogonal blocks, Gaussian row norms, reproducibility, arguments."""
from __future__ import annotations

import math

import pytest
import torch

import fastattn
from tests.utils import run_with_thread_counts


@pytest.mark.parametrize("num_features,head_dim", [(64, 64), (256, 64), (100, 32), (20, 16), (8, 128)],
                         ids=["m64-D64", "m256-D64", "m100-D32-partial-block", "m20-D16", "m8-D128"])
def test_rows_within_a_block_are_orthogonal(num_features, head_dim):
    features = fastattn.random_features(num_features, head_dim, generator=torch.Generator().manual_seed(0),
                                        dtype=torch.float64)
    assert features.shape == (num_features, head_dim)
    for start in range(0, num_features, head_dim):
        block = features[start:start + head_dim]
        directions = block / block.norm(dim=1, keepdim=True)
        gram = directions @ directions.T
        torch.testing.assert_close(gram, torch.eye(len(block), dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orthogonal", "iid"])
def test_row_norms_follow_a_chi_distribution(orthogonal):
    head_dim, num_features = 64, 4096
    features = fastattn.random_features(num_features, head_dim, orthogonal=orthogonal,
                                        generator=torch.Generator().manual_seed(1))
    norms = features.norm(dim=1)
    # |N(0, I_D)| has mean about sqrt(D - 1/2) and standard deviation about 1/sqrt(2).
    assert abs(norms.mean().item() - math.sqrt(head_dim - 0.5)) < 0.1
    assert abs(norms.std().item() - 0.5**0.5) < 0.1
    assert (norms > 0.3 * head_dim**0.5).all() and (norms < 2 * head_dim**0.5).all()


def test_iid_rows_are_not_orthogonal():
    features = fastattn.random_features(64, 64, orthogonal=False, generator=torch.Generator().manual_seed(2),
                                        dtype=torch.float64)
    directions = features / features.norm(dim=1, keepdim=True)
    off_diagonal = (directions @ directions.T - torch.eye(64, dtype=torch.float64)).abs()
    # Independent directions in 64 dims have cosines of about 1/8, far from the 1e-5 of orthogonal rows.
    assert off_diagonal.max() > 0.2
    entries = features.flatten()
    assert abs(entries.mean().item()) < 0.05 and abs(entries.std().item() - 1) < 0.05


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orthogonal", "iid"])
def test_reproducible_from_the_generator(orthogonal):
    def draw(seed):
        return fastattn.random_features(96, 32, orthogonal=orthogonal, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(draw(3), draw(3), rtol=0, atol=0)
    assert not torch.equal(draw(3), draw(4))


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orthogonal", "iid"])
def test_the_same_whatever_the_thread_count(orthogonal):
    def draw():
        return fastattn.random_features(256, 64, orthogonal=orthogonal, generator=torch.Generator().manual_seed(0))

    single, several = run_with_thread_counts(draw, (1, 4))
    torch.testing.assert_close(single, several, rtol=0, atol=0)


def test_dtype_and_device():
    features = fastattn.random_features(16, 8, dtype=torch.bfloat16, device="cpu")
    assert features.dtype == torch.bfloat16 and features.device.type == "cpu"
    assert fastattn.random_features(16, 8).dtype == torch.get_default_dtype()


@pytest.mark.parametrize("num_features,head_dim,name", [(0, 8, "num_features"), (16, -1, "head_dim"),
                                                        (16.0, 8, "num_features"), (True, 8, "num_features")],
                         ids=["zero-features", "negative-head-dim", "float-features", "bool-features"])
def test_bad_arguments_are_rejected(num_features, head_dim, name):
    with pytest.raises(ValueError, match=f"{name}: expected a positive int"):
        fastattn.random_features(num_features, head_dim)
