"""The server's own memory report, parsed from a real llama-server log, against first principles."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_weights_in_model_buffers
from pytest_gpucap.matrix import CapacityConfig, HostProfile
from pytest_gpucap.probes import HostProbe
from pytest_gpucap.modelgen import ModelShape, ensure_model
from pytest_gpucap.backends import LaunchSpec, ServerHandle

BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
MIB = 1024 * 1024


def boot(binary: Path, model: Path, cfg: CapacityConfig, log_dir: Path) -> ServerHandle:
    spec = LaunchSpec(config=cfg, profile=HostProfile(name="cpu", memory_gib=2.0), log_dir=log_dir,
                      command=(str(binary),), model=model, boot_timeout_s=60, hold_s=0.2)
    return ServerHandle(spec, HostProbe(2048)).boot()


@pytest.mark.parametrize("shape, cache", [
    (ModelShape(), "f16"),
    (ModelShape(), "q8_0"),
    (ModelShape(n_head_kv=4, name="gpucap-mha"), "q4_0"),
    (ModelShape(n_layer=3, n_head_kv=1, name="gpucap-mqa"), "f32"),
])
def test_kv_report_matches_first_principles(llama_server_bin: Path, model_cache: Path, tmp_path: Path,
                                            shape: ModelShape, cache: str) -> None:
    """llama_kv_cache size = layers x cells x seqs x kv width x bytes/element x 2 (K and V)."""
    cfg = CapacityConfig(profile="cpu", n=3, ctx=1024, cache_type_k=cache, cache_type_v=cache,
                         threads=1, cache_ram_mib=0, flash_attn="on")
    handle = boot(llama_server_bin, ensure_model(shape, model_cache), cfg, tmp_path)
    try:
        report = handle.report
        kv_width = shape.n_head_kv * shape.head_size
        expected = shape.n_layer * cfg.ctx * cfg.n * kv_width * BYTES_PER_ELEMENT[cache] * 2 / MIB
        (line,) = report.kv
        assert (line.cells, line.seqs, line.layers, line.type_k, line.type_v) == (
            cfg.ctx, cfg.n, shape.n_layer, cache, cache)
        assert line.size_mib == pytest.approx(expected, abs=0.01)
        assert report.kv_per_slot_mib(cfg.n) == pytest.approx(expected / cfg.n, abs=0.01)
        assert report.kv_buffer_mib["CPU"] == pytest.approx(expected, abs=0.01)
        assert_weights_in_model_buffers(report.model_mib, shape.approx_bytes() / MIB, rel=0.05)
        assert report.compute_mib["CPU"] > 0
        assert (report.n_slots, report.n_ctx_slot, report.prompt_cache_limit_mib) == (cfg.n, cfg.ctx, None)
        assert handle.after_load is not None and handle.after_load.server_rss_mib
        assert handle.after_load.server_rss_mib > expected
    finally:
        teardown = handle.stop()
    assert teardown.returncode == 0 and not teardown.killed and teardown.reclaimed
    # The breakdown table is printed at a clean exit and is picked up at teardown.
    (host,) = [row for row in handle.report.breakdown if row.device == "Host"]
    assert host.context_mib == pytest.approx(expected, abs=1.0)


def test_stop_is_idempotent_and_frees_memory(llama_server_bin: Path, tiny_model: Path, tmp_path: Path) -> None:
    cfg = CapacityConfig(profile="cpu", n=1, ctx=512, threads=1, cache_ram_mib=0)
    handle = boot(llama_server_bin, tiny_model, cfg, tmp_path)
    pid = handle.pid
    first = handle.stop()
    assert handle.stop() is first
    assert handle.pid is None and pid is not None
    assert first.reclaim_s is not None and first.reclaim_s < 30
