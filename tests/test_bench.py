"""The benchmark's own code: peers built right, FLOP counts, memory reset, the gate, and a tiny end-to-end run."""
from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

import fastattn
from bench import correctness
from bench.__main__ import main
from bench.measure import Timing, peak_memory
from bench.providers import PEERS, Prepared, reference_function
from bench.report import CSV_COLUMNS, format_dtype_speedups
from bench.runner import BASELINE, Record, add_speedups, timed_step
from bench.workload import Case, forward_flops, make_inputs

from tests.utils import describe_case

SMALL = Case("bigbird", 96, torch.float64, "cpu", batch=1, heads=2, head_dim=16, block_size=32, random_blocks=1,
             kp=24, features=32)
PROVIDERS = {provider.name: provider for provider in PEERS}


def _prepare(provider: str, case: Case, requires_grad: bool = False) -> tuple[Prepared, dict]:
    inputs = make_inputs(case)
    return PROVIDERS[provider].prepare(case, inputs, requires_grad), inputs


@pytest.mark.parametrize("mechanism", ("full", "bigbird", "linformer", "performer", "performer-causal"))
def test_torch_composition_matches_the_reference(mechanism):
    case = dataclasses.replace(SMALL, mechanism=mechanism)
    prepared, inputs = _prepare("torch-composition", case)
    expected = reference_function(case)(**inputs)
    torch.testing.assert_close(prepared.run(), expected, rtol=1e-9, atol=1e-9)


def test_linformer_package_computes_linformer_attention_on_x():
    case = dataclasses.replace(SMALL, mechanism="linformer")
    prepared, inputs = _prepare("linformer-pkg", case)
    width = case.heads * case.head_dim
    x = inputs["q"].transpose(1, 2).reshape(case.batch, case.seq_len, width)
    x_heads = x.reshape(case.batch, case.seq_len, case.heads, case.head_dim).transpose(1, 2)
    expected = fastattn.reference.linformer_attention(x_heads, x_heads, x_heads, inputs["proj_k"], inputs["proj_v"])
    torch.testing.assert_close(prepared.run(), expected.transpose(1, 2).reshape(case.batch, case.seq_len, width),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", (False, True), ids=("noncausal", "causal"))
def test_performer_pytorch_uses_the_same_features(causal):
    """Same projection and scaling as fastattn; only its additive epsilon (1e-4) separates the two.

    Small q and k keep every feature far above that epsilon (with unit Gaussians many keys' features fall below it).
    """
    case = dataclasses.replace(SMALL, mechanism="performer-causal" if causal else "performer")
    inputs = make_inputs(case)
    inputs["q"], inputs["k"] = inputs["q"] * 0.25, inputs["k"] * 0.25
    prepared = PROVIDERS["performer-pytorch"].prepare(case, inputs, False)
    expected = reference_function(case)(**inputs)
    torch.testing.assert_close(prepared.run().double(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("seq_len", (96, 200), ids=lambda n: describe_case(N=n))
def test_bigbird_flops_of_a_dense_layout_equal_full_attention(seq_len):
    blocks = -(-seq_len // SMALL.block_size)
    dense_bigbird = dataclasses.replace(SMALL, seq_len=blocks * SMALL.block_size, random_blocks=blocks)
    assert dense_bigbird.layout().density == 1.0
    assert forward_flops(dense_bigbird) == forward_flops(dataclasses.replace(dense_bigbird, mechanism="full"))


@pytest.mark.parametrize("mode", ("fwd", "bwd", "fwdbwd"))
def test_timed_step_of_each_mode(mode):
    """fwd builds no graph; bwd reuses one retained graph; fwdbwd runs both; gradients are autograd's."""
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=mode != "fwd")
    weight = torch.randn(3, 3, dtype=torch.float64)
    step = timed_step(Prepared(lambda: torch.tanh(x @ weight), (x,)), mode)
    first, second = step(), step()
    if mode == "fwd":
        assert not first.requires_grad
        torch.testing.assert_close(first, torch.tanh(x @ weight))
        return
    (grad_first,), (grad_second,) = first, second
    torch.testing.assert_close(grad_first, grad_second)
    assert grad_first.shape == x.shape and x.grad is None


def test_peak_memory_is_reset_between_calls():
    big, _ = peak_memory(lambda: torch.ones(64 * 2**20 // 4), "cpu")
    small, _ = peak_memory(lambda: torch.ones(2**20 // 4), "cpu")
    assert big.added_bytes >= 60 * 2**20
    assert small.added_bytes < 16 * 2**20


def test_gate_fails_a_wrong_kernel_and_its_speedup_is_not_reported(monkeypatch):
    case = dataclasses.replace(SMALL, mechanism="performer", dtype=torch.float32)

    def off_by_one_percent(case, backend):
        reference = reference_function(case)
        return lambda **inputs: reference(**inputs) * 1.01

    monkeypatch.setattr(correctness, "fastattn_function", off_by_one_percent)
    verdict = correctness.check_provider(case, "reference")
    assert verdict.forward.startswith("output: max error")
    assert not verdict.allows("fwd")
    timing = Timing(1.0, 0.9, 1.1, 10)
    records = [Record(case, BASELINE, "peer", "fwd", "n/a (peer)", timing=timing),
               Record(case, "fastattn-x", "fastattn", "fwd", verdict.describe("fwd"), timing=timing),
               Record(case, "fastattn-y", "fastattn", "fwd", correctness.PASSED, timing=timing)]
    add_speedups(records)
    assert [record.speedup for record in records] == [1.0, None, 1.0]


def test_matmul_fraction_is_the_flop_rate_over_the_matmul_rate():
    case = dataclasses.replace(SMALL, dtype=torch.float32)
    record = Record(case, "fastattn-cpu", "fastattn", "fwd", correctness.PASSED, timing=Timing(2.0, 1.9, 2.1, 10),
                    matmul_tflops=0.5)
    assert record.matmul_fraction == pytest.approx(record.tflops / 0.5)
    assert Record(case, "fastattn-cpu", "fastattn", "fwd", correctness.PASSED).matmul_fraction is None


def test_dtype_speedups_pair_each_measurement_with_its_float32_one():
    timings = {torch.float32: Timing(3.0, 2.9, 3.1, 10), torch.bfloat16: Timing(2.0, 1.9, 2.1, 10)}
    records = [Record(dataclasses.replace(SMALL, dtype=dtype), provider, "fastattn", "fwd", correctness.PASSED,
                      timing=timing)
               for dtype, timing in timings.items() for provider in ("fastattn-cpu", "sdpa-dense")]
    records.append(Record(dataclasses.replace(SMALL, dtype=torch.bfloat16, seq_len=192), "fastattn-cpu", "fastattn",
                          "fwd", correctness.PASSED, timing=timings[torch.bfloat16]))  # no float32 partner
    lines = format_dtype_speedups(records).splitlines()
    assert lines[1].split() == ["mechanism", "mode", "provider", "N", "dtype", "float32", "ms", "its", "ms",
                                "speed-up"]
    assert [line.split() for line in lines[2:]] == [
        ["bigbird", "fwd", provider, "96", "bfloat16", "3.000", "2.000", "1.50x"]
        for provider in ("fastattn-cpu", "sdpa-dense")]
    assert format_dtype_speedups(records[:2]) == ""  # one dtype: nothing to compare


def test_tiny_run_writes_csv_plots_and_quality(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton's interpreter would time nothing useful
    out = tmp_path / "bench"
    mechanisms = ("full", "bigbird", "linformer", "performer", "performer-causal")
    code = main(["--device", "cpu", "--quick", "--no-progress", "--mechanism", "full,bigbird,linformer",
                 "--mechanism", "performer,performer-causal", "--n", "128", "--n", "256", "--mode", "fwdbwd",
                 "--batch", "1", "--heads", "2", "--head-dim", "32", "--block-size", "32", "--random-blocks", "1",
                 "--kp", "32", "--features", "32", "--min-run-time", "0.01", "--quality-n", "128", "--out", str(out)])
    assert code == 0
    with open(out / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    measured = {(r["mechanism"], r["provider"], r["N"]) for r in rows if r["metric"] == "time_ms"}
    for mechanism in mechanisms:
        for n in ("128", "256"):
            assert (mechanism, "sdpa-dense", n) in measured
            assert (mechanism, "torch-composition", n) in measured
    assert ("bigbird", "hf-bigbird", "256") in measured  # N > (5 + 2r) * block size = 224
    assert ("linformer", "linformer-pkg", "128") in measured
    assert ("performer-causal", "performer-pytorch", "128") in measured
    skipped = {(r["provider"], r["N"]): r["note"] for r in rows if r["metric"] == "skipped"}
    assert "--quick" in skipped[("flex-attention", "128")]
    assert "224" in skipped[("hf-bigbird", "128")]
    for row in rows:
        if row["metric"] == "speedup_vs_sdpa" and row["value"]:
            assert row["correctness"] in ("passed", "n/a (peer)"), row
        if row["metric"] == "time_ms":
            assert float(row["p20"]) <= float(row["value"]) <= float(row["p80"]), row
    for mechanism in mechanisms:
        assert (out / "plots" / f"{mechanism}-fwdbwd-float32.png").stat().st_size > 0
    with open(out / "quality.csv", newline="") as handle:
        quality = list(csv.DictReader(handle))
    assert {row["mechanism"] for row in quality} == {"performer", "performer-causal", "linformer", "bigbird"}
    assert all(float(row["relative_error_mean"]) >= 0 for row in quality)
    # The roofline column: each measurement's FLOP rate over torch.matmul's in its dtype, measured at start-up.
    fractions = {(r["mechanism"], r["provider"], r["N"]): r for r in rows if r["metric"] == "matmul_fraction"}
    times = {(r["mechanism"], r["provider"], r["N"]): float(r["value"]) for r in rows if r["metric"] == "time_ms"}
    assert set(fractions) == set(times)
    bigbird = fractions[("bigbird", "fastattn-cpu", "256")]
    assert float(bigbird["value"]) > 0 and "torch.matmul in float32" in bigbird["note"]
    assert "sdpa-dense" in capsys.readouterr().out
    summary = (out / "summary.txt").read_text()
    assert "sdpa-dense" in summary and "of matmul" in summary
