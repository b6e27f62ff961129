"""A real evaluation for the capacity search (``search.search_capacity``): boot one config, judge it."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from .backends import PreflightSkip, ServerError, ServerHandle
from .ceiling import build_ceiling
from .matrix import SLO, CapacityConfig
from .probes import HostProbe, NvmlProbe
from .search import Outcome
from .search_checks import Check, run_checks


def boot_and_check(cfg: CapacityConfig, spec_factory: Callable[[CapacityConfig], Any], probe: Any = None,
                   checks: Sequence[Check] = (), slo: SLO | None = None) -> Outcome:
    """Boot ``llama-server`` for ``cfg``, hold it, and judge the headroom SLO, then every check.

    ``spec_factory(cfg) -> LaunchSpec`` resolves binary, model and limits (the plugin has
    ``launch_spec``). ``probe`` defaults to a ``HostProbe`` over the profile budget on host profiles
    and an ``NvmlProbe`` on cuda ones. Each ``check(handle, slo) -> [Verdict]`` adds verdicts (a short
    workload's latency, throughput and goodput: ``search_checks``). ``slo`` overrides the profile's SLO. The server is always torn down; a boot
    failure or preflight refusal is a fail with its reason. ``Outcome.record`` is the ceiling record
    dict (with ``server_report``), ready for results.jsonl and ``record_calibration.calibrate_from``.
    """
    spec = spec_factory(cfg)
    profile = spec.profile
    own_probe = probe is None
    if probe is None:
        probe = (NvmlProbe(profile.gpu_index, profile.memory_gib * 1024) if profile.device == "cuda"
                 else HostProbe(profile.memory_gib * 1024))
    handle = ServerHandle(spec, probe)
    t0 = time.monotonic()
    try:
        try:
            handle.boot()
            handle.hold()
        except PreflightSkip as exc:
            return Outcome(False, reason=f"preflight refused: {exc}", seconds=time.monotonic() - t0,
                           failed=("preflight",))
        except (Exception, ServerError) as exc:  # ServerError is pytest's Failed outcome (a BaseException)
            tail = ""
            if handle.process is not None:
                tail = " | " + " / ".join(handle.process.log_tail().strip().splitlines()[-3:])
            return Outcome(False, reason=f"boot failed: {exc}".splitlines()[0] + tail, seconds=time.monotonic() - t0,
                           failed=("boot",))
        judged = profile.slo if slo is None else slo
        record, verdicts = build_ceiling(handle, cfg.id, judged)
        # headroom at idle: a probe does not run the profile's burst (a 90 % fill of every slot costs
        # minutes of prefill per probe on a CPU host); the ceiling test judges the burst
        verdicts = list(verdicts) + run_checks(checks, handle, judged)
        ok = all(v.ok for v in verdicts)
        lines = tuple(v.line() for v in verdicts)
        reason = f"free {record.memory.free_mib:.0f} MiB ({record.headroom_class})"
        bad = [v.line() for v in verdicts if not v.ok]
        if bad:
            reason += "; " + "; ".join(bad)
        return Outcome(ok, reason=reason, verdicts=lines, record=record.to_dict(), seconds=time.monotonic() - t0,
                       failed=tuple(dict.fromkeys(v.name for v in verdicts if not v.ok)))
    finally:
        handle.stop()
        if own_probe:
            probe.close()


__all__ = ["boot_and_check"]
