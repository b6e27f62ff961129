"""The ``gpucap_search`` fixture's object: run the capacity search the matrix or a test's marker declares.

A search test is parametrized over the profiles whose matrix declares ``[profiles.NAME.search]``
(each case carries its profile's marker, so ``-m NAME`` selects it and a matrix without a ``cpu``
profile still collects); a ``@pytest.mark.gpucap_search(...)`` marker on the test declares one
search instead. The plugin lends a search what it needs from the session (``SearchSession``): spec
resolution, the memory probe, the record sink, the roles and workflows, and the records already known.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import pytest

from . import prediction, records
from .backends import LaunchSpec
from .matrix import SLO, CapacityConfig, Matrix, MatrixError
from .probes import MemoryProbe
from .search import Outcome, SearchResult, SearchSpace, search_capacity
from .search_boot import boot_and_check
from .search_checks import probe_checks
from .search_known import known_outcomes, reusable_records
from .search_space import SearchDecl, search_from_mapping
from .workload.roles import BUILTIN_WORKFLOWS

MARKER = "gpucap_search"
FIXTURE = "gpucap_search"


@dataclass(frozen=True)
class SearchSession:
    """What the pytest session lends one search."""

    spec_for: Callable[[CapacityConfig], LaunchSpec]
    probe: MemoryProbe
    attach: Callable[[Any], None]
    test_id: str
    calibration: Any
    previous_records: list[dict[str, Any]]
    records: list[dict[str, Any]]
    roles: Mapping[str, Any] = field(default_factory=dict)  # workload.roles.Role by name
    workflows: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # the matrix's own
    progress: Any = None


@dataclass
class SearchRun:
    """The ``gpucap_search`` fixture: run the declared capacity search."""

    decl: SearchDecl
    session: Callable[[], SearchSession]
    slo: SLO | None = None  # the profile's SLO with the test's gpucap_slo markers (None: the profile's)

    @property
    def base(self) -> CapacityConfig:
        assert self.decl.base is not None
        return self.decl.base

    @property
    def space(self) -> SearchSpace:
        d = self.decl
        return SearchSpace(d.ns, d.ctxs, d.cache_types, d.mmproj)

    def run(self, prune: str | None = None, max_boots: int | None = None) -> SearchResult:
        """Prune by prediction, boot only the configs that decide the knee (each judged on every SLO
        of the profile: headroom, then the probe workload's verdicts), record every probe. ``prune``
        and ``max_boots`` override the declaration's."""
        lent = self.session()
        decl, base = self.decl, self.base
        base_spec = lent.spec_for(base)
        slo = self.slo if self.slo is not None else base_spec.profile.slo
        profile, model = replace(base_spec.profile, slo=slo), base_spec.model  # predictions prune on it too
        probe, test_id = lent.probe, lent.test_id

        def record_probe(record: dict[str, Any]) -> None:
            lent.attach({**record, "test": test_id, "search_probe": True})

        checks = probe_checks(decl.probe.workflow, decl.probe.duration_s, profile.workload, lent.roles,
                              lent.workflows, test_id, record_probe, lent.progress)

        def evaluate(cfg: CapacityConfig) -> Outcome:
            outcome = boot_and_check(cfg, lent.spec_for, probe=probe, checks=checks, slo=slo)
            if outcome.record is not None:
                record_probe(dict(outcome.record))
            return outcome

        def predict(cfg: CapacityConfig) -> Any:
            return prediction.predict_for(cfg, profile, model, None, lent.calibration) if model else None

        host = {"python": platform.python_version(), **probe.describe()}
        workflow = decl.probe.workflow or None
        earlier = reusable_records(lent.previous_records + lent.records, base, host, base_spec.binary_version,
                                   str(model or ""), workload=workflow)
        known = known_outcomes(earlier, slo=slo, needs_workload=workflow)
        result = search_capacity(base, self.space, evaluate, predict=predict, known=known,
                                 prune=prune or decl.prune, strategy=decl.strategy,
                                 max_boots=max_boots if max_boots is not None else decl.boot_budget)
        summary = {**result.as_dict(), "probe_workload": {"workflow": decl.probe.workflow,
                                                          "duration_s": decl.probe.duration_s}}
        lent.attach(records.SearchRecord.of(test_id, profile.name, summary))
        return result


# ---------------------------------------------------------------- collection and the fixture

def generate(metafunc: pytest.Metafunc, matrix: Matrix) -> None:
    """Parametrize a test that asks for ``gpucap_search`` without a marker over the matrix's searches,
    one case per profile, marked with its profile and backend (``pytest_generate_tests``)."""
    if FIXTURE not in metafunc.fixturenames or metafunc.definition.get_closest_marker(MARKER):
        return
    params = [pytest.param(name, id=f"{name}-search", marks=[getattr(pytest.mark, name),
                                                             getattr(pytest.mark, decl.base.backend if decl.base
                                                                     else "llamacpp")])
              for name, decl in matrix.searches.items()]
    if not params:
        params = [pytest.param(None, id="no-search", marks=pytest.mark.skip(
            reason="the matrix declares no [profiles.NAME.search] table (README: \"Matrix file\")"))]
    metafunc.parametrize(FIXTURE, params, indirect=True)


def declared(request: pytest.FixtureRequest, matrix: Matrix) -> SearchDecl:
    """The search this test runs: its parametrized profile's ``[profiles.NAME.search]``, else its marker.
    A mistake in either fails the test with one line."""
    mark = request.node.get_closest_marker(MARKER)
    param = getattr(request, "param", None)
    if mark is None and param is None:
        pytest.fail(f"{FIXTURE} needs a [profiles.NAME.search] table in the matrix or "
                    "@pytest.mark.gpucap_search(profile=..., ns=[...], ctxs=[...])", pytrace=False)
    if mark is None:
        decl = matrix.searches[param]
    else:
        kw = dict(mark.kwargs)
        where = f"@pytest.mark.gpucap_search on {request.node.nodeid}"
        profile = kw.pop("profile", next(iter(matrix.profiles), "cpu"))
        if profile not in matrix.profiles:
            pytest.fail(f"{where}: unknown profile {profile!r} (known: {', '.join(matrix.profiles)})", pytrace=False)
        try:
            decl = search_from_mapping(profile, kw, matrix.defaults.get(profile, {}), where)
        except MatrixError as exc:
            pytest.fail(str(exc), pytrace=False)
    known = {**BUILTIN_WORKFLOWS, **matrix.workflows}
    if decl.probe.workflow and decl.probe.workflow not in known:
        pytest.fail(f"search of profile {decl.profile!r}: probe workflow {decl.probe.workflow!r} is not a "
                    f"workflow (known: {', '.join(sorted(known))})", pytrace=False)
    return decl


__all__ = ["FIXTURE", "MARKER", "SearchRun", "SearchSession", "declared", "generate"]
