"""Prometheus text exposition, parsed once for every backend's ``/metrics``.

``prometheus_client``'s own parser handles labels, escapes, timestamps and ``# HELP``/``# TYPE``
lines, so neither backends nor the workload keep a hand-written one. A malformed exposition yields
every well-formed sample instead of nothing: the page is re-read line by line, skipping the bad one.
"""

from __future__ import annotations

from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families


class Sample(NamedTuple):
    """One sample: full name (``…_total``, ``…_bucket``), labels, value."""

    name: str
    labels: dict[str, str]
    value: float


def parse_samples(text: str) -> list[Sample]:
    """Every sample of a ``/metrics`` page, in page order."""
    try:
        return _parse(text)
    except _PARSE_ERRORS:
        out: list[Sample] = []
        for line in text.splitlines():
            if line.strip() and not line.startswith("#"):
                try:
                    out.extend(_parse(line + "\n"))
                except _PARSE_ERRORS:
                    continue
        return out


_PARSE_ERRORS = (ValueError, TypeError, IndexError)


def _parse(text: str) -> list[Sample]:
    return [Sample(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def sums(text: str) -> dict[str, float]:
    """Sum of samples per metric name (label sets, e.g. one per engine, added together)."""
    out: dict[str, float] = {}
    for s in parse_samples(text):
        out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def labels_of(text: str, name: str) -> dict[str, str]:
    """Labels of the first sample called ``name`` (info-style gauges carry their facts as labels)."""
    return next((s.labels for s in parse_samples(text) if s.name == name), {})
