"""The run: the correctness gate, then every (mechanism, dtype, N, mode, provider) measured in turn."""
from __future__ import annotations

import datetime
import gc
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .correctness import PASSED, Verdict, check_provider
from .measure import Effort, Memory, Timing, matmul_rate, peak_memory, time_call, time_slow_call, timed
from .providers import Declined, Prepared, Provider, all_providers
from .workload import Case, flops, make_inputs

BASELINE = "sdpa-dense"
NOT_GATED = "n/a (peer)"


@dataclass(frozen=True)
class RunConfig:
    device: str
    mechanisms: tuple[str, ...]
    seq_lens: tuple[int, ...]
    modes: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    batch: int
    heads: int
    head_dim: int
    block_size: int
    random_blocks: int
    kp: int
    features: int
    effort: Effort
    memory_budget_bytes: float
    skip_compiled: bool = False  # --quick: leave out providers that compile for each shape

    def case(self, mechanism: str, seq_len: int, dtype: torch.dtype) -> Case:
        return Case(mechanism, seq_len, dtype, self.device, self.batch, self.heads, self.head_dim, self.block_size,
                    self.random_blocks, self.kp, self.features)


@dataclass
class Record:
    """One provider on one case and mode: measured (timing, memory) or skipped (with the reason)."""

    case: Case
    provider: str
    family: str
    mode: str
    correctness: str
    timing: Timing | None = None
    memory: Memory | None = None
    skipped: str | None = None
    speedup: float | None = None
    matmul_tflops: float | None = None  # the machine's matmul rate in the case's dtype (the roofline)

    @property
    def tflops(self) -> float | None:
        return None if self.timing is None else flops(self.case, self.mode) / (self.timing.median_ms * 1e-3) / 1e12

    @property
    def matmul_fraction(self) -> float | None:
        """The effective FLOP rate as a fraction of the machine's matmul rate in the same dtype."""
        if self.timing is None or self.matmul_tflops is None:
            return None
        return self.tflops / self.matmul_tflops


@dataclass
class RunResult:
    records: list[Record]
    verdicts: dict[tuple[str, str, str], Verdict]
    metadata: dict[str, str] = field(default_factory=dict)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                  check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return revision + ("-dirty" if dirty else "")


def timed_step(prepared: Prepared, mode: str) -> Callable[[], object]:
    """The timed call: a forward without autograd, a backward over a retained graph, or both."""
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return prepared.run()
        return forward
    out = prepared.run()
    grad_out = torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, prepared.leaves, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(prepared.run(), prepared.leaves, grad_out)


def measure_provider(provider: Provider, case: Case, inputs: dict, mode: str, config: RunConfig) -> tuple[Timing, Memory]:
    """Warm up, then peak memory of one call and the timing; raises Declined or whatever the call raises."""
    unavailable = provider.unavailable()
    if unavailable is not None:
        raise Declined(unavailable)
    if provider.memory_estimate is not None:
        needed = provider.memory_estimate(case, mode)
        if needed > config.memory_budget_bytes:
            raise Declined(f"needs about {needed / 2**30:.1f} GiB, over the memory budget of "
                           f"{config.memory_budget_bytes / 2**30:.1f} GiB (--memory-budget-gib)")
    step = timed_step(provider.prepare(case, inputs, mode != "fwd"), mode)
    effort = config.effort
    if provider.compiles:
        timed(step, case.device)
    memory, seconds = peak_memory(step, case.device)
    if seconds >= effort.slow_call_seconds:
        # Lazy initialisation is noise against seconds: this first call counts, as memory and first sample.
        return time_slow_call(step, case.device, effort, seconds), memory
    memory, _ = peak_memory(step, case.device)
    return time_call(step, case.device, effort), memory


def _release(device: str, *, collect: bool) -> None:
    """Return the cached device memory; ``collect`` also runs the (slow, ~0.3 s) cycle collector."""
    if collect:
        gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _first_line(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"


def run_gate(config: RunConfig, providers: tuple[Provider, ...], note: Callable[[str], None]) -> dict:
    """Verdicts per (provider, mechanism, dtype); printed one line per provider where they all agree."""
    verdicts = {}
    for provider in providers:
        if provider.family != "fastattn":
            continue
        backend = provider.name.removeprefix("fastattn-")
        lines = []
        for mechanism in config.mechanisms:
            if mechanism not in provider.mechanisms:
                continue
            for dtype in config.dtypes:
                case = config.case(mechanism, config.seq_lens[0], dtype)
                verdict = check_provider(case, backend)
                verdicts[(provider.name, mechanism, case.dtype_name)] = verdict
                lines.append((f"{mechanism} {case.dtype_name}",
                              f"forward {verdict.forward} | backward {verdict.backward}"))
        if lines and all(verdict.forward.startswith("declined") for key, verdict in verdicts.items()
                         if key[0] == provider.name):
            note(f"gate {provider.name}: declined everywhere, e.g. {lines[0][0]}: {lines[0][1].split(' | ')[0]}")
            continue
        for where, outcome in lines:
            note(f"gate {provider.name} {where}: {outcome}")
    return verdicts


def run(config: RunConfig, *, progress: bool = True, note: Callable[[str], None] = tqdm.write,
        metadata: dict[str, str] | None = None, on_record: Callable[[Record], None] | None = None) -> RunResult:
    """Gate, then measure every task; ``on_record`` sees each record as soon as it is complete."""
    # The baseline goes first in every group, so each record's speed-up is known when it is handed on.
    providers = tuple(sorted(all_providers(), key=lambda p: p.name != BASELINE))
    metadata = metadata or run_metadata(config.device)
    for provider in providers:
        reason = provider.unavailable()
        if reason is not None:
            note(f"skipping {provider.name}: {reason}")
    verdicts = run_gate(config, providers, note)
    matmul_tflops = matmul_rates(config)
    for dtype, rate in matmul_tflops.items():
        note(f"matmul rate {str(dtype).removeprefix('torch.')}: {rate:.3f} TFLOP/s (the roofline of column 'of matmul')")
    metadata["matmul_tflops"] = ", ".join(f"{str(dtype).removeprefix('torch.')} {rate:.3f}"
                                          for dtype, rate in matmul_tflops.items())
    tasks = [(mechanism, dtype, n, mode, provider)
             for mechanism in config.mechanisms for dtype in config.dtypes for n in config.seq_lens
             for mode in config.modes for provider in providers if mechanism in provider.mechanisms]
    records: list[Record] = []
    baselines: dict[tuple, tuple[Timing, Memory] | str] = {}
    noted: set[tuple[str, str]] = set()
    inputs_key, inputs = None, None
    for mechanism, dtype, n, mode, provider in tqdm(tasks, desc="bench", disable=not progress, dynamic_ncols=True):
        case = config.case(mechanism, n, dtype)
        if inputs_key != (mechanism, dtype, n):
            inputs = None
            _release(config.device, collect=True)
            inputs_key, inputs = (mechanism, dtype, n), make_inputs(case)
        verdict = verdicts.get((provider.name, mechanism, case.dtype_name))
        correctness = NOT_GATED if verdict is None else verdict.describe(mode)
        record = Record(case, provider.name, provider.family, mode, correctness, matmul_tflops=matmul_tflops[dtype])
        # Dense SDPA does the same work for every mechanism: measured once per (causal, dtype, N, mode).
        baseline_key = (case.causal, dtype, n, mode) if provider.name == BASELINE else None
        try:
            if provider.compiles and config.skip_compiled:
                raise Declined("not run with --quick: it compiles for tens of seconds per shape")
            if baseline_key is not None and baseline_key in baselines:
                outcome = baselines[baseline_key]
                if isinstance(outcome, str):
                    raise Declined(outcome)
                record.timing, record.memory = outcome
            else:
                record.timing, record.memory = measure_provider(provider, case, inputs, mode, config)
                if baseline_key is not None:
                    baselines[baseline_key] = (record.timing, record.memory)
        except Exception as error:  # any failure of one provider is recorded and the run goes on
            record.skipped = str(error) if isinstance(error, Declined) else _first_line(error)
            if baseline_key is not None:
                baselines[baseline_key] = record.skipped
            gate_declined = verdict is not None and verdict.forward.startswith("declined")
            if (provider.name, record.skipped) not in noted and not gate_declined:
                noted.add((provider.name, record.skipped))
                note(f"skipped {provider.name} on {mechanism} {case.dtype_name} N={n} {mode}: {record.skipped}")
        finally:
            _release(config.device, collect=False)
        baseline = baselines.get((case.causal, dtype, n, mode))
        record.speedup = speedup(record, baseline[0] if isinstance(baseline, tuple) else None)
        records.append(record)
        if on_record is not None:
            on_record(record)
    inputs = None
    return RunResult(records, verdicts, metadata)


def matmul_rates(config: RunConfig) -> dict[torch.dtype, float]:
    """The machine's matmul rate in TFLOP/s per dtype of the run, measured once at start-up."""
    effort = Effort(min_run_time=min(config.effort.min_run_time, 0.5), min_samples=3, max_seconds=5.0,
                    slow_call_seconds=config.effort.slow_call_seconds)
    return {dtype: matmul_rate(dtype, config.device, effort) / 1e12 for dtype in config.dtypes}


def run_metadata(device: str) -> dict[str, str]:
    return {
        "device": device_name(device),
        "torch_version": torch.__version__,
        "git_revision": git_revision(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def speedup(record: Record, baseline: Timing | None) -> float | None:
    """Dense SDPA's median over the record's, except for a fastattn provider that did not pass the gate."""
    trusted = record.family != "fastattn" or record.correctness == PASSED
    if record.timing is None or baseline is None or not trusted:
        return None
    return baseline.median_ms / record.timing.median_ms


def add_speedups(records: list[Record]) -> None:
    """Speed-ups of ``records`` against the dense SDPA records among them with the same case and mode."""
    baseline = {(r.case, r.mode): r.timing for r in records if r.provider == BASELINE}
    for record in records:
        record.speedup = speedup(record, baseline.get((record.case, record.mode)))
