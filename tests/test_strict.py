"""``--gpucap-strict``: a gate that is red when a selected config was not measured, or none was selected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CapacityRun, matrix_toml

from pytest_gpucap.matrix import load_matrix

ROOT = Path(__file__).resolve().parents[1]


def _capacity_suite(*args: str) -> subprocess.CompletedProcess[str]:
    """The project's own capacity suite in a subprocess, with no gpucap settings from this environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUCAP_") and k != "PYTEST_ADDOPTS"}
    return subprocess.run([sys.executable, "-m", "pytest", "capacity_tests", "-p", "no:cacheprovider", "-q", "-rs",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _strict_lines(out: str) -> list[str]:
    return [ln.removeprefix("gpucap strict: ") for ln in out.splitlines() if ln.startswith("gpucap strict: ")]


def test_4090_gate_on_a_host_without_its_gpu_and_model_fails_with_one_line_per_config() -> None:
    ids = [c.id for c in load_matrix(ROOT / "capacity_tests" / "gpucap.toml").configs if c.profile == "4090"]
    strict = _capacity_suite("-m", "4090", "--gpucap-strict")
    assert strict.returncode == 1, strict.stdout[-3000:]
    lines = _strict_lines(strict.stdout)
    assert [ln.split(" not measured: ")[0] for ln in lines] == ids
    assert all(ln.split(" not measured: ")[1] for ln in lines)
    assert any("names no model" in ln for ln in lines) and any("vLLM" in ln for ln in lines)

    plain = _capacity_suite("-m", "4090")
    assert plain.returncode == 0, plain.stdout[-3000:]
    assert _strict_lines(plain.stdout) == []
    assert "SKIPPED" in plain.stdout and "names no model" in plain.stdout


def test_a_selection_without_capacity_configs_fails() -> None:
    result = _capacity_suite("-m", "nosuchprofile", "--gpucap-strict")
    assert result.returncode != 0
    assert _strict_lines(result.stdout) == [
        "no capacity configuration was selected (check -m and the matrix's profile names)"]


NO_MARKER_CHECK = "[pytest]\naddopts = -p no:cacheprovider\n"


@pytest.mark.parametrize("how", ["flag", "env", "ini"])
def test_empty_selection_exits_1_not_5_by_flag_env_or_ini(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                          tiny_model: Path, how: str) -> None:
    ini = NO_MARKER_CHECK + ("gpucap_strict = true\n" if how == "ini" else "")
    pytester.makeini(ini)
    pytester.makefile(".toml", gpucap=matrix_toml(tiny_model, "[[profiles.cpu.configs]]\nn = 1\nctx = 512\n"))
    pytester.makepyfile(test_capacity="def test_ceiling(gpucap_ceiling):\n    pass\n")
    args = ["--gpucap-matrix", "gpucap.toml", "-m", "nosuchprofile"]
    monkeypatch.delenv("GPUCAP_STRICT", raising=False)
    if how == "flag":  # without the gate: pytest's own "no tests collected"
        assert pytester.runpytest_subprocess(*args).ret == pytest.ExitCode.NO_TESTS_COLLECTED
        args.append("--gpucap-strict")
    if how == "env":
        monkeypatch.setenv("GPUCAP_STRICT", "1")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == 1
    assert "gpucap strict: no capacity configuration was selected" in result.stdout.str()


def test_measured_configs_pass_the_gate_and_an_unmeasured_one_is_named(capacity_run: CapacityRun,
                                                                       tiny_model: Path) -> None:
    configs = """
        [[profiles.cpu.configs]]
        n = 1
        ctx = 512
        [[profiles.cpu.configs]]
        n = 1
        ctx = 512
        mmproj = true
    """
    result = capacity_run.run(matrix_toml(tiny_model, configs), "--gpucap-strict", "-m", "cpu")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == 1
    lines = _strict_lines(result.stdout.str())
    assert len(lines) == 1 and lines[0].startswith("cpu-n1-ctx512-mmproj-f16 not measured: ")
    assert "vision projector" in lines[0]
    ok = capacity_run.run(matrix_toml(tiny_model, configs), "--gpucap-strict", "-m", "cpu", "-k", "not mmproj")
    ok.assert_outcomes(passed=1, deselected=1)
    assert ok.ret == 0 and _strict_lines(ok.stdout.str()) == []


def test_a_test_that_never_boots_its_server_does_not_count_as_measured(capacity_run: CapacityRun,
                                                                       tiny_model: Path) -> None:
    result = capacity_run.run(matrix_toml(tiny_model, "[[profiles.cpu.configs]]\nn = 1\nctx = 512\n"),
                              "--gpucap-strict", test_src="def test_only_config(gpucap_config):\n    pass\n")
    result.assert_outcomes(passed=1)
    assert result.ret == 1
    assert _strict_lines(result.stdout.str()) == ["cpu-n1-ctx512-f16 not measured: no test of it booted its server"]
