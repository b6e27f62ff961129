"""What capacity tests call: run a load shape on a booted server, get metrics, verdicts and a record.

Tests never talk HTTP themselves: they ask this harness for a workflow, a fixed-concurrency run, a
shared-prefix run or the ramp, and assert on the returned result objects.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from .matrix import SLO, Workload
from .records import (
    RampEvidence, RampRecord, RampStep, SloBudgets, Verdict, WorkloadInfo, WorkloadMemory, WorkloadMetrics,
    WorkloadRecord, header, parse,
)
from .backends import ServerError, ServerHandle
from .depth import DepthResult, depth_sweep
from .workload.depth import DEFAULT_DEPTHS
from . import vision
from .load_keys import DEFAULT_IMAGE_SIZE
from .repeat import repeated
from .verdicts import assert_slos, goodput, workload_verdicts
from .workload import ramp, runner
from .workload import procs
from .workload.metrics import server_crosscheck
from .workload.poller import MetricsPoller
from .workload.prompts import calibrate
from .workload.roles import Role, scale, workflow_roles


#: The default ``stall_s`` lies between these: long enough for a slow prefill, short enough that a hung
#: server fails its test within minutes.
STALL_BOUNDS_S = (30.0, 180.0)


def default_stall_s(slo: SLO) -> float:
    """The largest latency budget of the SLO, within ``STALL_BOUNDS_S``: a stream silent longer than
    the whole turn budget has already failed it (no budget: the upper bound)."""
    budgets = [v for _, v in slo.p95_s] + [b for b in (slo.ttft_p95_s,) if b]
    low, high = STALL_BOUNDS_S
    return min(high, max(low, max(budgets))) if budgets else high


@dataclass
class WorkloadResult:
    """Metrics, verdicts and the record of one load run (``record`` is the JSON dict written to
    results.jsonl; ``typed`` the same record as a ``WorkloadRecord``)."""

    record: dict[str, Any]
    verdicts: list[Verdict]
    run: runner.RunResult

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record["metrics"]

    @property
    def typed(self) -> WorkloadRecord:
        return parse(self.record)  # type: ignore[return-value]

    def assert_slos(self) -> None:
        assert_slos(self.verdicts, f"{self.record['config_id']} {self.record['workload']['name']}")


class Harness:
    """Runs workloads against one server handle and records what they measured."""

    def __init__(self, handle: ServerHandle, slo: SLO, workload: Workload, roles: dict[str, Role],
                 workflows: dict[str, tuple[str, ...]], test_id: str,
                 record: Callable[[dict[str, Any]], None], progress: runner.ProgressSink | None = None,
                 client_procs: int | str | None = None, repeat: int = 1) -> None:
        self.handle = handle
        self.repeat = repeat  # --gpucap-repeat: each workflow/fixed/poisson run K times, recorded once
        self.slo = slo
        self.settings = workload if workload.stall_s else replace(workload, stall_s=default_stall_s(slo))
        self.roles = roles
        self.workflows = dict(workflows)  # the matrix's [workflows]; built-in ones scale to N
        self.test_id = test_id
        self._record = record
        self.progress = progress
        self.client_procs = client_procs
        self._cpt: tuple[float, str] | None = None

    @property
    def client_kw(self) -> dict[str, Any]:
        """What the client must send (the backend's model name and API key, where it wants them)."""
        return self.handle.backend.client_options(self.handle)

    @property
    def chars_per_token(self) -> float:
        if self._cpt is None:
            backend = self.handle.backend
            self._cpt = calibrate(self.handle.url, request=lambda text: backend.tokenize_request(self.handle, text),
                                  api_key=self.handle.api_key)
        return self._cpt[0]

    def _poller(self) -> Any:
        """A backend with polled metrics (vLLM): /metrics every 0.5 s during the run (queueing,
        prefix cache, server latencies)."""
        names = self.handle.backend.metrics
        if not names.polled:
            return contextlib.nullcontext(None)
        return MetricsPoller(self.handle.url, names, api_key=self.handle.api_key)

    def procs(self) -> int:
        """Client processes for a run: ``--gpucap-client-procs`` as given, ``auto`` from the decode
        roofline (every slot full) and the cores; 1 without the option."""
        if self.client_procs != "auto":
            return procs.resolve_procs(self.client_procs, None)
        from . import prediction

        pred = self.handle.prediction
        bandwidth = self.handle.profile.bandwidth_gbps or prediction.bandwidth_for(
            self.handle.probe.describe().get("gpu", ""))
        roof = (prediction.decode_roofline_tps(pred, self.handle.config, bandwidth, None)
                if pred is not None and hasattr(pred, "kv_caches") and bandwidth else None)
        return procs.resolve_procs("auto", roof)

    def _abort(self) -> str | None:
        try:
            self.handle.check_alive()
        except ServerError as exc:  # died or stopped by the watchdog: the run ends with this reason
            return str(exc)
        return None

    def _free_mib(self) -> float | None:
        tl = self.handle.sampler.timeline if self.handle.sampler else None
        return tl.samples[-1].device.free_mib if tl and tl.samples else None

    def _finish(self, name: str, agents: list[str], res: runner.RunResult, verdicts_extra: list[Verdict] = (),
                vision_metrics: Any = None, **extra: Any) -> WorkloadResult:
        summary = res.summary()
        summary["crosscheck"] = server_crosscheck(res.records, res.measure_from, res.server_metrics_before,
                                                  res.server_metrics_after,
                                                  self.handle.backend.metrics.generated_tokens)
        summary["compactions"], summary["clipped_turns"] = res.compactions, res.clipped_turns
        summary.update(self._roofline(res, summary["agg_tps"]))
        summary["goodput"] = goodput(res.records, self.slo, res.measure_from)
        poller = extra.pop("poller", None)
        extra["stall_s"] = self.settings.stall_s
        extra["client_procs"] = extra.get("client_procs", 1)
        if summary["crosscheck"].get("client_behind"):
            extra["client_behind"] = (
                f"client fell behind the server (decode-rate ratio {summary['crosscheck']['decode_rate_ratio']:.2f}) "
                f"with {extra['client_procs']} client process(es): raise --gpucap-client-procs")
            if self.progress:
                self.progress(f"{self.handle.config.id} {name}: {extra['client_behind']}")
        if res.stalls:
            extra["stalls"] = res.stalls
        if poller is not None:
            summary["server"] = poller.summary(res.started, res.ended, max_num_seqs=self.handle.config.n)
        metrics = WorkloadMetrics.from_dict(summary)
        verdicts = workload_verdicts(metrics, self.slo) + list(verdicts_extra)
        tl = self.handle.sampler.timeline if self.handle.sampler else None
        window = [s for s in (tl.samples if tl else []) if res.started <= s.t <= res.ended]
        typed = WorkloadRecord(
            **header(self.handle, self.test_id),
            workload=WorkloadInfo(name=name, agents=agents, duration_s=self.settings.duration_s,
                                  warmup_s=self.settings.warmup_s, token_scale=self.settings.token_scale,
                                  cadence_scale=self.settings.cadence_scale, rtt_s=self.settings.rtt_s,
                                  seed=self.settings.seed, chars_per_token=self.chars_per_token,
                                  calibration=self._cpt[1] if self._cpt else None, extra=extra),
            metrics=metrics,
            memory=WorkloadMemory(
                free_at_boot_mib=self.handle.after_load.device.free_mib if self.handle.after_load else None,
                min_free_mib=min((s.device.free_mib for s in window), default=None),
                peak_server_rss_mib=max((s.server_rss_mib or 0 for s in window), default=None),
                timeline=(tl.downsampled(start=res.started, end=res.ended) or None) if tl else None),
            aborted=res.aborted,
            tokens_from="server usage" if metrics.usage_missing == 0 else
                        f"server usage missing on {metrics.usage_missing} turns",
            slo=SloBudgets.of(self.slo),
            verdicts=tuple(verdicts),
            vision=vision_metrics,
        )
        record = typed.to_dict()
        self._record(record)
        result = WorkloadResult(record, verdicts, res)
        if res.aborted:
            raise ServerError(f"workload {name} on {self.handle.config.id} stopped after {metrics.turns_ok} "
                              f"turns ok, {metrics.turns_failed} failed (all recorded): {res.aborted}")
        return result

    def _roofline(self, res: runner.RunResult, agg_tps: float) -> dict[str, Any]:
        """The bandwidth-bound decode ceiling beside the measured rate (empty when it cannot be made).

        Two ceilings: with the context the conversations really held, and with every slot full (the
        study's "cost scales with allocated context" hypothesis); a rate far below both is not
        bandwidth-bound.
        """
        from . import prediction

        pred = self.handle.prediction
        bandwidth = self.handle.profile.bandwidth_gbps or prediction.bandwidth_for(
            self.handle.probe.describe().get("gpu", ""))
        if pred is None or not hasattr(pred, "kv_caches") or not bandwidth:
            return {}
        ok = [r for r in res.records if r.ok and r.prompt_tokens is not None]
        used = round(sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in ok) / len(ok)) if ok else None
        cfg = self.handle.config
        roof = prediction.decode_roofline_tps(pred, cfg, bandwidth, used)
        full = prediction.decode_roofline_tps(pred, cfg, bandwidth, None)
        return {"bandwidth_gbps": bandwidth, "context_used_tokens": used, "roofline_tps": roof,
                "roofline_full_slots_tps": full, "efficiency": prediction.efficiency(agg_tps, roof)}

    @repeated
    def workflow(self, name: str) -> WorkloadResult:
        """The study's Phase 2: one multi-turn agent per role of the workflow, for the duration (a
        built-in workflow fills the config's N slots; a listed one keeps its list: roles.workflow_roles)."""
        asked = [scale(r, self.settings)
                 for r in workflow_roles(name, self.handle.config.n, self.roles, self.workflows)]
        roles = vision.for_server(asked, self.handle)  # images only where the server has a projector
        cpt = self.chars_per_token
        n_procs = min(self.procs(), len(roles))
        label = f"{self.handle.config.id} workflow {name}"
        with self._poller() as poller:
            if n_procs > 1:
                res = procs.agents(n_procs, self.handle.url, roles, self.settings, self.handle.config.ctx, cpt,
                                   self._abort, self.progress, label, **self.client_kw)
            else:
                res = runner.run(runner.run_agents(
                    self.handle.url, roles, self.settings, self.handle.config.ctx, cpt,
                    abort=self._abort, progress=self.progress, free_mib=self._free_mib, label=label,
                    **self.client_kw))
        return self._finish(name, [r.name for r in roles], res, poller=poller, client_procs=n_procs,
                            vision_metrics=vision.section(self.handle, asked, res.records))

    def concurrent_images(self, size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> WorkloadResult:
        """One image on every slot at the same moment, short replies: the study's "two concurrent image
        inputs likely OOM" as a measured row (minimum free memory, failed requests), recorded as the
        workload ``concurrent-images``. Text-only configs send the requests without images and say so."""
        res, vis = vision.concurrent_step(self.handle, self.settings, size)
        extra = [Verdict("concurrent image requests failed", float(vis.failed or 0), 0.0, "", False)]
        if vis.min_free_mib is not None:
            extra.append(Verdict("headroom under concurrent images", vis.min_free_mib / 1024, self.slo.headroom_gib,
                                 "GiB"))
        return self._finish("concurrent-images", [f"image x{self.handle.config.n}"], res, extra,
                            vision_metrics=vis, concurrency=self.handle.config.n)

    @repeated
    def fixed(self, concurrency: int, n_requests: int, prompt_tokens: int = 64, max_tokens: int = 32,
              shared_prefix_tokens: int = 0, name: str | None = None) -> WorkloadResult:
        """Fixed concurrency (optionally with a shared system prompt to exercise the prefix cache)."""
        cpt = self.chars_per_token
        n_procs = min(self.procs(), concurrency, n_requests)
        with self._poller() as poller:
            if n_procs > 1:
                res = procs.fixed(n_procs, self.handle.url, concurrency, n_requests, prompt_tokens, max_tokens, cpt,
                                  self.settings, shared_prefix_tokens, self._abort, **self.client_kw)
            else:
                res = runner.run(runner.run_fixed(
                    self.handle.url, concurrency, n_requests, prompt_tokens, max_tokens, cpt,
                    self.settings, shared_prefix_tokens, abort=self._abort, **self.client_kw))
        label = name or (f"fixed-c{concurrency}" + (f"-prefix{shared_prefix_tokens}" if shared_prefix_tokens else "")
                         + (f"-rtt{self.settings.rtt_s * 1000:g}ms" if self.settings.rtt_s else ""))
        return self._finish(label, [f"fixed x{concurrency}"], res, concurrency=concurrency,
                            shared_prefix_tokens=shared_prefix_tokens, poller=poller, client_procs=n_procs)

    def warm_up(self, concurrency: int = 1, n_requests: int = 2, max_tokens: int = 4) -> None:
        """Unrecorded requests that page in the weights and build the compute graphs, so the first
        measured run of a comparison is not also the only cold one."""
        runner.run(runner.run_fixed(self.handle.url, concurrency, n_requests, 16, max_tokens, self.chars_per_token,
                                    self.settings, abort=self._abort, **self.client_kw))

    @repeated
    def poisson(self, rate_per_s: float, n_requests: int, prompt_tokens: int = 64,
                max_tokens: int = 32) -> WorkloadResult:
        """Open-loop Poisson arrivals: TTFT p50/p99 at an offered rate."""
        cpt = self.chars_per_token
        with self._poller() as poller:
            res = runner.run(runner.run_poisson(self.handle.url, rate_per_s, n_requests, prompt_tokens, max_tokens,
                                                cpt, self.settings, abort=self._abort, **self.client_kw))
        return self._finish(f"poisson-{rate_per_s:g}rps", ["poisson"], res, rate_per_s=rate_per_s, poller=poller)

    def ramp(self) -> dict[str, Any]:
        """The agent-connection ramp: N agents doubling to the ceiling; returns (and records) the steps."""
        def memory() -> tuple[float | None, float | None]:
            snap = self.handle.sampler.sample() if self.handle.sampler else None
            return (snap.server_rss_mib, snap.device.used_mib) if snap else (None, None)

        n_procs, cpt, kw = self.procs(), self.chars_per_token, self.client_kw

        async def split_step(n: int) -> tuple[list[Any], float]:
            return await asyncio.to_thread(procs.ramp_step, min(n_procs, n), self.handle.url, n, self.settings,
                                           cpt, **kw)

        slots = self.handle.props.get("total_slots") or self.handle.config.n
        result = runner.run(ramp.run_ramp(self.handle.url, self.settings, cpt, memory,
                                          self.slo.ramp_p95_s, abort=self._abort, progress=self.progress,
                                          step_runner=split_step if n_procs > 1 else None, slots=slots, **kw))
        evidence = result.pop("limit_evidence", None)
        typed = RampRecord(
            **header(self.handle, self.test_id),
            steps=tuple(RampStep.from_dict(s) for s in result.pop("steps")), aborted=result.pop("aborted", None),
            nofile=result.pop("nofile", None), max_clean_n=result.pop("max_clean_n", None),
            knee_n=result.pop("knee_n", None), ceiling=self.settings.ramp_ceiling,
            context_tokens=self.settings.ramp_context_tokens, max_tokens=self.settings.ramp_max_tokens,
            rtt_s=self.settings.rtt_s, slo=SloBudgets.of(self.slo), limit=result.pop("limit", None),
            limit_detail=result.pop("limit_detail", None), queue_knee_n=result.pop("queue_knee_n", None),
            limit_evidence=None if evidence is None else RampEvidence.from_dict(evidence),
            slots=result.pop("slots", None), client_procs=n_procs, extra=result,
        )
        record = typed.to_dict()
        self._record(record)
        return record

    def depth_sweep(self, depths: Sequence[float] = DEFAULT_DEPTHS, max_tokens: int = 16,
                    ctx_tokens: int | None = None) -> DepthResult:
        """The same request at each depth of the slot's context (``depth.depth_sweep``), recorded; the
        swept context is capped by ``ctx_tokens`` or the profile's ``depth_ctx_tokens``."""
        return depth_sweep(self.handle, self.slo, self.test_id, self._record, depths, max_tokens,
                           seed=self.settings.seed, ctx_tokens=ctx_tokens or self.settings.depth_ctx_tokens or None,
                           progress=self.progress)

    def runs_workflow(self, name: str) -> bool:
        """Whether this config's Phase 2 runs workflow ``name``: a config listing ``workflows`` runs
        those; one listing none runs the suite's defaults."""
        return not self.handle.config.workflows or name in self.handle.config.workflows

    def with_settings(self, **changes: Any) -> "Harness":
        """A harness with some workload settings changed (e.g. a different RTT or duration)."""
        other = Harness(self.handle, self.slo, replace(self.settings, **changes), self.roles, {},
                        self.test_id, self._record, self.progress, self.client_procs, self.repeat)
        other.workflows, other._cpt = self.workflows, self._cpt
        return other
