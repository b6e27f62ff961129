"""Phase 1, the memory ceiling: hold a booted server, record what it holds, judge its headroom."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backends import ServerHandle
from .matrix import SLO
from .records import header, verdict_dicts
from .verdicts import Verdict, assert_slos, headroom, headroom_class


@dataclass(frozen=True)
class Ceiling:
    """What the ceiling measurement found, already recorded on the test report."""

    record: dict[str, Any]
    verdicts: list[Verdict]

    def assert_slos(self) -> None:
        assert_slos(self.verdicts, self.record["config_id"])


def ceiling_record(handle: ServerHandle, test_id: str, slo: SLO | None = None) -> tuple[dict[str, Any], list[Verdict]]:
    """The Phase-1 record for one booted config, and its headroom verdict.

    ``free_mib`` is the lowest free device memory seen from load through the hold window, so a
    brief dip is not hidden by a later reading.
    """
    cfg = handle.config
    slo = handle.profile.slo if slo is None else slo
    assert handle.after_load is not None and handle.sampler is not None
    tl = handle.sampler.timeline
    after = handle.after_load.device
    free_mib = min(after.free_mib, tl.min_free_mib if tl.min_free_mib is not None else after.free_mib)
    verdict = headroom(free_mib, slo)
    verdicts = [verdict]
    kv_headroom = None
    if cfg.backend == "vllm":
        # vLLM pre-allocates its KV pool, so free memory after load says nothing about N x ctx:
        # the pool's capacity in concurrent full-length sequences must reach N.
        from .backends import vllm

        # Free memory is still recorded; it is the verdict only when vLLM did not report its pool.
        kv_headroom = vllm.headroom(handle.report, cfg)  # type: ignore[arg-type]
        if kv_headroom["kv_capacity_sequences"] is not None:
            verdicts = [Verdict("KV capacity (concurrent full-length sequences)",
                                kv_headroom["kv_capacity_sequences"], float(cfg.n), "seq")]
    record = header(handle, test_id, "ceiling")
    record |= {
        "memory": {
            "probe": handle.probe.kind,
            "device_total_mib": _mib(after.total_mib),
            "baseline_used_mib": _mib(handle.baseline.device.used_mib if handle.baseline else None),
            "used_after_load_mib": _mib(after.used_mib),
            "free_after_load_mib": _mib(after.free_mib),
            "free_mib": _mib(free_mib),
            "peak_used_mib": _mib(tl.peak_used_mib),
            "server_rss_mib": _mib(handle.after_load.server_rss_mib),
            "host_available_min_mib": _mib(tl.min_host_available_mib),
            "samples": len(tl.samples),
            "server_report": handle.report.as_dict(),
            "kv_per_slot_mib": handle.report.kv_per_slot_mib(cfg.n),
        },
        "slo": {"headroom_gib": slo.headroom_gib},
        "verdicts": verdict_dicts(verdicts),
        "headroom_class": headroom_class(free_mib / 1024, slo),
    }
    if handle.prediction is not None:
        from .prediction import prediction_error

        record["memory"]["predicted"] = handle.prediction.as_dict()
        record["memory"]["predicted_kv_per_slot_mib"] = record["memory"]["predicted"].get("kv_per_slot_mib")
        record["memory"]["prediction_error"] = prediction_error(handle.prediction, record)
    if kv_headroom is not None:
        record["memory"]["kv_headroom"] = kv_headroom
    return record, verdicts
