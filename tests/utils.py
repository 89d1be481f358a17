"""Helpers of the test files only (the tolerance rule itself is fastattn.testing)."""
from __future__ import annotations

import torch

import fastattn


def describe_case(**params) -> str:
    """A readable test id such as B2-H3-N200-D64-causal."""
    parts = []
    for key, value in params.items():
        if isinstance(value, bool):
            if value:
                parts.append(key)
        elif isinstance(value, torch.dtype):
            parts.append(str(value).replace("torch.", ""))
        else:
            parts.append(f"{key}{value}")
    return "-".join(parts)


def block_sparse_case_id(case) -> str:
    """Id of a (B, H, Nq, Nk, D, block, dtype, causal, padded, per_head) block-sparse test case."""
    batch, heads, query_len, key_len, head_dim, block_size, dtype, causal, padded, per_head = case
    lengths = {"N": query_len} if query_len == key_len else {"Nq": query_len, "Nk": key_len}
    return describe_case(B=batch, H=heads, **lengths, D=head_dim, block=block_size, dtype=dtype, causal=causal,
                         padded=padded, per_head=per_head)


def random_block_layout(heads: int, query_len: int, key_len: int, block_size: int, per_head: bool, seed: int):
    """A random layout that lists each diagonal block (so causal rows see a key) and a third of the rest."""
    generator = torch.Generator().manual_seed(seed)
    query_blocks, key_blocks = -(-query_len // block_size), -(-key_len // block_size)
    mask = torch.rand(heads if per_head else 1, query_blocks, key_blocks, generator=generator) < 0.35
    diagonal = torch.arange(min(query_blocks, key_blocks))
    mask[:, diagonal, diagonal] = True
    return fastattn.BlockLayout.from_dense(mask, block_size)


def random_padding(batch: int, key_len: int, seed: int) -> torch.Tensor:
    """About a fifth of the keys padded, and the second half of batch 0's keys."""
    generator = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(batch, key_len, generator=generator) < 0.2
    mask[0, key_len // 2:] = True  # a long padded tail, whole key tiles of padding included
    return mask


# The CPU kernels multiply bfloat16 inputs in bfloat16 where the CPU has bf16 units (AVX512-BF16, AMX), and
# convert them to float32 first elsewhere or under FASTATTN_CPU_BF16_PRODUCTS=0: CPU tests of bfloat16 run
# both paths. Each entry: (dtype, whether bf16 products are allowed), with its id.
CPU_DTYPES = [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)]
CPU_DTYPE_IDS = ["float32", "bfloat16", "bfloat16-float32-products"]


def cpu_has_bf16_units() -> bool:
    capabilities = torch._C._cpu._get_cpu_capability()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def run_with_thread_counts(compute, counts) -> list:
    """compute() once with each number of threads in ``counts``, in order; the thread count is restored after."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in counts:
            torch.set_num_threads(count)
            results.append(compute())
    finally:
        torch.set_num_threads(threads)
    return results


def allow_bf16_products(monkeypatch, allowed: bool) -> None:
    """Lets the CPU kernels take bf16 products where the CPU can (allowed) or forces float32 products."""
    monkeypatch.setenv("FASTATTN_CPU_BF16_PRODUCTS", "1" if allowed else "0")


class RecordingLaunch:
    """Stands in for a Triton kernel: records each launch grid and writes nothing (tests of grid limits,
    whose launches would take many minutes in the interpreter)."""

    def __init__(self, grids):
        self.grids = grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


def assert_gradients_match_finite_differences(attention, leaves, names) -> None:
    """Directional derivatives of ``attention(*leaves)`` (float64) against central finite differences.

    One random direction per leaf: <grad, u> must match (f(x + h u) - f(x - h u)) . dO / 2h to 1e-6. Cheaper
    than torch.autograd.gradcheck (two calls per leaf), which the interpreted Triton kernels make too slow.
    """
    generator = torch.Generator().manual_seed(9)
    device = leaves[0].device
    grad_out = torch.randn(leaves[0].shape, generator=generator, dtype=torch.float64).to(device)
    grads = torch.autograd.grad(attention(*leaves), leaves, grad_out)
    step = 1e-6
    with torch.no_grad():
        for index, name in enumerate(names):
            direction = torch.randn(leaves[index].shape, generator=generator, dtype=torch.float64).to(device)
            shifted = [[t + sign * step * direction if i == index else t for i, t in enumerate(leaves)]
                       for sign in (1, -1)]
            numerical = ((attention(*shifted[0]) - attention(*shifted[1])) * grad_out).sum().item() / (2 * step)
            analytical = (grads[index] * direction).sum().item()
            assert abs(numerical - analytical) <= 1e-6 * max(1.0, abs(analytical)), (
                f"grad of {name}: <grad, u> = {analytical:.9f}, finite differences give {numerical:.9f}"
            )


def assert_nan_queries_reach_only_what_they_read(attention, *, causal: bool, dtype: torch.dtype, device="cpu",
                                                 head_dim: int = 32, rows_without_keys: bool = True) -> None:
    """A NaN query that sees no key reaches nothing (its output and every gradient are 0, even those of the later
    keys in its own block or tile), and a NaN query that sees keys never reaches the gradients of padded keys
    (DESIGN: rows that see no key give 0 and no gradient; padded keys are ignored). ``attention(q, k, v,
    key_padding_mask)`` runs the op under test on (2, 2, 40, D). rows_without_keys=False (Linformer, whose queries
    all read the kp projections) checks the latter only."""
    generator = torch.Generator().manual_seed(0)

    def run(mask, nan_at):
        q, k, v = (torch.randn(2, 2, 40, head_dim, generator=generator, dtype=torch.float64) for _ in range(3))
        for index in nan_at:
            q[index] = float("nan")
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, mask.to(device))
        out.backward(torch.randn(out.shape, generator=generator, dtype=torch.float64).to(device, dtype))
        return [out.detach().cpu()] + [t.grad.cpu() for t in leaves]

    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1] = True  # batch element 1: every key padded
    mask[0, :20] = True  # batch element 0: when causal, the first 20 queries see no key
    nan_at = [(1, 0, 3, 1)] + ([(0, 1, 7, 0)] if causal else [])
    for name, tensor in zip(("out", "grad q", "grad k", "grad v"), run(mask, nan_at) if rows_without_keys else []):
        assert torch.isfinite(tensor).all(), f"{name} holds NaN at {torch.isnan(tensor).nonzero().tolist()[:4]}"
        assert (tensor[1] == 0).all(), f"{name} of the batch element without keys is not 0"
        if causal and name in ("out", "grad q"):
            assert (tensor[0, :, :20] == 0).all(), f"{name} of the rows before the first key is not 0"

    if causal and rows_without_keys:
        # The first unpadded key shares its block or tile with the NaN queries before it, whatever the tile size.
        mask = torch.zeros(2, 40, dtype=torch.bool)
        mask[0, :4] = True
        mask[1, :9] = True
        for name, tensor in zip(("out", "grad q", "grad k", "grad v"), run(mask, [(0, 1, 2, 0), (1, 0, 7, 1)])):
            assert torch.isfinite(tensor).all(), f"{name} holds NaN at {torch.isnan(tensor).nonzero().tolist()[:4]}"
            if name in ("out", "grad q"):
                assert (tensor[0, :, :4] == 0).all() and (tensor[1, :, :9] == 0).all(), \
                    f"{name} of the rows before the first key is not 0"

    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :10] = True
    mask[0, 30:] = True
    out, _, grad_k, grad_v = run(mask, [(0, 0, 35, 1)])
    assert torch.isnan(out[0, 0, 35]).all()
    for name, grad in (("k", grad_k), ("v", grad_v)):
        assert (grad[0][:, mask[0]] == 0).all(), f"grad of padded {name} is not 0"
