"""Matrix parsing and validation: what users write, and the one-line errors they get for mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_gpucap.matrix import MatrixError, config_from_mapping, load_matrix, parse_matrix

SHIPPED = Path(__file__).resolve().parents[1] / "capacity_tests" / "gpucap.toml"


def test_shipped_matrix_has_the_study_phase1_configs() -> None:
    matrix = load_matrix(SHIPPED)
    ids = [c.id for c in matrix.configs if c.profile == "4090" and c.backend == "llamacpp"]
    assert ids == ["4090-n3-ctx128k-mmproj-q8", "4090-n3-ctx64k-mmproj-q8", "4090-n5-ctx64k-mmproj-q8",
                   "4090-n5-ctx32k-mmproj-q8", "4090-n7-ctx32k-mmproj-q8",
                   # Phase 2: the Dev baseline and N=3 text-only 64K-256K
                   "4090-n1-ctx128k-mmproj-q8", "4090-n3-ctx64k-q8", "4090-n3-ctx128k-q8", "4090-n3-ctx200k-q8",
                   "4090-n3-ctx256k-q8"]
    # the vLLM guide's launch knobs on the GPU profiles
    guide = {c.id: c for c in matrix.configs if c.backend == "vllm" and c.profile in ("4090", "h100")}
    assert set(guide) == {"4090-vllm-n32-ctx32k", "h100-vllm-n256-ctx64k", "h100-vllm-n512-ctx16k"}
    assert guide["4090-vllm-n32-ctx32k"].gpu_memory_utilization == 0.85 and not guide["4090-vllm-n32-ctx32k"].mmproj
    assert guide["h100-vllm-n256-ctx64k"].max_num_batched_tokens == 65536
    gpu = matrix.profile("4090")
    assert (gpu.device, gpu.memory_gib, gpu.slo.headroom_gib) == ("cuda", 24.0, 1.5)
    assert (gpu.preflight.min_available_gib, gpu.preflight.post_boot_min_free_gib) == (13.0, 0.4)
    assert (gpu.watchdog.min_available_gib, gpu.watchdog.min_free_gib, gpu.watchdog.window_s) == (8.0, 0.2, 15.0)
    first = matrix.configs[[c.profile for c in matrix.configs].index("4090")]
    assert first.flash_attn == "on" and first.mmproj and first.total_ctx == 393216
    assert len([c for c in matrix.configs if c.profile == "cpu"]) >= 3


def test_defaults_merge_and_entry_overrides() -> None:
    matrix = parse_matrix({"profiles": {"cpu": {
        "defaults": {"cache_type": "q8_0", "threads": 2, "env": {"A": "1"}},
        "configs": [{"n": 2, "ctx": 4096}, {"n": 1, "ctx": 1000, "cache_type_v": "q4_0", "flash_attn": False}],
    }}}, None)
    a, b = matrix.configs
    assert (a.cache_type_k, a.cache_type_v, a.threads, a.env) == ("q8_0", "q8_0", 2, (("A", "1"),))
    assert a.id == "cpu-n2-ctx4k-q8"
    assert (b.cache_type_k, b.cache_type_v, b.flash_attn) == ("q8_0", "q4_0", "off")
    assert b.id == "cpu-n1-ctx1000-q8-q4"


@pytest.mark.parametrize("entry, message", [
    ({"n": 0, "ctx": 10}, "n must be a positive integer"),
    ({"n": 2, "ctx": "64k"}, "ctx must be a positive integer"),
    ({"n": 2, "ctx": 64.5}, "ctx must be a positive integer"),
    ({"n": True, "ctx": 64}, "n must be a positive integer"),
    ({"n": 2, "ctx": 64, "cache_type": "q9"}, "cache_type must be one of"),
    ({"n": 2, "ctx": 64, "backend": "tgi"}, "backend must be one of"),
    ({"n": 2, "ctx": 64, "ctxx": 1}, "unknown key 'ctxx'"),
    ({"n": 2}, "needs n (parallel slots) and ctx"),
    ({"n": 2, "ctx": 64, "extra_args": "--foo"}, "extra_args must be a list of strings"),
    ({"n": 2, "ctx": 64, "mmproj": "yes"}, "mmproj must be true or false"),
])
def test_invalid_entries_name_file_entry_and_fix(entry: dict, message: str) -> None:
    with pytest.raises(MatrixError) as err:
        parse_matrix({"profiles": {"cpu": {"configs": [{"n": 1, "ctx": 64}, entry]}}}, Path("m.toml"))
    text = str(err.value)
    assert text.startswith("m.toml: profiles.cpu.configs[1]: ")
    assert message in text and "\n" not in text


def test_profile_level_errors() -> None:
    with pytest.raises(MatrixError, match=r"profiles.cpu.slo: unknown key 'headroom'"):
        parse_matrix({"profiles": {"cpu": {"slo": {"headroom": 1}}}}, Path("m.toml"))
    with pytest.raises(MatrixError, match=r"device must be one of cuda, host"):
        parse_matrix({"profiles": {"cpu": {"device": "tpu"}}}, Path("m.toml"))
    with pytest.raises(MatrixError, match=r"names no \[models.nope\] table"):
        parse_matrix({"profiles": {"cpu": {"model": "generated:nope"}}}, Path("m.toml"))
    with pytest.raises(MatrixError, match=r"share the id"):
        parse_matrix({"profiles": {"cpu": {"configs": [{"n": 1, "ctx": 64}, {"n": 1, "ctx": 64}]}}}, None)


def test_toml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[profiles.cpu\n")
    with pytest.raises(MatrixError, match="not valid TOML"):
        load_matrix(bad)
    with pytest.raises(MatrixError, match="matrix file not found"):
        load_matrix(tmp_path / "missing.toml")


def test_marker_form_uses_the_same_validation() -> None:
    cfg = config_from_mapping("cpu", {"n": 3, "ctx": 65536, "mmproj": True, "cache_type": "q8_0"}, "marker")
    assert cfg.id == "cpu-n3-ctx64k-mmproj-q8"
    with pytest.raises(MatrixError, match="marker: n must be"):
        config_from_mapping("cpu", {"n": -1, "ctx": 4}, "marker")


def test_exclusive_is_a_boolean_and_defaults_to_true() -> None:
    with pytest.raises(MatrixError, match=r"profiles.cpu: exclusive must be true or false, got 'no'"):
        parse_matrix({"profiles": {"cpu": {"exclusive": "no"}}}, Path("m.toml"))
    shared = parse_matrix({"profiles": {"cpu": {"exclusive": False}, "gpu": {"device": "cuda", "gpu_index": 1}}},
                          Path("m.toml"))
    assert shared.profile("cpu").exclusive is False and shared.profile("gpu").exclusive is True
    assert (shared.profile("cpu").device_key, shared.profile("gpu").device_key) == ("host", "gpu1")
