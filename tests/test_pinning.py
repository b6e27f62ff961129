"""Pinning: a config's server sees exactly its cards (``gpus``), mapped through the caller's
``CUDA_VISIBLE_DEVICES``; llama.cpp and vLLM are told to match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CapacityRun, matrix_toml

from pytest_gpucap import records
from pytest_gpucap.backends import llamacpp, vllm
from pytest_gpucap.matrix import CapacityConfig, HostProfile, MatrixError, config_from_mapping
from pytest_gpucap.pinning import (
    PinError, config_gpus, device_keys, llama_args, map_gpus, parse_gpu_list, probe_cards, worker_gpu,
)

UUIDS = "GPU-0a1b2c3d-0000-1111-2222-333344445555,GPU-9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff"

#: The inner test reads the running server's environment from /proc and saves what it found.
READ_ENVIRON = '''
import json, os
from pathlib import Path

def test_environ(gpucap_server):
    raw = Path(f"/proc/{gpucap_server.pid}/environ").read_bytes().split(b"\\0")
    env = dict(e.decode().split("=", 1) for e in raw if b"=" in e)
    Path("seen.json").write_text(json.dumps({"cvd": env.get("CUDA_VISIBLE_DEVICES"), "argv": gpucap_server.argv,
                                             "pid": gpucap_server.pid}))
'''


@pytest.mark.parametrize(("caller", "expected"), [(None, "1"), ("3,5", "5"), (UUIDS, UUIDS.split(",")[1])])
def test_running_server_sees_exactly_its_card(capacity_run: CapacityRun, tiny_model: Path,
                                              monkeypatch: pytest.MonkeyPatch, caller: str | None,
                                              expected: str) -> None:
    if caller is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", caller)
    matrix = matrix_toml(tiny_model, "[[profiles.cpu.configs]]\nn = 1\nctx = 512\ngpus = [1]\n")
    result = capacity_run.run(matrix, test_src=READ_ENVIRON)
    result.assert_outcomes(passed=1)
    seen = json.loads((capacity_run.pytester.path / "seen.json").read_text())
    assert seen["pid"] and seen["cvd"] == expected
    assert "--split-mode" not in seen["argv"] and "--main-gpu" not in seen["argv"]  # host profile: only the variable


def test_a_card_the_caller_cannot_see_skips_with_the_reason(capacity_run: CapacityRun, tiny_model: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    result = capacity_run.run(matrix_toml(tiny_model, "[[profiles.cpu.configs]]\nn = 1\nctx = 512\ngpus = [1]\n"),
                              "--gpucap-report", "rep")
    result.assert_outcomes(skipped=1)
    assert ("cpu-n1-ctx512-f16-gpu1: gpus = [1]: card(s) [1] not visible (CUDA_VISIBLE_DEVICES='3' lists 1 card(s), "
            "numbered from 0)") in result.stdout.str()


def test_pinned_ceiling_record_names_its_cards(capacity_run: CapacityRun, tiny_model: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    result = capacity_run.run(matrix_toml(tiny_model, "[[profiles.cpu.configs]]\nn = 1\nctx = 512\ngpus = [0, 1]\n"),
                              "--gpucap-report", "rep")
    result.assert_outcomes(passed=1)
    (rec,) = records.read_jsonl(capacity_run.pytester.path / "rep" / "results.jsonl")
    assert rec["config_id"] == "cpu-n1-ctx512-f16-gpu0+1"
    assert (rec["server"]["gpus"], rec["server"]["visible_devices"], rec["server"]["device"]) == (
        [0, 1], "3,5", "gpu3+gpu5")


# ---------------------------------------------------------------- the pieces, without a server

def test_cards_come_from_the_config_then_the_worker_then_the_cuda_profile() -> None:
    cfg = CapacityConfig(profile="p", n=1, ctx=512)
    cuda, host = HostProfile(name="p", device="cuda", gpu_index=2), HostProfile(name="p")
    assert config_gpus(cfg, cuda) == (2,) and config_gpus(cfg, host) == ()
    assert config_gpus(cfg, host, worker_gpu=1) == (1,) and config_gpus(cfg, cuda, worker_gpu=1) == (1,)
    assert config_gpus(CapacityConfig(profile="p", n=1, ctx=512, gpus=(0, 3)), cuda, worker_gpu=1) == (0, 3)
    assert device_keys((), host) == ("host",) and device_keys(("0", "3"), host) == ("gpu0", "gpu3")


def test_mapping_through_the_callers_list() -> None:
    assert map_gpus((1,), None) == ("1",)
    assert map_gpus((1, 0), " 3, 5 ") == ("5", "3")
    assert map_gpus((0,), UUIDS) == (UUIDS.split(",")[0],)
    with pytest.raises(PinError, match=r"card\(s\) \[2\] not visible"):
        map_gpus((0, 2), "3,5")
    with pytest.raises(PinError):
        map_gpus((0,), "")  # CUDA_VISIBLE_DEVICES= hides every card
    assert probe_cards(("5", UUIDS.split(",")[0])) == (5, UUIDS.split(",")[0])


def test_llama_cpp_and_vllm_flags_follow_the_card_count(tiny_model: Path) -> None:
    assert llama_args(1, cuda=True) == ["--split-mode", "none", "--main-gpu", "0"]
    assert llama_args(2, cuda=True) == ["--split-mode", "layer", "--tensor-split", "1,1"]
    assert llama_args(2, cuda=False) == [] and llama_args(0, cuda=True) == []
    cfg = CapacityConfig(profile="p", n=1, ctx=512, gpus=(0, 1), extra_args=("--no-mmap",))
    argv = llamacpp.build_argv(Path("llama-server"), cfg, tiny_model, 8080, None, llama_args(2, cuda=True))
    assert argv[-5:] == ["--split-mode", "layer", "--tensor-split", "1,1", "--no-mmap"]
    vcfg = CapacityConfig(profile="p", n=1, ctx=512, backend="vllm", gpus=(0, 1))
    gpu = vllm.build_argv(("vllm", "serve"), vcfg, tiny_model.parent, 8080, cpu=False, n_cards=2)
    assert gpu[gpu.index("--tensor-parallel-size") + 1] == "2"
    assert "--tensor-parallel-size" not in vllm.build_argv(("vllm", "serve"), vcfg, tiny_model.parent, 8080,
                                                           cpu=True, n_cards=2)


def test_matrix_gpus_validation() -> None:
    assert config_from_mapping("p", {"n": 1, "ctx": 512, "gpus": [1, 0]}, "w").gpus == (1, 0)
    for bad in ([], [0, 0], [-1], "0", [True]):
        with pytest.raises(MatrixError, match="gpus must be a non-empty list"):
            config_from_mapping("p", {"n": 1, "ctx": 512, "gpus": bad}, "w")
    with pytest.raises(MatrixError, match="tensor_parallel_size = 4 but gpus lists 2"):
        config_from_mapping("p", {"n": 1, "ctx": 512, "backend": "vllm", "gpus": [0, 1],
                                  "tensor_parallel_size": 4}, "w")


def test_gpu_list_option_and_worker_cards() -> None:
    assert parse_gpu_list("auto") is None and parse_gpu_list("0, 2") == (0, 2)
    for bad in ("", "0,0", "a", "-1"):
        with pytest.raises(ValueError, match="--gpucap-gpus must be auto"):
            parse_gpu_list(bad)
    assert [worker_gpu((0, 2), w) for w in ("gw0", "gw1", "gw2", None)] == [0, 2, 0, 0]
    assert worker_gpu((), "gw1") is None
