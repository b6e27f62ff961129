"""Depth — the same request at 0, 25, 50, 75 and 95 % of a slot's context (the study's "fits but
collapses at depth"): prefill and decode rates, TTFT and ITL per depth, and the decode-rate ratio
deepest ÷ shallowest, judged by the profile's ``min_depth_ratio`` SLO when it sets one."""

from pytest_gpucap import Harness


def test_depth_sweep(gpucap_workload: Harness) -> None:
    """Every depth answers; the record holds five depths and the ratio (speeds are figures, not asserts)."""
    result = gpucap_workload.depth_sweep(max_tokens=8)
    points = result.points
    assert [p["depth_pct"] for p in points] == [0, 25, 50, 75, 95]
    assert not [p["error"] for p in points if p.get("error")]
    assert result.record["decode_ratio"] is not None
    result.assert_slos()
