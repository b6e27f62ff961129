"""Vision turns and the concurrent-images step, on the configs that load a projector (mmproj)."""

import pytest

from pytest_gpucap import Harness


def _needs_projector(harness: Harness) -> None:
    if not harness.handle.config.mmproj:
        pytest.skip("text-only config: vision turns run on mmproj configs")


def test_vision_turns(gpucap_workload: Harness) -> None:
    """The Vision workflow sends a 1000x562 PNG every other turn: each image costs prompt tokens
    (measured on the server) and a per-image memory figure is recorded."""
    _needs_projector(gpucap_workload)
    result = gpucap_workload.with_settings(duration_s=4.0).workflow("Vision")
    vis = result.record["vision"]
    assert vis["sent"] is True and vis["image_turns"] > 0, vis
    assert vis["image_tokens_per_image"] > 0, vis
    assert vis["image_mib"] is not None and vis["image_mib"] >= 0, vis
    assert result.metrics["turns_failed"] == 0, result.metrics["errors"]


def test_concurrent_images(gpucap_workload: Harness) -> None:
    """One image on every slot at the same moment: minimum free memory over the step is recorded and
    no request may fail (the study feared two concurrent images would OOM)."""
    _needs_projector(gpucap_workload)
    result = gpucap_workload.concurrent_images()
    vis = result.record["vision"]
    assert vis["concurrent"] == gpucap_workload.handle.config.n and vis["images"] == vis["concurrent"], vis
    assert vis["min_free_mib"] is not None, vis
    assert result.metrics["turns_ok"] == vis["concurrent"], result.metrics["errors"]
    result.assert_slos()
