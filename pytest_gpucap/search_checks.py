"""What a capacity-search probe is judged on after its boot and hold: a list of checks.

A check is ``check(handle, slo) -> list[Verdict]`` on the booted, held server; ``search_boot`` runs
the headroom verdict itself and then every check, and the probe passes only when every verdict does.
So a probe answers "does this config meet *all* the test's SLOs" (headroom, per-role p95, aggregate
tok/s, goodput, ...), not "does it fit". New judgements (headroom under a burst, the depth ratio)
are one more callable in the list ``probe_checks`` returns; nothing else changes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

from .backends import ServerError, ServerHandle
from .depth import depth_sweep
from .harness import Harness
from .matrix import SLO, Workload
from .records import Verdict

Check = Callable[[ServerHandle, SLO], Sequence[Verdict]]
#: The name a check's failure is reported under when it raises (its verdicts could not be made).
ERROR_PREFIX = "probe error"


def named(name: str, fn: Check) -> Check:
    """``fn`` under a readable name (the one a raised error is reported with)."""
    fn.__name__ = name  # type: ignore[attr-defined]
    return fn


def run_checks(checks: Sequence[Check], handle: ServerHandle, slo: SLO) -> list[Verdict]:
    """Every check's verdicts, in order. A check that raises (the server died under load, the watchdog
    stopped it) is one failed verdict naming the check and the error, and the later checks still run
    while the server answers."""
    out: list[Verdict] = []
    for check in checks:
        try:
            out += list(check(handle, slo))
        except (Exception, ServerError) as exc:  # ServerError is pytest's Failed outcome (a BaseException)
            name = getattr(check, "__name__", "check")
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            out.append(Verdict(f"{ERROR_PREFIX} ({name}): {first}", 0.0, 1.0, ""))
    return out


def workflow_check(workflow: str, duration_s: float, settings: Workload, roles: Mapping[str, Any],
                   workflows: Mapping[str, tuple[str, ...]], test_id: str,
                   record: Callable[[dict[str, Any]], None], progress: Any = None) -> Check:
    """Run ``workflow`` for ``duration_s`` through the ``Harness`` on the probe's server and return its
    workload verdicts (per-role p95, TTFT, aggregate tok/s, error rate, goodput). The workload record
    goes to ``record`` (the search marks it as a probe's)."""

    def check(handle: ServerHandle, slo: SLO) -> Sequence[Verdict]:
        short = replace(settings, duration_s=duration_s, warmup_s=0.0)
        harness = Harness(handle, slo, short, dict(roles), dict(workflows), test_id, record, progress)
        return harness.workflow(workflow).verdicts

    return named(f"workflow {workflow}", check)


def probe_checks(workflow: str, duration_s: float, settings: Workload, roles: Mapping[str, Any],
                 workflows: Mapping[str, tuple[str, ...]], test_id: str, record: Callable[[dict[str, Any]], None],
                 progress: Any = None) -> list[Check]:
    """The checks of one search probe, after the headroom verdict (at idle: ``search_boot``): the probe workflow (none when ``workflow`` is empty), then the depth sweep when the
    SLO gates on it."""
    checks: list[Check] = []
    if workflow:
        checks.append(workflow_check(workflow, duration_s, settings, roles, workflows, test_id, record, progress))
    checks.append(depth_check(settings, test_id, record))
    return checks


def depth_check(settings: Workload, test_id: str, record: Callable[[dict[str, Any]], None]) -> Check:
    """The depth sweep's verdicts (``min_depth_ratio``, ``min_depth_decode_tps``) when the SLO sets one;
    nothing (and no sweep) otherwise."""

    def check(handle: ServerHandle, slo: SLO) -> Sequence[Verdict]:
        if slo.min_depth_ratio is None and slo.min_depth_decode_tps is None:
            return []
        return depth_sweep(handle, slo, test_id, record, max_tokens=8,
                           ctx_tokens=settings.depth_ctx_tokens or None).verdicts

    return named("depth sweep", check)


__all__ = ["Check", "ERROR_PREFIX", "depth_check", "named", "probe_checks", "run_checks", "workflow_check"]
