"""The ``gpucap_search`` fixture's object: run the capacity search a test's marker declares.

The plugin lends it what a search needs from the session (``SearchSession``): spec resolution, the
memory probe, the record sink and the records already known, so this module needs no pytest state.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any, Callable

from . import prediction, records
from .backends import LaunchSpec
from .matrix import CapacityConfig
from .probes import MemoryProbe
from .search import Outcome, SearchResult, SearchSpace, known_outcomes, reusable_records, search_capacity
from .search_boot import boot_and_check


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


@dataclass
class SearchRun:
    """The ``gpucap_search`` fixture: run the capacity search declared by the test's marker."""

    base: CapacityConfig
    space: SearchSpace
    session: Callable[[], SearchSession]

    def run(self, prune: str = "fit") -> SearchResult:
        """Prune by prediction, boot only the configs that decide the knee, record every probe."""
        lent = self.session()
        profile = lent.spec_for(self.base).profile
        probe, test_id = lent.probe, lent.test_id

        def evaluate(cfg: CapacityConfig) -> Outcome:
            outcome = boot_and_check(cfg, lent.spec_for, probe=probe)
            if outcome.record is not None:
                lent.attach({**outcome.record, "test": test_id, "search_probe": True})
            return outcome

        base_spec = lent.spec_for(self.base)
        model = base_spec.model

        def predict(cfg: CapacityConfig) -> Any:
            return prediction.predict_for(cfg, profile, model, None, lent.calibration) if model else None

        host = {"python": platform.python_version(), **probe.describe()}
        earlier = reusable_records(lent.previous_records, self.base, host, base_spec.binary_version,
                                   str(model or ""))
        known = known_outcomes(earlier + [r for r in lent.records if r.get("kind") == "ceiling"])
        result = search_capacity(self.base, self.space, evaluate, predict=predict, known=known, prune=prune)
        lent.attach(records.SearchRecord.of(test_id, profile.name, result.as_dict()))
        return result


