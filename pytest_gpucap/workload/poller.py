"""``/metrics`` polled while a run goes on: gauges, counters and latency histograms over its window.

The names come from the backend (``Backend.metrics``): the poller knows Prometheus, not servers.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import httpx

from ..backends.base import MetricNames
from ..promtext import Sample, labels_of, parse_samples

@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram summed over label sets (engines): cumulative buckets by ``le``."""

    buckets: tuple[tuple[float, float], ...] = ()
    sum: float = 0.0
    count: float = 0.0

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """``histogram_quantile``: linear interpolation inside the bucket holding rank q × count.

        Resolution is the bucket layout's: vLLM's queue-time buckets start at 0.3 s, so a 50 µs
        wait reads as 0.15 s here; ``mean`` (sum/count) is exact.
        """
        if not self.count or not self.buckets:
            return None
        rank = q * self.count
        prev_le, prev_c = 0.0, 0.0
        for le, c in self.buckets:
            if c >= rank:
                if math.isinf(le):
                    return prev_le  # beyond the last finite bound: the best we know is that bound
                if c == prev_c:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
            prev_le, prev_c = le, c
        return prev_le

    def minus(self, before: "Histogram | None") -> "Histogram":
        """The observations made between two scrapes (counters only grow)."""
        if before is None or not before.buckets:
            return self
        old = dict(before.buckets)
        return Histogram(tuple((le, c - old.get(le, 0.0)) for le, c in self.buckets),
                         self.sum - before.sum, self.count - before.count)

    def as_dict(self) -> dict[str, float | None]:
        return {"count": self.count, "sum": self.sum, "mean": self.mean,
                "p50": self.quantile(0.5), "p95": self.quantile(0.95), "p99": self.quantile(0.99)}


def histogram(samples: Iterable[Sample], name: str) -> Histogram:
    buckets: dict[float, float] = {}
    total = count = 0.0
    for n, labels, v in samples:
        if n == f"{name}_bucket" and "le" in labels:
            le = float(labels["le"])
            buckets[le] = buckets.get(le, 0.0) + v
        elif n == f"{name}_sum":
            total += v
        elif n == f"{name}_count":
            count += v
    return Histogram(tuple(sorted(buckets.items())), total, count)


def scrape_metrics(text: str, names: MetricNames) -> dict[str, Any]:
    """One ``/metrics`` page in the poller's keys: ``names.scalars`` (summed over label sets, e.g.
    engines; absent → missing key), ``Histogram`` objects for ``names.histograms``,
    ``request_errors_total`` (from ``names.error_counter``) and the ``names.info`` labels."""
    samples = parse_samples(text)
    flat: dict[str, float] = {}
    for s in samples:
        flat[s.name] = flat.get(s.name, 0.0) + s.value
    out: dict[str, Any] = {key: flat[name] for name, key in names.scalars.items() if name in flat}
    if names.error_counter is not None:
        counter, label, value = names.error_counter
        out["request_errors_total"] = sum(s.value for s in samples if s.name == counter and s.labels.get(label) == value)
    for name, key in names.histograms.items():
        out[key] = histogram(samples, name)
    out["cache_config"] = labels_of(text, names.info) if names.info else {}
    return out


def prefix_cache_hit_rate(before: Mapping[str, Any], after: Mapping[str, Any]) -> float | None:
    """Hit tokens ÷ queried tokens between two scrapes (None when nothing was queried)."""
    q = after.get("prefix_cache_queries_total", 0.0) - before.get("prefix_cache_queries_total", 0.0)
    h = after.get("prefix_cache_hits_total", 0.0) - before.get("prefix_cache_hits_total", 0.0)
    return h / q if q > 0 else None


def _counters(metrics: Mapping[str, Any]) -> dict[str, float]:
    """What only grows between scrapes: ``*_total`` scalars and histogram counts."""
    return {k: (v.count if isinstance(v, Histogram) else v) for k, v in metrics.items()
            if isinstance(v, Histogram) or (k.endswith("_total") and isinstance(v, float))}


@dataclass
class MetricsSample:
    """One scrape; ``t`` is ``time.monotonic()``, the clock of ``RequestRecord``."""

    t: float
    metrics: dict[str, Any]


@dataclass
class MetricsPoller:
    """Scrapes ``/metrics`` every ``interval_s`` in a background thread while a run goes on.

    Use as a context manager around the run; ``summary()`` gives the overload view (waiting
    requests, queue time, preemptions), the prefix-cache hit rate and server-side latency
    histograms over the polled window, and ``timeline()`` the samples aligned with the records.
    """

    url: str
    names: MetricNames
    interval_s: float = 0.5
    api_key: str | None = None
    timeout_s: float = 2.0
    settle_s: float = 1.0
    samples: list[MetricsSample] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def scrape_once(self, client: httpx.Client) -> None:
        try:
            resp = client.get(f"{self.url}/metrics")
            t = time.monotonic()
            if resp.status_code != 200:
                self.errors += 1
                return
            self.samples.append(MetricsSample(t, scrape_metrics(resp.text, self.names)))
        except httpx.HTTPError:
            self.errors += 1

    def _client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(timeout=self.timeout_s, headers=headers)

    def _loop(self) -> None:
        with self._client() as client:
            due = time.monotonic() + self.interval_s
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                self.scrape_once(client)
                due = max(due + self.interval_s, time.monotonic())
            self._final(client)

    def _final(self, client: httpx.Client) -> None:
        """The closing sample, once the server's counters stop moving.

        vLLM records a request's histograms after it has sent the last byte, so a scrape taken the
        moment the client finishes can miss the last requests; up to ``settle_s`` more scrapes are
        taken until two in a row agree.
        """
        deadline = time.monotonic() + self.settle_s
        self.scrape_once(client)
        while time.monotonic() < deadline:
            time.sleep(min(0.1, self.interval_s))
            before = self.samples[-1].metrics if self.samples else None
            self.scrape_once(client)
            if before is not None and self.samples and _counters(before) == _counters(self.samples[-1].metrics):
                break

    def start(self) -> "MetricsPoller":
        """Take the baseline sample before returning, so the run's first requests fall inside the window."""
        if self._thread is None:
            with self._client() as client:
                self.scrape_once(client)
            self._thread = threading.Thread(target=self._loop, name="gpucap-metrics", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + self.settle_s + 5)

    def __enter__(self) -> "MetricsPoller":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def window(self, since: float | None = None, until: float | None = None) -> list[MetricsSample]:
        return [s for s in self.samples if (since is None or s.t >= since) and (until is None or s.t <= until)]

    def timeline(self) -> list[dict[str, float]]:
        keys = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total")
        return [{"t": s.t, **{k: s.metrics.get(k, 0.0) for k in keys}} for s in self.samples]

    def summary(self, since: float | None = None, until: float | None = None, max_num_seqs: int | None = None,
                queue_threshold_s: float = 0.0) -> dict[str, Any]:
        """The overload view and server-side latencies between the first and last sample in range."""
        win = self.window(since, until)
        if not win:
            return {"samples": 0, "scrape_errors": self.errors}
        # Counters and histograms are differenced between the samples that bracket the window (the
        # last one at or before ``since``, the first at or after ``until``), so requests that started
        # or ended between two polls are not lost; gauges are read inside the window.
        before = [s for s in self.samples if since is not None and s.t <= since]
        after = [s for s in self.samples if until is not None and s.t >= until]
        first = (before[-1] if before else win[0]).metrics
        last = (after[0] if after else win[-1]).metrics
        waiting = [s.metrics.get("num_requests_waiting", 0.0) for s in win]
        running = [s.metrics.get("num_requests_running", 0.0) for s in win]
        kv = [s.metrics.get("kv_cache_usage_perc", 0.0) for s in win]
        hists = {key: last[key].minus(first.get(key)) for key in self.names.histograms.values() if key in last}
        queue = hists.get("queue_time", Histogram())
        preempt = last.get("num_preemptions_total", 0.0) - first.get("num_preemptions_total", 0.0)
        errors = last.get("request_errors_total", 0.0) - first.get("request_errors_total", 0.0)
        queued = max(waiting) > 0 or (queue.mean or 0.0) > queue_threshold_s or preempt > 0
        out: dict[str, Any] = {
            "samples": len(win), "scrape_errors": self.errors,
            "window_s": win[-1].t - win[0].t,
            "max_waiting": max(waiting), "mean_waiting": sum(waiting) / len(waiting),
            "waiting_fraction": sum(1 for w in waiting if w > 0) / len(waiting),
            "max_running": max(running), "mean_running": sum(running) / len(running),
            "max_kv_cache_usage": max(kv),
            "preemptions": preempt,
            "server_errors": errors,
            "queue_time_s": queue.as_dict(),
            "ttft_s": hists.get("ttft", Histogram()).as_dict(),
            "itl_s": hists.get("itl", Histogram()).as_dict(),
            "e2e_s": hists.get("e2e", Histogram()).as_dict(),
            "prefix_cache_hit_rate": prefix_cache_hit_rate(first, last),
            "prompt_tokens": last.get("prompt_tokens_total", 0.0) - first.get("prompt_tokens_total", 0.0),
            "generation_tokens": last.get("generation_tokens_total", 0.0) - first.get("generation_tokens_total", 0.0),
            "overloaded": queued,
        }
        if max_num_seqs is not None:
            out["max_num_seqs"] = max_num_seqs
            out["running_at_cap"] = max(running) >= max_num_seqs
        return out


