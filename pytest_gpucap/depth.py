"""The depth sweep on a booted server: run it, judge it, record it.

``depth_sweep(handle, slo, test_id, record)`` is a plain function so a capacity search can run it on
its probes; ``Harness.depth_sweep`` calls it with the test's SLO and recorder. The judgement is the
``min_depth_ratio`` SLO (decode tok/s deepest ÷ shallowest) and, optionally, a decode tok/s floor at
the deepest depth (``min_depth_decode_tps``); both are speed SLOs, so a config that fits in memory but
fails them reads "fits, too slow" (``capacity_verdict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .backends import ServerError, ServerHandle
from .budgets import SLO
from .record_depth import DepthPoint, DepthRecord
from .records import SloBudgets, Verdict, header, parse
from .verdicts import assert_slos
from .workload.depth import DEFAULT_DEPTHS, DepthPlan, TokenCounter, decode_ratio, sweep

DEPTH_RATIO_VERDICT = "depth decode ratio (deepest ÷ shallowest)"
DEPTH_DECODE_VERDICT = "decode tok/s at the deepest depth"


@dataclass
class DepthResult:
    """A depth sweep's record (the JSON dict written to results.jsonl) and its verdicts."""

    record: dict[str, Any]
    verdicts: list[Verdict]

    @property
    def typed(self) -> DepthRecord:
        return parse(self.record)  # type: ignore[return-value]

    @property
    def points(self) -> list[dict[str, Any]]:
        return self.record["points"]

    def assert_slos(self) -> None:
        assert_slos(self.verdicts, f"{self.record['config_id']} depth sweep")


def depth_verdicts(points: Sequence[dict[str, Any]], ratio: float | None, slo: SLO) -> list[Verdict]:
    """The depth SLOs: the decode ratio (a sweep that measured no ratio breaches it) and the floor."""
    out = []
    if slo.min_depth_ratio is not None:
        out.append(Verdict(DEPTH_RATIO_VERDICT if ratio is not None else DEPTH_RATIO_VERDICT + " (not measured)",
                           ratio if ratio is not None else 0.0, slo.min_depth_ratio, "x"))
    deepest = max((p for p in points if not p.get("error")), key=lambda p: p["depth_pct"], default=None)
    if slo.min_depth_decode_tps is not None:
        tps = (deepest or {}).get("decode_tps")
        out.append(Verdict(DEPTH_DECODE_VERDICT, float(tps or 0.0), slo.min_depth_decode_tps, "tok/s"))
    return out


def slot_context(handle: ServerHandle) -> int:
    """The context one slot holds: what the server reported at boot, else the config's ctx."""
    return int(getattr(handle.report, "n_ctx_slot", None) or handle.config.ctx)


def depth_sweep(handle: ServerHandle, slo: SLO, test_id: str, record: Callable[[dict[str, Any]], None] | None = None,
                depths: Sequence[float] = DEFAULT_DEPTHS, max_tokens: int = 16, seed: int = 0,
                ctx_tokens: int | None = None, progress: Callable[[str], None] | None = None) -> DepthResult:
    """The same request at each depth (percent of the slot's context, or of ``ctx_tokens`` when that
    is smaller: a CPU profile cannot prefill a 16K slot in seconds), recorded once.

    Raises ServerError (after recording) when the server died during the sweep."""
    backend = handle.backend
    kw = backend.client_options(handle)
    slot = slot_context(handle)
    ctx = max(64, min(slot, ctx_tokens) if ctx_tokens else slot)
    plan = DepthPlan(url=handle.url, ctx_slot=ctx, depths=tuple(depths), max_tokens=max_tokens, seed=seed,
                     api_key=kw.get("api_key", handle.api_key), model=kw.get("model", "gpucap"),
                     no_cache=handle.config.backend == "llamacpp")
    count = TokenCounter(handle.url, lambda text: backend.tokenize_request(handle, text), plan.api_key)
    label = f"{handle.config.id} depth"
    points = sweep(plan, count, progress=(lambda line: progress(f"{label}: {line}")) if progress else None)
    ratio = decode_ratio(points)
    verdicts = depth_verdicts(points, ratio, slo)
    typed = DepthRecord(**header(handle, test_id), ctx_slot=slot, swept_ctx=ctx, max_tokens=max_tokens,
                        points=tuple(DepthPoint.from_dict(p) for p in points), decode_ratio=ratio,
                        slo=SloBudgets.of(slo), verdicts=tuple(verdicts),
                        extra={"tokenize_calls": count.calls, "seed": seed})
    rec = typed.to_dict()
    if record is not None:
        record(rec)
    try:
        handle.check_alive()
    except ServerError as exc:
        raise ServerError(f"depth sweep on {handle.config.id}: {exc}") from None
    return DepthResult(rec, verdicts)
