"""The search record's boundary section (``SearchRecord.boundary``): one row per axis of each family."""

from __future__ import annotations

from dataclasses import dataclass

from .record_sections import Section, opt


@dataclass(frozen=True, kw_only=True)
class SearchBoundary(Section):
    """Along one axis (``n`` or ``ctx``) of one family (cache type, ``+mmproj``): the last passing and
    first failing config, and the SLO that failed there (``search_boundary.BoundaryPoint``)."""

    axis: str | None = None
    family: str | None = None
    last_pass: str | None = None
    first_fail: str | None = None
    first_fail_status: str | None = opt()
    binding_slo: str | None = None
    failed_verdicts: list[str] | None = opt()


__all__ = ["SearchBoundary"]
