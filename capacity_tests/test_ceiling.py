"""Phase 1 — the memory ceiling: each configuration boots, runs what was asked, and leaves headroom."""

from pytest_gpucap import Ceiling


def test_ceiling(gpucap_ceiling: Ceiling) -> None:
    """Free device memory after load (lowest reading through the hold window) meets the headroom SLO.

    The server fixture has already verified slots and per-slot context against ``/props`` and
    ``/slots``; the figures are recorded whether the SLO passes or not.
    """
    assert gpucap_ceiling.record["server"]["total_slots"] == gpucap_ceiling.record["config"]["n"]
    gpucap_ceiling.assert_slos()
