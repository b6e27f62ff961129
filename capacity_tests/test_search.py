"""Find the capacity knee without booting the whole grid: prune by prediction, then boot what decides it."""

import pytest

from pytest_gpucap import SearchRun


@pytest.mark.cpu
@pytest.mark.gpucap_search(profile="cpu", ns=[1, 2, 4, 8, 16, 32], ctxs=[8192, 16384, 32768, 65536, 131072],
                           cache_types=["f16", "q8_0"])
def test_capacity_knee(gpucap_search: SearchRun) -> None:
    """The largest N x ctx on the cpu profile's budget that keeps the headroom SLO, with evidence."""
    result = gpucap_search.run()
    assert result.knee is not None, result.table()
    assert result.boots < result.grid_size, result.table()
