"""The correctness gate: each fastattn provider against fastattn.reference on a small input, before timing.

It applies DESIGN's tolerance rule (fastattn.testing) to the output (forward) and to every gradient
(backward). A provider whose check fails still gets timed, but no speed-up is reported for it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from fastattn.testing import check_against_reference

from .providers import fastattn_function, fastattn_reasons, reference_function
from .workload import Case, differentiable_inputs, make_inputs

PASSED = "passed"


@dataclass(frozen=True)
class Verdict:
    """``forward`` and ``backward``: "passed", or why the check failed or could not run."""

    forward: str
    backward: str

    def allows(self, mode: str) -> bool:
        return self.forward == PASSED and (mode == "fwd" or self.backward == PASSED)

    def describe(self, mode: str) -> str:
        if self.allows(mode):
            return PASSED
        failed = self.forward if self.forward != PASSED else self.backward
        return failed if failed.startswith("declined") else f"failed: {failed}"


def gate_case(case: Case) -> Case:
    """The small shape the gate checks: two heads, a length of 2.5 blocks plus 5 (not a multiple of the block)."""
    return dataclasses.replace(case, seq_len=2 * case.block_size + case.block_size // 2 + 5, batch=2, heads=2)


def _on_device(function: Callable[..., Tensor], device: str) -> Callable[..., Tensor]:
    """``function`` run on ``device`` for CPU inputs, its output brought back (gradients flow through the copies)."""
    def moved(**inputs):
        return function(**{name: value.to(device) if isinstance(value, Tensor) else value
                           for name, value in inputs.items()}).cpu()
    return moved


def _check(case: Case, backend: str, backward: bool) -> str:
    # The reference and the tolerance rule run on the CPU (in float64); only the kernel runs on the case's device.
    inputs = make_inputs(dataclasses.replace(case, device="cpu"), seed=1)
    kernel = _on_device(fastattn_function(case, backend), case.device)
    try:
        check_against_reference(kernel, reference_function(case), inputs, case.dtype,
                                differentiable=differentiable_inputs(case.mechanism), backward=backward)
    except AssertionError as error:
        return str(error).splitlines()[0]
    except Exception as error:  # a kernel that raises fails the gate; the run goes on
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return PASSED


def check_provider(case: Case, backend: str) -> Verdict:
    """Forward and backward of fastattn's ``backend`` on the small version of ``case``, against the reference."""
    small = gate_case(case)
    reasons = fastattn_reasons(small, backend, make_inputs(small)["q"])
    if reasons:
        declined = f"declined: {'; '.join(reasons)}"
        return Verdict(declined, declined)
    forward = _check(small, backend, backward=False)
    backward = _check(small, backend, backward=True) if forward == PASSED else "forward failed"
    return Verdict(forward, backward)

