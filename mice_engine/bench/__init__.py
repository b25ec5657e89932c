"""Benchmark suites: MICE against its baselines on the same data and hardware, in one run.

:func:`load_suite` reads a suite file (see :mod:`mice_engine.bench.suite` for its format) and
:func:`run_suite` runs it into a results folder: ``record.json`` with every number, the
hardware, library versions, git commit and seed; ``report.md``; PNG plots; TREC runs.
"""

from .runner import BenchOptions, check_suite, run_suite
from .suite import BenchError, Suite, load_suite

__all__ = ["BenchError", "BenchOptions", "Suite", "check_suite", "load_suite", "run_suite"]
