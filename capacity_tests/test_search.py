"""Find the capacity knee without booting the whole grid: prune by prediction, then boot what decides it.

One case per profile whose matrix declares ``[profiles.NAME.search]`` (marked with the profile, so
``-m NAME`` selects it); each probe is judged on every SLO of the profile after a short workload.
"""

from pytest_gpucap import SearchRun


def test_capacity_knee(gpucap_search: SearchRun) -> None:
    """The largest N x ctx on the profile's budget that meets every SLO, its boundary and binding SLO."""
    result = gpucap_search.run()
    assert result.knee is not None, result.table()
    assert result.boots <= gpucap_search.decl.boot_budget, result.table()
    assert result.boots < result.grid_size, result.table()
    print("\n" + result.table())
