"""Phase 2 — are the configs fast enough? The study's workflows, tool-storm churn, and the ramp."""

import pytest

from pytest_gpucap.workload.harness import Harness


@pytest.mark.parametrize("workflow", ["A", "B"])
def test_workflow(gpucap_workload: Harness, workflow: str) -> None:
    """Workflow A (TL, Dev, QA: the asymmetric coding team) and B (3x Research: uniform load).

    Per-role p95 turn latency, aggregate tokens/s and error rate must meet the profile's SLOs.
    """
    result = gpucap_workload.workflow(workflow)
    assert result.metrics["turns_ok"] > 0, "no turn finished inside the window"
    result.assert_slos()


def test_toolstorm(gpucap_workload: Harness) -> None:
    """3x ToolStorm: rapid small turns; slot churn must stay clean (no failed turns)."""
    result = gpucap_workload.workflow("ToolStorm")
    assert result.metrics["turns_failed"] == 0, result.metrics["errors"]
    result.assert_slos()


@pytest.mark.gpucap_ramp
def test_agent_connection_ramp(gpucap_workload: Harness) -> None:
    """N concurrent agents, each with its own connection, doubling to the ceiling (the PR's Case 1)."""
    ramp = gpucap_workload.ramp()
    assert ramp["steps"], "the ramp ran no step"
    assert ramp["max_clean_n"] >= 1, ramp["steps"][0]
