"""The run's outputs: a table on the terminal, a long-format CSV and PNG plots of time and memory against N."""
from __future__ import annotations

import csv
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .runner import Record, RunResult  # noqa: E402

CSV_COLUMNS = ("mechanism", "provider", "mode", "dtype", "B", "H", "N", "D", "options", "metric", "value", "p20",
               "p80", "correctness", "note", "device", "torch_version", "git_revision", "timestamp")
MIB = 2**20


def _group_key(record: Record) -> tuple[str, str, str]:
    return record.case.mechanism, record.case.dtype_name, record.mode


def _metrics(record: Record) -> list[tuple[str, float | None, float | None, float | None, str]]:
    """(metric, value, p20, p80, note) rows of one record."""
    if record.timing is None:
        return [("skipped", None, None, None, record.skipped or "")]
    timing, tflops = record.timing, record.tflops
    # Throughput's 20th percentile comes from the time's 80th, and the other way round.
    scale = tflops * timing.median_ms
    rows = [
        ("time_ms", timing.median_ms, timing.p20_ms, timing.p80_ms, ""),
        ("tflops", tflops, scale / timing.p80_ms, scale / timing.p20_ms, ""),
        ("peak_mem_mib", record.memory.peak_bytes / MIB, None, None, ""),
        ("added_mem_mib", record.memory.added_bytes / MIB, None, None, ""),
    ]
    if record.matmul_fraction is not None:
        rows.append(("matmul_fraction", record.matmul_fraction, None, None,
                     f"of {record.matmul_tflops:.4g} TFLOP/s, torch.matmul in {record.case.dtype_name}"))
    if record.speedup is not None:
        rows.append(("speedup_vs_sdpa", record.speedup, None, None, ""))
    elif record.family == "fastattn" and record.correctness != "passed":
        rows.append(("speedup_vs_sdpa", None, None, None, f"not reported: correctness {record.correctness}"))
    return rows


class CsvWriter:
    """results.csv, one record at a time and flushed, so that a run cut short keeps the rows it wrote."""

    def __init__(self, path: Path, metadata: dict[str, str]):
        self._handle = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._handle, CSV_COLUMNS)
        self._writer.writeheader()
        self._metadata = metadata

    def write(self, record: Record) -> None:
        case, meta = record.case, self._metadata
        for metric, value, p20, p80, note in _metrics(record):
            self._writer.writerow({
                "mechanism": case.mechanism, "provider": record.provider, "mode": record.mode,
                "dtype": case.dtype_name, "B": case.batch, "H": case.heads, "N": case.seq_len, "D": case.head_dim,
                "options": case.options, "metric": metric, "value": _number(value), "p20": _number(p20),
                "p80": _number(p80), "correctness": record.correctness, "note": note, "device": meta["device"],
                "torch_version": meta["torch_version"], "git_revision": meta["git_revision"],
                "timestamp": meta["timestamp"],
            })
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _cells(record: Record) -> list[str]:
    if record.timing is None:
        reason = record.skipped or ""
        return [record.provider, str(record.case.seq_len), "skipped: " + (reason[:90] + "..." if len(reason) > 93 else reason)]
    timing = record.timing
    speedup = f"{record.speedup:.2f}x" if record.speedup is not None else "-"
    check = "" if record.family != "fastattn" else record.correctness[:40]
    fraction = f"{record.matmul_fraction:.2f}" if record.matmul_fraction is not None else "-"
    return [record.provider, str(record.case.seq_len), f"{timing.median_ms:.3f}",
            f"{timing.p20_ms:.3f}-{timing.p80_ms:.3f}", f"{record.tflops:.3f}", fraction,
            f"{record.memory.added_bytes / MIB:.1f}", f"{record.memory.peak_bytes / MIB:.0f}", speedup, check]


def _column_widths(rows: list[list[str]]) -> list[int]:
    return [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]


def _aligned(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths))


def format_table(result: RunResult) -> str:
    """One table per (mechanism, dtype, mode): a row per provider and N."""
    header = ["provider", "N", "median ms", "p20-p80 ms", "TFLOP/s", "of matmul", "added MiB", "peak MiB", "vs SDPA",
              "check"]
    blocks = [f"device: {result.metadata['device']} | torch {result.metadata['torch_version']} | "
              f"fastattn {result.metadata['git_revision']}"]
    if "matmul_tflops" in result.metadata:
        blocks.append(f"of matmul: TFLOP/s over torch.matmul's in the same dtype ({result.metadata['matmul_tflops']} "
                      "TFLOP/s, measured at start-up)")
    # fastattn backends that cannot run here at all (no kernel, other device) are in the CSV, not in the table.
    hidden = [r for r in result.records if r.timing is None and r.correctness.startswith("declined")]
    shown = [r for r in result.records if r.timing is not None or not r.correctness.startswith("declined")]
    if hidden:
        names = ", ".join(dict.fromkeys(r.provider for r in hidden))
        blocks.append(f"not shown where they decline to run (reasons in the CSV): {names}")
    records = sorted(shown, key=lambda r: (_group_key(r), r.case.seq_len))
    for (mechanism, dtype, mode), group in itertools.groupby(records, key=_group_key):
        group = list(group)
        case = group[0].case
        rows = [_cells(record) for record in group]
        measured = [row for row in rows if len(row) == len(header)]
        widths = _column_widths([header] + measured)
        title = f"{mechanism} | {mode} | {dtype} | B={case.batch} H={case.heads} D={case.head_dim} {case.options}"
        lines = [title, _aligned(header, widths)]
        for row in rows:
            if len(row) == len(header):
                lines.append(_aligned(row, widths))
            else:
                lines.append(_aligned(row[:2], widths) + "  " + row[2])
        blocks.append("\n".join(lines))
    speedups = format_dtype_speedups(shown)
    if speedups:
        blocks.append(speedups)
    return "\n\n".join(blocks)


def format_dtype_speedups(records: list[Record]) -> str:
    """Each measurement in another dtype against the same one in float32, both timed by this run ("" when it
    ran one dtype): the ratio of two figures from one process, which move less than figures from two runs."""
    times = {(r.case.mechanism, r.mode, r.provider, r.case.seq_len, r.case.dtype_name): r.timing.median_ms
             for r in records if r.timing is not None}
    header = ["mechanism", "mode", "provider", "N", "dtype", "float32 ms", "its ms", "speed-up"]
    rows = [[mechanism, mode, provider, str(n), dtype, f"{times[(mechanism, mode, provider, n, 'float32')]:.3f}",
             f"{ms:.3f}", f"{times[(mechanism, mode, provider, n, 'float32')] / ms:.2f}x"]
            for (mechanism, mode, provider, n, dtype), ms in sorted(times.items())
            if dtype != "float32" and (mechanism, mode, provider, n, "float32") in times]
    if not rows:
        return ""
    widths = _column_widths([header] + rows)
    lines = ["speed-up over float32 (float32 time / time in the dtype, both from this run)"]
    lines += [_aligned(row, widths) for row in [header] + rows]
    return "\n".join(lines)


def write_plots(result: RunResult, directory: Path) -> list[Path]:
    """Per (mechanism, mode, dtype): median time and added memory against N, one line per provider."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    records = sorted(result.records, key=lambda r: (_group_key(r), r.provider, r.case.seq_len))
    for (mechanism, dtype, mode), group in itertools.groupby(records, key=_group_key):
        group = list(group)
        case = group[0].case
        figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
        for provider, points in itertools.groupby(group, key=lambda r: r.provider):
            measured = [r for r in points if r.timing is not None]
            if not measured:
                continue
            lengths = [r.case.seq_len for r in measured]
            marker = "o-" if measured[0].family == "fastattn" else "s--"
            (line,) = time_axis.plot(lengths, [r.timing.median_ms for r in measured], marker, label=provider)
            time_axis.fill_between(lengths, [r.timing.p20_ms for r in measured], [r.timing.p80_ms for r in measured],
                                   color=line.get_color(), alpha=0.2)
            memory_axis.plot(lengths, [max(r.memory.added_bytes / MIB, 1e-2) for r in measured], marker,
                             color=line.get_color(), label=provider)
        for axis, label in ((time_axis, "median time (ms), band: p20-p80"),
                            (memory_axis, "memory added by the call (MiB)")):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("sequence length N")
            axis.set_ylabel(label)
            axis.grid(True, which="both", alpha=0.3)
        time_axis.legend(fontsize=8)
        figure.suptitle(f"{mechanism} {mode} {dtype} | B={case.batch} H={case.heads} D={case.head_dim} "
                        f"{case.options} | {result.metadata['device']}", fontsize=9)
        figure.tight_layout()
        path = directory / f"{mechanism}-{mode}-{dtype}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
