"""Dispatch: explicit backends, automatic selection, and errors that list why each backend declined."""
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import backends


def _inputs(dtype=torch.float32, head_dim=32, n=40):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, n, head_dim, generator=generator).to(dtype) for _ in range(3)]


def test_no_backend_error_lists_every_backend_with_its_reason():
    q, k, v = _inputs(torch.float16, head_dim=40)
    with pytest.raises(fastattn.BackendNotSupportedError) as caught:
        fastattn.bigbird_attention(q, k, v, block_size=16)
    message = str(caught.value)
    for name in ("cuda", "triton", "cpu", "reference"):
        assert f"  {name}: " in message, message
    assert "dtype float16 not supported" in message
    assert "head dim 40 not supported" in message


def test_unknown_backend_name_is_a_clear_value_error():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"backend: expected None or one of .*'reference'.*got 'gpu'"):
        fastattn.bigbird_attention(q, k, v, block_size=16, backend="gpu")


def test_forced_backend_that_declines_says_why():
    q, k, v = _inputs()
    with pytest.raises(fastattn.BackendNotSupportedError, match="backend 'cuda' cannot run block_sparse attention.*device cpu"):
        fastattn.bigbird_attention(q, k, v, block_size=16, backend="cuda")


def test_reference_backend_is_never_chosen_automatically_but_runs_when_asked():
    assert backends.BACKENDS["reference"].auto_device_types == ()
    q, k, v = _inputs()
    out = fastattn.bigbird_attention(q, k, v, block_size=16, backend="reference")
    layout = fastattn.bigbird_layout(40, block_size=16, num_heads=2)
    torch.testing.assert_close(out, fastattn.reference.block_sparse_attention(q, k, v, layout))


def test_cpu_backend_declares_its_dtypes_and_head_dims():
    cpu = backends.BACKENDS["cpu"]
    q = torch.empty(1, 1, 1, 300)
    reasons = cpu.not_supported_reasons("block_sparse", q.half())
    assert any("dtype float16" in reason for reason in reasons)
    assert any("head dim 300 > 256" in reason for reason in reasons)


def test_info_reports_versions_and_backends():
    result = subprocess.run([sys.executable, "-m", "fastattn.info"], capture_output=True, text=True, check=True)
    assert f"torch {torch.__version__}" in result.stdout
    for mechanism in backends.MECHANISMS:
        assert f"{mechanism} on cpu" in result.stdout
    assert any(line.split() == ["reference", "yes"] for line in result.stdout.splitlines())


def test_cpu_tensors_go_to_the_cpu_kernels_not_to_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.empty(1, 2, 64, 64)
    assert backends.select("block_sparse", q, block_size=64).name == "cpu"
    assert backends.select("block_sparse", q, "triton", block_size=64).name == "triton"
