"""Phase 1, the memory ceiling: hold a booted server, record what it holds, judge its headroom."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .backends import ServerHandle
from .backends.fit_params import compare
from .record_sections import LlamaProjection
from .matrix import SLO
from .records import (
    CeilingMemory, CeilingRecord, KvHeadroom, Predicted, PredictionCheck, ServerBuffers, SloBudgets, Verdict, header,
    parse,
)
from .verdicts import assert_slos, ceiling_verdicts, headroom_class


@dataclass(frozen=True)
class Ceiling:
    """What the ceiling measurement found, already recorded on the test report (``record`` is the
    JSON dict written to results.jsonl; ``typed`` the same record as a ``CeilingRecord``)."""

    record: dict[str, Any]
    verdicts: list[Verdict]

    @property
    def typed(self) -> CeilingRecord:
        return parse(self.record)  # type: ignore[return-value]

    def assert_slos(self) -> None:
        assert_slos(self.verdicts, self.record["config_id"])


def _mib(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _kv_headroom(handle: ServerHandle) -> dict[str, Any] | None:
    """The backend's own headroom rule (None: free memory after load is the rule)."""
    return handle.backend.headroom(handle.report, handle.config)


def build_ceiling(handle: ServerHandle, test_id: str, slo: SLO | None = None) -> tuple[CeilingRecord, list[Verdict]]:
    """The Phase-1 record for one booted config, and its headroom verdict.

    ``free_mib`` is the lowest free device memory seen from load through the hold window, so a
    brief dip is not hidden by a later reading. A backend that pre-allocates its KV pool (vLLM) is
    judged by the pool's capacity instead; free memory is still recorded.
    """
    cfg = handle.config
    slo = handle.profile.slo if slo is None else slo
    assert handle.after_load is not None and handle.sampler is not None
    tl = handle.sampler.timeline
    after = handle.after_load.device
    free_mib = min(after.free_mib, tl.min_free_mib if tl.min_free_mib is not None else after.free_mib)
    kv_headroom = _kv_headroom(handle)
    verdicts = ceiling_verdicts(free_mib, slo, kv_headroom, cfg.n)
    memory = CeilingMemory(
        probe=handle.probe.kind,
        device_total_mib=_mib(after.total_mib),
        baseline_used_mib=_mib(handle.baseline.device.used_mib if handle.baseline else None),
        used_after_load_mib=_mib(after.used_mib),
        free_after_load_mib=_mib(after.free_mib),
        free_mib=_mib(free_mib),
        peak_used_mib=_mib(tl.peak_used_mib),
        server_rss_mib=_mib(handle.after_load.server_rss_mib),
        host_available_min_mib=_mib(tl.min_host_available_mib),
        samples=len(tl.samples),
        server_report=ServerBuffers.from_dict(handle.report.as_dict()),
        kv_per_slot_mib=handle.report.kv_per_slot_mib(cfg.n),
        kv_headroom=None if kv_headroom is None else KvHeadroom.from_dict(kv_headroom),
        server_used_mib=_mib(after.server_mib), others_used_mib=_mib(after.baseline_mib),
        device_samples=len(tl.points), timeline=tl.downsampled(),
    )
    record = CeilingRecord(**header(handle, test_id), memory=memory, slo=SloBudgets(headroom_gib=slo.headroom_gib),
                           verdicts=tuple(verdicts), headroom_class=headroom_class(free_mib / 1024, slo))
    if handle.prediction is not None:
        from .prediction import prediction_error
        from .record_calibration import sample

        predicted = handle.prediction.as_dict()
        error = prediction_error(handle.prediction, sample(record))
        record = replace(record, memory=replace(
            memory, predicted=Predicted.from_dict(predicted),
            predicted_kv_per_slot_mib=predicted.get("kv_per_slot_mib"),
            prediction_error=PredictionCheck.from_dict(error)))
    if handle.projection is not None:
        record = replace(record, memory=replace(record.memory, llama_projection=_projection(handle, record)))
    return record, verdicts


def _projection(handle: ServerHandle, record: CeilingRecord) -> LlamaProjection:
    """llama.cpp's projection beside our prediction and the measured use (the prediction check's figure)."""
    mem = record.memory
    predicted = mem.predicted.total_mib if mem.predicted is not None else None
    total = mem.prediction_error.total if mem.prediction_error is not None else None
    measured = total.measured_mib if total is not None else None
    if measured is None and mem.used_after_load_mib is not None:
        measured = mem.used_after_load_mib - (mem.baseline_used_mib or 0.0) if handle.is_gpu else mem.used_after_load_mib
    return LlamaProjection.from_dict(compare(handle.projection.as_dict(), predicted, measured))


def ceiling_record(handle: ServerHandle, test_id: str, slo: SLO | None = None) -> tuple[dict[str, Any], list[Verdict]]:
    """``build_ceiling`` with the record as the JSON dict that travels on the test report."""
    record, verdicts = build_ceiling(handle, test_id, slo)
    return record.to_dict(), verdicts
