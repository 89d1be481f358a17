"""``python -m bench``: every fastattn mechanism and backend against the peers; table, CSV, plots, quality."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from .measure import Effort
from .quality import QualityConfig, approximation_quality, format_quality, write_quality_csv
from .report import CsvWriter, format_table, write_plots
from .runner import RunConfig, run, run_metadata
from .workload import MECHANISMS, MODES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEFAULT_LENGTHS = {"cpu": (512, 1024, 2048, 4096), "cuda": (1024, 2048, 4096, 8192, 16384)}
QUICK_LENGTHS = (512, 1024)
QUICK_MEMORY_BUDGET_GIB = 1.5
DEFAULT_SHAPE = {"cpu": (1, 8, 64), "cuda": (2, 16, 64)}  # B, H, D
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "float16"}


def _listed(choices=None, convert=str):
    """An option that takes comma lists and may repeat: --n 512,1024 --n 2048."""
    def parse(text: str) -> list:
        values = [convert(part.strip()) for part in text.split(",") if part.strip()]
        for value in values:
            if choices is not None and value not in choices:
                raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return values
    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available")
    p.add_argument("--mechanism", action="append", type=_listed(MECHANISMS), help=f"{', '.join(MECHANISMS)} "
                   "(comma list or repeated; default: all)")
    p.add_argument("--n", action="append", type=_listed(convert=_positive), help="sequence lengths (default: "
                   f"{DEFAULT_LENGTHS['cpu']} on CPU, {DEFAULT_LENGTHS['cuda']} on CUDA; --quick: {QUICK_LENGTHS})")
    p.add_argument("--mode", action="append", type=_listed(MODES), help="fwd, bwd, fwdbwd (default: fwdbwd)")
    p.add_argument("--dtype", action="append", type=_listed(tuple(DTYPES)),
                   help="default: float32 on CPU, float16 on CUDA")
    p.add_argument("--batch", type=_positive, help="B (default: 1 on CPU, 2 on CUDA)")
    p.add_argument("--heads", type=_positive, help="H (default: 8 on CPU, 16 on CUDA)")
    p.add_argument("--head-dim", type=_positive, help="D (default: 64)")
    p.add_argument("--block-size", type=_positive, default=64, help="BigBird block size (default: 64)")
    p.add_argument("--random-blocks", type=int, default=3, help="BigBird random blocks per row (default: 3)")
    p.add_argument("--kp", type=_positive, default=256, help="Linformer projected length (default: 256)")
    p.add_argument("--features", type=_positive, default=256, help="Performer random features m (default: 256)")
    p.add_argument("--quick", action="store_true",
                   help="smoke pass: N=512,1024, short timing, a memory budget of 1.5 GiB, no compiled peer "
                   "(flex-attention), small quality table")
    p.add_argument("--min-run-time", type=float, help="seconds of timing per measurement (default 1.0, --quick 0.1)")
    p.add_argument("--memory-budget-gib", type=float,
                   help="skip a provider whose estimated memory exceeds this (default: half the available memory; "
                   f"--quick: at most {QUICK_MEMORY_BUDGET_GIB})")
    p.add_argument("--no-quality", action="store_true", help="skip the approximation-quality table")
    p.add_argument("--quality-n", type=_positive, help="N of the quality table (default 1024, --quick 512)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default: bench-results/)")
    return p


def _flatten(values: list[list] | None, default) -> tuple:
    if not values:
        return tuple(default)
    return tuple(dict.fromkeys(value for group in values for value in group))


def _available_memory_bytes(device: str) -> float:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return float(free)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return 1024.0 * int(line.split()[1])
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    batch, heads, head_dim = DEFAULT_SHAPE[device]
    quick = args.quick
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.1 if quick else 1.0)
    effort = Effort(min_run_time=min_run_time, min_samples=3 if quick else 10, max_seconds=2.0 if quick else 30.0,
                    slow_call_seconds=0.5 if quick else 5.0)
    if args.memory_budget_gib is not None:
        budget = args.memory_budget_gib * 2**30
    else:
        budget = 0.5 * _available_memory_bytes(device)
        if quick:  # keeps the smoke pass short: the causal prefix-sum compositions at N=1024 need 2 GiB
            budget = min(budget, QUICK_MEMORY_BUDGET_GIB * 2**30)
    return RunConfig(
        device=device,
        mechanisms=_flatten(args.mechanism, MECHANISMS),
        seq_lens=_flatten(args.n, QUICK_LENGTHS if quick else DEFAULT_LENGTHS[device]),
        modes=_flatten(args.mode, ("fwdbwd",)),
        dtypes=tuple(DTYPES[name] for name in _flatten(args.dtype, (DEFAULT_DTYPE[device],))),
        batch=args.batch or batch, heads=args.heads or heads, head_dim=args.head_dim or head_dim,
        block_size=args.block_size, random_blocks=args.random_blocks, kp=args.kp, features=args.features,
        effort=effort, memory_budget_bytes=budget, skip_compiled=quick,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config = config_from_args(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    metadata = run_metadata(config.device)
    writer = CsvWriter(out / "results.csv", metadata)
    try:
        result = run(config, progress=not args.no_progress, metadata=metadata, on_record=writer.write)
    finally:
        writer.close()
    table = format_table(result)
    print(table)
    (out / "summary.txt").write_text(table + "\n")
    plots = write_plots(result, out / "plots")
    if not args.no_quality:
        quality_config = QualityConfig(seq_len=args.quality_n or 1024, heads=4, head_dim=config.head_dim,
                                       block_size=config.block_size, seeds=3)
        if args.quick:
            quality_config = dataclasses.replace(
                quality_config, seq_len=args.quality_n or 512, heads=1, seeds=1, feature_counts=(64, 256, 1024),
                kps=(64, 256), random_blocks=(0, 1, 3))
        rows = approximation_quality(quality_config)
        print("\n" + format_quality(rows))
        write_quality_csv(rows, out / "quality.csv")
    print(f"\nwrote {out / 'results.csv'}, {out / 'summary.txt'}, {len(plots)} plots in {out / 'plots'}"
          + ("" if args.no_quality else f", {out / 'quality.csv'}") + f" ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
