"""Headline figures as pytest-benchmark entries, so ``--benchmark-json``/``--benchmark-autosave`` save
them and ``pytest-benchmark compare`` tracks them across runs.

pytest-benchmark compares time-like statistics, so only time-like figures become entries: boot
seconds, latency percentiles, and seconds per 1,000 generated tokens (the inverse of throughput, so a
regression is an increase like every other entry). Memory figures travel in ``extra_info``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

import pytest

from .records import Record, as_record, headline, record_name


def _time_like(record: Record) -> dict[str, float]:
    figures = headline(record)
    out = {k: v for k, v in figures.items() if k.endswith("_s")}
    if figures.get("agg_tps"):
        out["s_per_1k_tokens"] = 1000.0 / figures["agg_tps"]
    return out


def add_record(config: pytest.Config, record: Record | Mapping[str, Any]) -> int:
    """Append one benchmark entry per time-like figure of ``record``; returns how many were added."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or getattr(session, "disabled", False):
        return 0
    if not (getattr(session, "json", None) or getattr(session, "save", None) or getattr(session, "autosave", None)):
        return 0  # only when the run saves benchmarks: keeps plain runs free of benchmark tables
    try:
        from pytest_benchmark.stats import Metadata
    except ImportError:  # pragma: no cover - pytest-benchmark is a dependency
        return 0
    added = 0
    record = as_record(record)
    extra = {k: v for k, v in headline(record).items() if not k.endswith("_s")}
    for metric, value in _time_like(record).items():
        name = f"gpucap[{record_name(record)}::{metric}]"
        fixture = SimpleNamespace(name=name, fullname=f"{record.test}::{metric}", group=f"gpucap {metric}",
                                  param=record.config_id, params={"config": record.config_id},
                                  extra_info={"outcome": record.outcome, **extra},
                                  cprofile_stats=None, has_error=False)
        meta = Metadata(fixture, iterations=1, options={"source": "pytest-gpucap"})
        meta.stats.update(value)
        session.benchmarks.append(meta)
        added += 1
    return added
