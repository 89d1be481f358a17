"""torch.compile(fullgraph=True) of the public ops, forward and backward, equals eager.

Backend selection and BigBird's layout construction run eagerly while Dynamo traces (they query the
dispatcher and draw random blocks); these tests fail if either breaks the graph.
"""
import pytest
import torch

import fastattn

LENGTH, HEAD_DIM = 100, 32


PROJECTION = torch.randn(16, LENGTH, generator=torch.Generator().manual_seed(1))
FEATURES = fastattn.random_features(32, HEAD_DIM, generator=torch.Generator().manual_seed(2))

OPS = {
    "bigbird": lambda q, k, v: fastattn.bigbird_attention(q, k, v, block_size=16, num_random_blocks=2, seed=7),
    "bigbird-causal": lambda q, k, v: fastattn.bigbird_attention(q, k, v, block_size=16, causal=True),
    "linformer": lambda q, k, v: fastattn.linformer_attention(q, k, v, PROJECTION),
    "performer-causal": lambda q, k, v: fastattn.performer_attention(q, k, v, FEATURES, causal=True),
}


@pytest.mark.parametrize("name", list(OPS))
def test_compiled_public_op_matches_eager_forward_and_backward(name):
    torch._dynamo.reset()
    op = OPS[name]
    generator = torch.Generator().manual_seed(0)
    eager_inputs = [torch.randn(2, 3, LENGTH, HEAD_DIM, generator=generator, requires_grad=True) for _ in range(3)]
    compiled_inputs = [t.detach().clone().requires_grad_() for t in eager_inputs]
    expected = op(*eager_inputs)
    expected.square().sum().backward()
    actual = torch.compile(op, fullgraph=True)(*compiled_inputs)
    actual.square().sum().backward()
    torch.testing.assert_close(actual, expected)
    for eager, compiled in zip(eager_inputs, compiled_inputs):
        torch.testing.assert_close(compiled.grad, eager.grad)


@pytest.mark.parametrize("mode", ["static", "dynamic", "mark_dynamic"])
def test_compiled_bigbird_serves_varying_lengths(mode):
    """Regression: a second length (automatic dynamic shapes), dynamic=True and mark_dynamic used to fail
    with 'assume_constant_result argument conversion failed' (the layout was built from a symbolic N).
    With a symbolic length, one graph serves every length."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def op(q, k, v):
        return fastattn.bigbird_attention(q, k, v, block_size=16, num_random_blocks=1, causal=True)

    compiled = torch.compile(op, fullgraph=True, dynamic=True if mode == "dynamic" else None)
    generator = torch.Generator().manual_seed(0)
    for length in (64, 100, 37):
        eager_inputs = [torch.randn(1, 2, length, HEAD_DIM, generator=generator, requires_grad=True) for _ in range(3)]
        compiled_inputs = [t.detach().clone().requires_grad_() for t in eager_inputs]
        if mode == "mark_dynamic":
            for t in compiled_inputs:
                torch._dynamo.mark_dynamic(t, 2)
        expected = op(*eager_inputs)
        expected.square().sum().backward()
        actual = compiled(*compiled_inputs)
        actual.square().sum().backward()
        torch.testing.assert_close(actual, expected)
        for eager, traced in zip(eager_inputs, compiled_inputs):
            torch.testing.assert_close(traced.grad, eager.grad)
    if mode != "static":
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "a symbolic length needs one graph"


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_bigbird_layout_csr_op_passes_opcheck(causal):
    torch.library.opcheck(torch.ops.fastattn.bigbird_layout_csr.default, (100, 16, 2, 1, 0, causal, torch.device("cpu")))


def test_exported_bigbird_serves_every_length_of_a_dynamic_dim():
    class BigBird(torch.nn.Module):
        def forward(self, q, k, v):
            return fastattn.bigbird_attention(q, k, v, block_size=16, num_random_blocks=1, causal=True)

    generator = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(1, 2, 64, HEAD_DIM, generator=generator) for _ in range(3))
    length = torch.export.Dim("length", min=2, max=1024)
    exported = torch.export.export(BigBird(), example, dynamic_shapes=({2: length},) * 3)
    for n in (64, 100, 37):
        q, k, v = (torch.randn(1, 2, n, HEAD_DIM, generator=generator) for _ in range(3))
        torch.testing.assert_close(exported.module()(q, k, v), BigBird()(q, k, v))


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_compiled_bigbird_layout_specialises_a_symbolic_length(dynamic):
    """bigbird_layout returns a Python object for one length: under torch.compile a symbolic length is
    specialised (one graph per length) instead of failing."""
    torch._dynamo.reset()

    def op(q, k, v):
        layout = fastattn.bigbird_layout(q.shape[2], block_size=16, num_heads=q.shape[1], causal=True)
        return fastattn.reference.block_sparse_attention(q, k, v, layout, causal=True)

    compiled = torch.compile(op, fullgraph=True, dynamic=dynamic)
    generator = torch.Generator().manual_seed(0)
    for length in (64, 100, 37):
        q, k, v = (torch.randn(1, 2, length, HEAD_DIM, generator=generator) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), op(q, k, v))
