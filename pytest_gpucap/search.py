"""Capacity search: the largest configuration that meets every SLO, with few boots.

The objective orders configurations by total context ``N x ctx``, then by ``N`` (then mmproj on
before off, then cache types in the order given). A full grid boots every point; this search boots
only the points that can still change the answer:

1. **Predict** every point (cheap, no server). Points predicted not to fit (or, with
   ``prune="slo"``, predicted to miss the headroom SLO) are never booted.
2. **Reuse** outcomes already known (records from ``results.jsonl``, keyed by config id).
3. **Monotonicity assumption**: within one (cache type, mmproj) family, if ``(N, ctx)`` fails then
   every ``(N' >= N, ctx' >= ctx)`` fails, and if it passes every ``(N' <= N, ctx' <= ctx)``
   passes: more slots or more context per slot never need less memory or make turns faster. Known
   outcomes are propagated this way ("inferred-pass" / "inferred-fail").
4. **Branch and bound**: only points whose objective beats the best pass so far are candidates; a
   pass makes everything ranked below it irrelevant. Two ways to pick the next boot:

   - ``strategy="split"`` (default): the candidate whose outcome settles the most other candidates
     (a pass settles what it dominates and what ranks below it; a fail settles what dominates it) —
     a 2-D bisection of the frontier. The prediction weights the two outcomes by how often it has
     agreed with the boots so far, so a good prediction leads straight to the knee and a bad one
     degrades to plain bisection instead of wasting boots.
   - ``strategy="columns"``: per ctx column, start at the predicted frontier (largest N predicted to
     meet the SLO), *double* the step up after each pass, *bisect* after a fail; columns in order of
     their best candidate.

   On random monotone grids (tests/test_search.py) both find the grid's knee every time; "split"
   used 11-20% of the grid's boots on average and at most 38%, "columns" 9-26% on average but up to
   75% when the prediction misses a constraint it does not model (e.g. a latency SLO on N).

Pruning on "fit" is safe while the prediction errs by less than the headroom SLO: a config predicted
not to fit at all but measured with at least the SLO's headroom free would be missed.

``evaluate(cfg) -> Outcome`` is the only thing that boots; ``search_boot.boot_and_check`` is a real
one (boot ``llama-server`` with ``ServerHandle``, read free memory, judge the headroom SLO, then every
``search_checks`` check: a short workflow's latency, throughput and goodput verdicts). Known outcomes
come from ``search_known``; the result's boundary and binding SLO from ``search_boundary``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

from .matrix import CapacityConfig, SLO
from .prediction import Prediction
from .search_boundary import BoundaryPoint, binding_slo, boundary

MONOTONICITY = ("within one cache type and mmproj setting, a config that fails makes every config with "
                "at least as many slots and at least as much context per slot fail; one that passes makes "
                "every smaller one pass")

STATUSES = ("booted-pass", "booted-fail", "known-pass", "known-fail", "predicted-no-fit",
            "predicted-slo-miss", "inferred-pass", "inferred-fail", "not-needed")


@dataclass(frozen=True)
class SearchSpace:
    """The grid: slots, context per slot, KV cache types, projector on/off."""

    ns: tuple[int, ...]
    ctxs: tuple[int, ...]
    cache_types: tuple[str, ...] = ("f16",)
    mmproj: tuple[bool, ...] = (False,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ns", tuple(sorted(set(self.ns))))
        object.__setattr__(self, "ctxs", tuple(sorted(set(self.ctxs))))
        if not self.ns or not self.ctxs or not self.cache_types or not self.mmproj:
            raise ValueError("a search space needs at least one N, ctx, cache type and mmproj setting")

    @property
    def size(self) -> int:
        return len(self.ns) * len(self.ctxs) * len(self.cache_types) * len(self.mmproj)

    def families(self) -> list[tuple[str, bool]]:
        return [(c, m) for m in self.mmproj for c in self.cache_types]

    def config(self, base: CapacityConfig, n: int, ctx: int, cache_type: str, mmproj: bool) -> CapacityConfig:
        return replace(base, n=n, ctx=ctx, cache_type_k=cache_type, cache_type_v=cache_type, mmproj=mmproj,
                       name=None)

    def configs(self, base: CapacityConfig) -> list[CapacityConfig]:
        return [self.config(base, n, ctx, c, m) for c, m in self.families() for ctx in self.ctxs for n in self.ns]


@dataclass(frozen=True)
class Outcome:
    """Whether one booted (or known) config met its SLOs, and why."""

    passed: bool
    reason: str = ""
    verdicts: tuple[str, ...] = ()  # Verdict.line() texts
    record: Mapping[str, Any] | None = None  # e.g. the ceiling record, to append to results.jsonl
    seconds: float = 0.0
    failed: tuple[str, ...] = ()  # names of the verdicts that failed (the boundary's binding SLO)


@dataclass(frozen=True)
class Probe:
    """One grid point and what the search knows about it."""

    config: CapacityConfig
    status: str  # one of STATUSES
    reason: str = ""
    prediction: Prediction | None = None
    boot_order: int | None = None  # 1-based order of the boots this search made
    outcome: Outcome | None = None
    source: str | None = None  # inferred points: the config id the inference came from

    @property
    def passed(self) -> bool | None:
        if self.status.endswith("pass"):
            return True
        if self.status == "not-needed":
            return None
        return False


@dataclass
class SearchResult:
    """The knee and the evidence for it."""

    knee: CapacityConfig | None
    probes: list[Probe]
    boots: int
    grid_size: int
    known_used: int = 0
    assumption: str = MONOTONICITY
    seconds: float = 0.0
    boundary: list[BoundaryPoint] = field(default_factory=list)
    binding_slo: str | None = None  # what failed at the first config past the knee (see search_boundary)
    max_boots: int | None = None
    stopped_early: bool = False  # the boot budget ran out with candidates left: the knee is a lower bound

    @property
    def boot_fraction(self) -> float:
        return self.boots / self.grid_size if self.grid_size else 0.0

    def probe(self, config_id: str) -> Probe | None:
        return next((p for p in self.probes if p.config.id == config_id), None)

    def booted(self) -> list[Probe]:
        return sorted((p for p in self.probes if p.boot_order is not None), key=lambda p: p.boot_order or 0)

    def table(self) -> str:
        """Evidence, one line per grid point: status and reason (booted points first, in boot order)."""
        rows = self.booted() + [p for p in self.probes if p.boot_order is None]
        w = max([len(p.config.id) for p in rows] + [6])
        lines = [f"knee: {self.knee.id if self.knee else 'none'} — {self.boots} boots of a {self.grid_size}-point "
                 f"grid ({100 * self.boot_fraction:.0f}%), {self.known_used} known results reused",
                 f"binding SLO: {self.binding_slo or '-'}"
                 + (f" (stopped at the {self.max_boots}-boot budget)" if self.stopped_early else ""),
                 *(f"boundary {b.family} {b.axis}: last pass {b.last_pass or '-'}, first fail {b.first_fail or '-'}"
                   f" ({b.binding_slo or b.first_fail_status or 'grid edge'})" for b in self.boundary),
                 f"assumption: {self.assumption}", ""]
        for p in rows:
            order = f"#{p.boot_order}" if p.boot_order else "  "
            mark = " <- knee" if self.knee and p.config.id == self.knee.id else ""
            lines.append(f"{order:>4} {p.config.id.ljust(w)}  {p.status:<18} {p.reason}{mark}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "knee": self.knee.id if self.knee else None, "boots": self.boots, "grid_size": self.grid_size,
            "boot_fraction": round(self.boot_fraction, 3), "known_used": self.known_used,
            "assumption": self.assumption, "seconds": round(self.seconds, 2),
            "binding_slo": self.binding_slo, "boundary": [b.as_dict() for b in self.boundary],
            "max_boots": self.max_boots, "stopped_early": self.stopped_early,
            "probes": [{"config_id": p.config.id, "n": p.config.n, "ctx": p.config.ctx,
                        "cache_type": p.config.cache_type_k, "mmproj": p.config.mmproj, "status": p.status,
                        "reason": p.reason, "boot_order": p.boot_order,
                        **({"failed_verdicts": list(p.outcome.failed)} if p.outcome and p.outcome.failed else {}),
                        "predicted_free_mib": None if p.prediction is None or p.prediction.free_mib is None
                        else round(p.prediction.free_mib, 1)} for p in self.probes],
        }


# ---------------------------------------------------------------- search

#: A grid point: (family index, ctx column, N row), indices into ``space.families()``, ``ctxs``, ``ns``.
Key = tuple[int, int, int]


def _objective(cfg: CapacityConfig, cache_rank: int) -> tuple[int, int, int, int]:
    return (cfg.n * cfg.ctx, cfg.n, int(cfg.mmproj), -cache_rank)


def default_predicted_ok(pred: Prediction) -> bool:
    """Predicted to meet the headroom SLO (or, without a budget, predicted to boot)."""
    ok = pred.meets_headroom
    return pred.fits if ok is None else ok


def _run(evaluate: Callable[[CapacityConfig], Outcome], cfg: CapacityConfig) -> Outcome:
    """One evaluation; a crash of it is a fail of this config, with the reason. Timed if it did not say."""
    t = time.monotonic()
    try:
        o = evaluate(cfg)
    except Exception as exc:
        o = Outcome(False, reason=f"evaluation error: {type(exc).__name__}: {exc}", failed=("evaluation error",))
    if not o.seconds:
        o = replace(o, seconds=time.monotonic() - t)
    return o


class _Search:
    """What one :func:`search_capacity` knows about every grid point, and how it picks the next boot.

    ``status[key]`` is ``(status, reason)`` in :data:`STATUSES` words for every decided point (a
    status ending in "pass" passes, any other fails); a point without one is still open. Steps 1 and
    2 of the module docstring happen in the constructor, step 3 in :meth:`infer`, step 4 in
    :meth:`candidates` and the two ``choose_*`` strategies.
    """

    def __init__(self, base: CapacityConfig, space: SearchSpace, predict: Callable[[CapacityConfig], Prediction] | None,
                 known: Mapping[str, Outcome], prune: str, predicted_ok: Callable[[Prediction], bool]) -> None:
        self.space, self.fams, self.predicted_ok = space, space.families(), predicted_ok
        self.cfgs: dict[Key, CapacityConfig] = {}
        self.preds: dict[Key, Prediction | None] = {}
        self.status: dict[Key, tuple[str, str]] = {}
        self.outcomes: dict[Key, Outcome] = {}
        self.order: dict[Key, int] = {}  # booted points, in boot order
        self.source: dict[Key, Key] = {}  # inferred points: the decided point they follow from
        self.known_used = 0
        # strategy="columns", per (family, column): the step, started, bisecting, row of the last probe
        self.step: dict[tuple[int, int], int] = {}
        self.started: set[tuple[int, int]] = set()
        self.bisecting: set[tuple[int, int]] = set()
        self.col_last: dict[tuple[int, int], int] = {}
        for f, (cache, mm) in enumerate(self.fams):
            for j, ctx in enumerate(space.ctxs):
                for i, n in enumerate(space.ns):
                    key, cfg = (f, j, i), space.config(base, n, ctx, cache, mm)
                    pred = self.preds[key] = predict(cfg) if predict else None
                    self.cfgs[key] = cfg
                    if cfg.id in known:  # step 2: reuse
                        o = self.outcomes[key] = known[cfg.id]
                        self.status[key] = ("known-pass" if o.passed else "known-fail", o.reason)
                        self.known_used += 1
                    elif pred is not None and prune != "none" and not pred.fits:  # step 1: prune
                        self.status[key] = ("predicted-no-fit", pred.skip_reason() or "")
                    elif pred is not None and prune == "slo" and not predicted_ok(pred):
                        why = f"predicted free {pred.free_mib:.0f} MiB < headroom {pred.headroom_gib} GiB"
                        self.status[key] = ("predicted-slo-miss", why)

    def passed(self, key: Key) -> bool | None:
        st = self.status.get(key)
        return None if st is None else st[0].endswith("pass")

    def rank(self, key: Key) -> tuple[int, int, int, int]:
        return _objective(self.cfgs[key], self.space.cache_types.index(self.fams[key[0]][0]))

    def infer(self) -> None:
        """Step 3: propagate passes down-left and fails up-right within each family (monotonicity)."""
        for f in range(len(self.fams)):
            seen = [(k[2], k, st.endswith("pass")) for k, (st, _) in self.status.items()
                    if k[0] == f and not st.startswith("inferred")]  # measured, known or predicted
            for j in range(len(self.space.ctxs)):
                # the largest passing N in any column with at least this ctx, the smallest failing N
                # in any column with at most this ctx (and where they were seen)
                top = max(((i, k) for i, k, ok in seen if ok and k[1] >= j), default=None)
                bottom = min(((i, k) for i, k, ok in seen if not ok and k[1] <= j), default=None)
                for i in range(len(self.space.ns)):
                    key = (f, j, i)
                    if key in self.status:
                        continue
                    if top is not None and i <= top[0]:
                        self.status[key] = ("inferred-pass", f"{self.cfgs[top[1]].id} passed (monotonicity)")
                        self.source[key] = top[1]
                    elif bottom is not None and i >= bottom[0]:
                        self.status[key] = ("inferred-fail", f"{self.cfgs[bottom[1]].id} failed (monotonicity)")
                        self.source[key] = bottom[1]

    def best(self) -> Key | None:
        passes = [k for k in self.cfgs if self.passed(k)]
        return max(passes, key=self.rank) if passes else None

    def candidates(self) -> list[Key]:
        """Step 4's bound: the open points that would beat the best pass so far."""
        b = self.best()
        return [k for k in self.cfgs if k not in self.status and (b is None or self.rank(k) > self.rank(b))]

    def choose_column(self, cands: list[Key]) -> Key:
        """Doubling then bisection on N in the column (ctx) holding the best candidate."""
        top = max(cands, key=self.rank)
        f, j = top[0], top[1]
        col = sorted(k[2] for k in cands if k[0] == f and k[1] == j)
        lo, hi = col[0], col[-1]
        colkey = (f, j)
        if colkey not in self.started:
            self.started.add(colkey)
            guess = [i for i in col if self.preds[(f, j, i)] is not None and self.predicted_ok(self.preds[(f, j, i)])]
            i = guess[-1] if guess else lo  # start at the predicted frontier, else the smallest candidate
            self.step[colkey] = 1
        elif colkey not in self.bisecting and self.col_last[colkey] < lo:
            self.step[colkey] *= 2  # the last probe here passed and nothing failed yet: double the step up
            i = min(hi, self.col_last[colkey] + self.step[colkey] // 2)
        else:
            self.bisecting.add(colkey)  # a fail bounds the column: bisect what is left
            i = (lo + hi) // 2
        self.col_last[colkey] = i
        return f, j, i

    def choose_split(self, cands: list[Key]) -> Key:
        """The probe that settles the most candidates: a pass settles every candidate it dominates
        and every candidate ranked below it (it becomes the best); a fail settles every candidate
        that dominates it. Weighted by the prediction (80/20) when there is one, else the worse of
        the two outcomes (a 2-D bisection)."""
        ranks = {k: self.rank(k) for k in cands}
        # trust in the prediction: how often it agreed with the boots so far (Laplace-smoothed)
        checked = [(self.predicted_ok(self.preds[k]), self.passed(k)) for k in self.order if self.preds[k] is not None]
        trust = (sum(a == b for a, b in checked) + 1) / (len(checked) + 2)
        weight = max(0.0, min(0.8, 2 * (trust - 0.5)))
        best_key, best_score = None, None
        for x in cands:
            fx, jx, ix = x
            rx = ranks[x]
            on_pass = sum(1 for k in cands if ranks[k] <= rx or (k[0] == fx and k[1] <= jx and k[2] <= ix))
            on_fail = sum(1 for k in cands if k[0] == fx and k[1] >= jx and k[2] >= ix)
            pred = self.preds[x]
            balanced = min(on_pass, on_fail)
            if pred is None or weight == 0:
                score: tuple[float, ...] = (balanced, max(on_pass, on_fail), rx)
            else:
                p = 0.5 + weight / 2 if self.predicted_ok(pred) else 0.5 - weight / 2
                score = (weight * (p * on_pass + (1 - p) * on_fail) + (1 - weight) * balanced, rx)
            if best_score is None or score > best_score:
                best_key, best_score = x, score
        assert best_key is not None
        return best_key

    def booted(self, key: Key, o: Outcome) -> None:
        self.order[key] = len(self.order) + 1
        self.outcomes[key] = o
        self.status[key] = ("booted-pass" if o.passed else "booted-fail", o.reason)

    def result(self, seconds: float, max_boots: int | None = None, stopped_early: bool = False) -> SearchResult:
        b = self.best()
        probes = [Probe(cfg, *self.status.get(key, ("not-needed", "cannot beat the knee (objective bound)")),
                        self.preds[key], self.order.get(key), self.outcomes.get(key),
                        self.cfgs[self.source[key]].id if key in self.source else None)
                  for key, cfg in self.cfgs.items()]
        knee = self.cfgs[b] if b else None
        edge = boundary(probes, self.space)
        return SearchResult(knee, probes, len(self.order), self.space.size, self.known_used, seconds=seconds,
                            boundary=edge, binding_slo=binding_slo(edge, knee), max_boots=max_boots,
                            stopped_early=stopped_early)


def search_capacity(base: CapacityConfig, space: SearchSpace, evaluate: Callable[[CapacityConfig], Outcome],
                    predict: Callable[[CapacityConfig], Prediction] | None = None,
                    known: Mapping[str, Outcome] | None = None, prune: str = "fit",
                    predicted_ok: Callable[[Prediction], bool] = default_predicted_ok,
                    max_boots: int | None = None, log: Callable[[str], None] | None = None,
                    strategy: str = "split") -> SearchResult:
    """Find the knee of ``space`` around ``base`` (profile, model, flags), booting as little as possible.

    ``prune``: ``"fit"`` never boots configs predicted not to fit (or that llama-server would refuse),
    ``"slo"`` also skips those predicted to miss the headroom SLO, ``"none"`` uses the prediction only
    to choose where to start. ``known`` maps config ids to outcomes already measured.
    ``max_boots`` stops early (the knee is then the best pass found so far).
    """
    if prune not in ("fit", "slo", "none"):
        raise ValueError("prune must be 'fit', 'slo' or 'none'")
    if strategy not in ("split", "columns"):
        raise ValueError("strategy must be 'split' or 'columns'")
    t0 = time.monotonic()
    search = _Search(base, space, predict, dict(known or {}), prune, predicted_ok)
    choose = search.choose_split if strategy == "split" else search.choose_column
    stopped = False
    while True:
        search.infer()
        cands = search.candidates()
        if cands and max_boots is not None and len(search.order) >= max_boots:
            stopped = True
        if not cands or stopped:
            break
        key = choose(cands)
        cfg = search.cfgs[key]
        o = _run(evaluate, cfg)
        search.booted(key, o)
        if log:
            log(f"search boot #{len(search.order)}: {cfg.id} {'pass' if o.passed else 'FAIL'} ({o.reason})")
    search.infer()
    return search.result(time.monotonic() - t0, max_boots, stopped)


def grid_search(base: CapacityConfig, space: SearchSpace, evaluate: Callable[[CapacityConfig], Outcome],
                log: Callable[[str], None] | None = None) -> SearchResult:
    """Boot every grid point (the reference the search is measured against); knee = best pass."""
    t0 = time.monotonic()
    probes = []
    best: tuple[tuple[int, int, int, int], CapacityConfig] | None = None
    for k, cfg in enumerate(space.configs(base), start=1):
        o = _run(evaluate, cfg)
        probes.append(Probe(cfg, "booted-pass" if o.passed else "booted-fail", o.reason, None, k, o))
        if log:
            log(f"grid boot #{k}: {cfg.id} {'pass' if o.passed else 'FAIL'}")
        if o.passed:
            r = _objective(cfg, space.cache_types.index(cfg.cache_type_k))
            if best is None or r > best[0]:
                best = (r, cfg)
    return SearchResult(best[1] if best else None, probes, len(probes), space.size, seconds=time.monotonic() - t0)


def monotonicity_violations(result: SearchResult) -> list[str]:
    """Pairs of booted points that contradict the monotonicity assumption (a check on a full grid)."""
    booted = [p for p in result.probes if p.status.startswith("booted")]
    out = []
    for a in booted:
        for b in booted:
            same = (a.config.cache_type_k, a.config.mmproj) == (b.config.cache_type_k, b.config.mmproj)
            if same and a.passed is False and b.passed and b.config.n >= a.config.n and b.config.ctx >= a.config.ctx \
                    and a.config.id != b.config.id:
                out.append(f"{a.config.id} failed but larger {b.config.id} passed")
    return out


__all__ = ["MONOTONICITY", "Outcome", "Probe", "SearchResult", "SearchSpace", "default_predicted_ok", "grid_search",
           "monotonicity_violations", "search_capacity"]
