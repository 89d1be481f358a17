"""fastattn's kernel benchmarks: every mechanism and backend against the peers (``python -m bench``).

Modules: ``workload`` (what is measured: cases, inputs, FLOP counts), ``providers`` (how each
provider's callable is built), ``correctness`` (the gate against fastattn.reference), ``measure``
(timing and peak memory), ``runner`` (the run), ``report`` (table, CSV, plots) and ``quality``
(approximation error against exact softmax attention).
"""
