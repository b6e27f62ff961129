"""``--gpucap-repeat K``: on a noisy host each workload runs K times and is recorded once.

One run's tok/s or p95 on a shared or thermally throttled host can move by more than the regression
threshold between two identical sessions. Repeating the workload gives the record the median run's
metrics (a real run, so its sections agree with each other) plus, per tracked figure, the median
and the range over the runs (``RepeatSpread``); the gate (``compare``) then judges a change only
beyond the larger of the threshold and that measured spread.
"""

from __future__ import annotations

import copy
import functools
import statistics
from dataclasses import replace
from typing import Any, Callable, TypeVar

from .records import TRACKED, WorkloadRecord, parse
from .record_sections import FigureSpread, RepeatSpread, WorkloadMemory

F = TypeVar("F", bound=Callable[..., Any])
WORKLOAD_FIGURES = tuple(f for f in TRACKED if f.kind == "workload")


def median_index(runs: list[WorkloadRecord]) -> int:
    """The run the record reports: the median by aggregate tok/s (the lower middle for an even K)."""
    order = sorted(range(len(runs)), key=lambda i: runs[i].metrics.agg_tps or 0.0)
    return order[(len(runs) - 1) // 2]


def spread(runs: list[WorkloadRecord]) -> RepeatSpread:
    """Per tracked workload figure: the median, min, max and every run's value."""
    per_name: dict[str, list[float]] = {}
    for run in runs:
        for fig in WORKLOAD_FIGURES:
            for name, value in fig.values(run).items():
                if value is not None:
                    per_name.setdefault(name, []).append(value)
    figures = {name: FigureSpread(median=round(statistics.median(vals), 4), min=min(vals), max=max(vals),
                                  values=vals)
               for name, vals in per_name.items()}
    return RepeatSpread(runs=len(runs), median_run=median_index(runs), figures=figures)


def combine(runs: list[WorkloadRecord]) -> WorkloadRecord:
    """One record for K runs: the median run's metrics and verdicts, the lowest free memory any run
    saw, every run's memory readings (one timeline), and the spread of every tracked figure."""
    mid = runs[median_index(runs)]
    mins = [r.memory.min_free_mib for r in runs if r.memory.min_free_mib is not None]
    peaks = [r.memory.peak_server_rss_mib for r in runs if r.memory.peak_server_rss_mib is not None]
    timeline = sorted(({**p, "run": i + 1} for i, r in enumerate(runs) for p in r.memory.timeline or ()),
                      key=lambda p: p.get("t", 0.0))
    memory = WorkloadMemory(free_at_boot_mib=mid.memory.free_at_boot_mib, min_free_mib=min(mins, default=None),
                            peak_server_rss_mib=max(peaks, default=None), timeline=timeline or None)
    return replace(mid, memory=memory, repeat=spread(runs), _keys=None)


def repeated(method: F) -> F:
    """Run a ``Harness`` load method ``harness.repeat`` times and record one combined record.

    The runs record into a collector; a run that raises (the server died, the watchdog stopped it)
    ends the repetition, and its own record is the one kept, so the write-up shows why."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        k = max(1, int(getattr(self, "repeat", 1) or 1))
        if k == 1:
            return method(self, *args, **kwargs)
        collected: list[dict[str, Any]] = []
        twin = copy.copy(self)
        twin._record = collected.append
        results = []
        try:
            for _ in range(k):
                results.append(method(twin, *args, **kwargs))
                self._cpt = twin._cpt
        except BaseException:
            if len(collected) > len(results):
                self._record(collected[-1])
            raise
        runs = [parse(r.record) for r in results]
        combined = combine(runs)  # type: ignore[arg-type]
        record = combined.to_dict()
        self._record(record)
        return replace(results[median_index(runs)], record=record)  # type: ignore[arg-type]
    return wrapper  # type: ignore[return-value]
