"""Short block-sparse benchmark for `make gpu-check` when the bench package is absent.

Times forward and forward+backward of BigBird block-sparse attention (bf16, B=2, H=16, D=64, block 64,
3 random blocks) for fastattn's CUDA and Triton backends, FlexAttention (compiled, same layout: its block
mask at its default 128 granularity, the mask_mod masking the 64-blocks inside) and dense
scaled_dot_product_attention, at N = 4096 and 16384, with torch.utils.benchmark in one
process. Writes a long-format CSV (a row per measurement, flushed as it goes), a summary table and,
where matplotlib is installed, a PNG of time against N.

    python scripts/gpu_bench.py --out gpu-check-out/bench [--lengths 4096 16384] [--min-run-time 0.2]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastattn  # noqa: E402

BATCH, HEADS, HEAD_DIM, BLOCK_SIZE = 2, 16, 64, 64
FIELDS = ["provider", "mode", "N", "B", "H", "D", "block_size", "dtype", "median_ms", "p20_ms", "p80_ms", "tflops",
          "peak_memory_mib", "speedup_vs_sdpa", "device", "torch", "git", "error"]


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flex_provider(layout: fastattn.BlockLayout, length: int, heads: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    blocks = layout.to_dense().cuda()
    size = layout.block_size

    def mask_mod(b, h, q_idx, kv_idx):
        return blocks[h, q_idx // size, kv_idx // size]

    block_mask = create_block_mask(mask_mod, B=None, H=heads, Q_LEN=length, KV_LEN=length, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def providers(layout: fastattn.BlockLayout, length: int, heads: int):
    yield "sdpa_dense", lambda: (lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    for backend in ("cuda", "triton"):
        yield f"fastattn_{backend}", lambda backend=backend: (
            lambda q, k, v: fastattn.block_sparse_attention(q, k, v, layout, backend=backend))
    yield "flex_attention", lambda: flex_provider(layout, length, heads)


def measure(fn, q, k, v, grad_out, mode: str, min_run_time: float):
    def step():
        out = fn(q, k, v)
        if mode == "fwd+bwd":
            out.backward(grad_out)

    for tensor in (q, k, v):
        tensor.requires_grad_(mode == "fwd+bwd")
        tensor.grad = None
    context = torch.enable_grad() if mode == "fwd+bwd" else torch.no_grad()
    with context:
        step()  # compiles and autotunes outside the timing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        timer = benchmark.Timer(stmt="step()", globals={"step": step})
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
        peak = torch.cuda.max_memory_allocated() / 2**20
    times_ms = [t * 1e3 for t in measurement.times]  # per call (raw_times are per block of calls)
    if len(times_ms) > 1:
        deciles = statistics.quantiles(times_ms, n=10)
        p20, p80 = deciles[1], deciles[7]
    else:
        p20 = p80 = times_ms[0]
    return measurement.median * 1e3, p20, p80, peak


def write_summary(path: Path, rows: list[dict], device_name: str, revision: str) -> str:
    """The table so far, rewritten after every measurement so that a run cut short still leaves one."""
    lines = [f"block-sparse benchmark (BigBird layout, bf16, B={BATCH}, H={HEADS}, D={HEAD_DIM}, block {BLOCK_SIZE}) "
             f"on {device_name}, torch {torch.__version__}, git {revision}:",
             f"{'provider':16s} {'mode':8s} {'N':>6s} {'median ms':>10s} {'TFLOP/s':>8s} {'vs SDPA':>8s}"]
    for row in rows:
        if row["error"]:
            lines.append(f"{row['provider']:16s} {row['mode']:8s} {row['N']:6d} unavailable: {row['error']}")
        else:
            lines.append(f"{row['provider']:16s} {row['mode']:8s} {row['N']:6d} {row['median_ms']:>10s} "
                         f"{row['tflops']:>8s} {row['speedup_vs_sdpa'] or '-':>8s}")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(path: Path, rows: list[dict]) -> str:
    """Median time against N per provider, one panel per mode, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed"
    modes = sorted({row["mode"] for row in rows})
    figure, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for axis, mode in zip(axes[0], modes):
        for provider in dict.fromkeys(row["provider"] for row in rows):
            points = [(row["N"], float(row["median_ms"])) for row in rows
                      if row["mode"] == mode and row["provider"] == provider and not row["error"]]
            if points:
                axis.plot(*zip(*points), marker="o", label=provider)
        axis.set(title=f"block-sparse {mode}, bf16, B={BATCH} H={HEADS} D={HEAD_DIM}", xlabel="N",
                 ylabel="median ms", xscale="log", yscale="log")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return f"plot: {path}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out/bench"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--min-run-time", type=float, default=0.2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no NVIDIA GPU visible to torch; nothing to measure", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    batch, heads, head_dim, block_size, dtype = BATCH, HEADS, HEAD_DIM, BLOCK_SIZE, torch.bfloat16
    device_name, revision = torch.cuda.get_device_name(), git_revision()
    rows = []
    csv_path = args.out / "block_sparse.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for length in args.lengths:
            layout = fastattn.bigbird_layout(length, block_size=block_size, num_heads=heads, num_random_blocks=3)
            generator = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, grad_out = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=dtype,
                                             generator=generator) for _ in range(4))
            sparse_flops = 4 * batch * head_dim * layout.nnz * block_size**2 * (heads // layout.num_heads)
            dense_flops = 4 * batch * heads * length**2 * head_dim
            for mode in ("fwd", "fwd+bwd"):
                work = 1.0 if mode == "fwd" else 3.5
                sdpa_ms = None
                for name, make in providers(layout, length, heads):
                    row = {"provider": name, "mode": mode, "N": length, "B": batch, "H": heads, "D": head_dim,
                           "block_size": block_size, "dtype": "bfloat16", "device": device_name,
                           "torch": torch.__version__, "git": revision, "error": ""}
                    started = time.perf_counter()
                    try:
                        median, p20, p80, peak = measure(make(), q, k, v, grad_out, mode, args.min_run_time)
                    except Exception as error:  # a provider that cannot run is a row with its reason
                        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                        torch.cuda.empty_cache()
                    else:
                        flops = (dense_flops if name == "sdpa_dense" else sparse_flops) * work
                        if name == "sdpa_dense":
                            sdpa_ms = median
                        row.update(median_ms=f"{median:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}",
                                   tflops=f"{flops / median / 1e9:.2f}", peak_memory_mib=f"{peak:.1f}",
                                   speedup_vs_sdpa=f"{sdpa_ms / median:.2f}" if sdpa_ms else "")
                    print(f"{name:16s} {mode:8s} N={length:6d} {row.get('median_ms', '-'):>10s} ms "
                          f"{row.get('tflops', '-'):>8s} TFLOP/s  speed-up {row.get('speedup_vs_sdpa') or '-':>6s} "
                          f"({time.perf_counter() - started:.1f} s) {row['error']}", flush=True)
                    writer.writerow(row)
                    handle.flush()
                    rows.append(row)
                    write_summary(args.out / "summary.txt", rows, device_name, revision)
    print(write_summary(args.out / "summary.txt", rows, device_name, revision))
    print(f"CSV: {csv_path}")
    print(plot(args.out / "block_sparse_time.png", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
