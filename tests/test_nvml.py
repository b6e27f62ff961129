"""NVML logic on recorded readings: the thin adapter functions in ``pytest_gpucap.nvml`` are faked
with values recorded from real ``nvidia-smi`` output (``tests/fixtures/cuda/nvml_*.json``, each naming
its source thread); selection, attribution, errors, the probe and the timeline run as on a GPU host.
"""

from __future__ import annotations

import ctypes.util
import json
import socket
import time
from pathlib import Path
from typing import Any

import pynvml
import pytest

from pytest_gpucap import nvml
from pytest_gpucap.probes import DevicePoint, NvmlError, NvmlProbe, Sampler, Timeline

FIXTURES = Path(__file__).parent / "fixtures" / "cuda"
MIB = 1024 * 1024


def reading(name: str) -> dict[str, Any]:
    data = json.loads((FIXTURES / name).read_text())
    assert data["source"] and data["url"].startswith("https://github.com/")
    return data


class FakeNvml:
    """Stands in for the GPU behind the adapter functions (no NVIDIA driver on this machine);
    answers from one recorded reading. ``used`` overrides a device's used MiB (a timeline)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.by_index = {g["index"]: g for g in data["gpus"]}
        self.by_uuid = {d["uuid"]: d for g in data["gpus"] for d in [g, *g.get("mig", [])] if "uuid" in d}
        self.inited = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "FakeNvml":
        def not_found(*_: Any) -> Any:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

        def init() -> None:
            self.inited += 1

        def shutdown() -> None:
            self.inited -= 1

        def mig(parent: dict[str, Any], i: int) -> dict[str, Any]:
            return parent.get("mig", [])[i] if i < len(parent.get("mig", [])) else not_found()

        def mem(h: dict[str, Any]) -> tuple[int, int, int]:
            return h["total_mib"] * MIB, h["used_mib"] * MIB, (h["total_mib"] - h["used_mib"]) * MIB

        adapter = {
            "init": init, "shutdown": shutdown, "device_count": lambda: len(self.by_index),
            "handle_by_index": lambda i: self.by_index.get(i) or not_found(),
            "handle_by_uuid": lambda u: self.by_uuid.get(u) or not_found(),
            "mig_handle": mig, "memory_info": mem,
            "name": lambda h: h["name"] if "name" in h else f"MIG GI {h['gi']}",
            "uuid": lambda h: h.get("uuid", f"MIG-recorded-gi-{h.get('gi')}" if "gi" in h else "GPU-recorded"),
            "driver_version": lambda: self.data.get("driver", "unknown"),
            "cuda_driver_version": lambda: self.data.get("cuda", 0),
            "compute_processes": lambda h: [(p, v * MIB) for p, v in h.get("compute", [])],
            "graphics_processes": lambda h: [(p, v * MIB) for p, v in h.get("graphics", [])],
        }
        for fn, fake in adapter.items():
            monkeypatch.setattr(nvml, fn, fake)
        return self


# ---------------------------------------------------------------- selection

def test_select_by_index_gpu_uuid_mig_uuid_and_mig_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(reading("nvml_a100_mig_list.json")).install(monkeypatch)
    gpus = nvml.select([2, "GPU-69ec2344-ebac-b028-f88f-452abb3d7f11", "MIG-a45882f0-9215-5733-a0c1-49286ab31cb5",
                        "0:3"])
    assert [g.uuid for g in gpus] == ["GPU-5e375e7e-b41f-155b-dcdc-534524c356fc",
                                      "GPU-69ec2344-ebac-b028-f88f-452abb3d7f11",
                                      "MIG-a45882f0-9215-5733-a0c1-49286ab31cb5",
                                      "MIG-930574a9-d43a-5d2b-95da-3e68384c8d6b"]
    assert [g.mig for g in gpus] == [False, False, True, True]
    assert gpus[2].name == "NVIDIA A100-SXM4-80GB MIG 1g.20gb"


@pytest.mark.parametrize("spec, says", [
    (7, "GPU 7 not found"), ("GPU-00000000-0000-0000-0000-000000000000", "not found"), ("0:4", "GPU 0:4 not found"),
    ("cuda:0", "neither an NVML index"),
])
def test_select_unknown_device_says_which(monkeypatch: pytest.MonkeyPatch, spec: Any, says: str) -> None:
    FakeNvml(reading("nvml_a100_mig_list.json")).install(monkeypatch)
    with pytest.raises(NvmlError, match=says):
        nvml.select([spec])


# ---------------------------------------------------------------- attribution

def test_server_baseline_and_free_on_a_two_gpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(reading("nvml_2x5090_llama_server.json")).install(monkeypatch)
    gpu0, gpu1 = nvml.select([0, 1])
    r1 = nvml.read(gpu1, [2474219])
    assert (r1.used_mib, r1.server_mib, r1.free_mib) == (30746, 30548, 32607 - 30746)
    assert r1.baseline_mib == 198  # kwin_wayland's 14 MiB plus what no process is charged for
    assert r1.others_mib == 14  # the C+G process counted once, not in both lists
    both = nvml.combine([nvml.read(gpu0, [2474219]), r1])
    assert (both.server_mib, both.used_mib, both.total_mib) == (30528 + 30548, 30743 + 30746, 2 * 32607)
    assert both.attribution == "processes"


def test_a_server_nvml_cannot_see_leaves_its_share_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(reading("nvml_2x5090_llama_server.json")).install(monkeypatch)
    (gpu1,) = nvml.select([1])
    r = nvml.read(gpu1, [4242])  # e.g. a PID from inside a container
    assert r.server_mib is None and r.baseline_mib is None and "PID namespace" in r.attribution
    assert r.others_mib == 30548 + 14 and r.free_mib == 32607 - 30746


def test_mig_instances_attribute_per_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(reading("nvml_a100_mig_procs.json")).install(monkeypatch)
    gi3, gi5, gi6 = nvml.select(["1:0", "1:1", "1:2"])
    r = nvml.read(gi3, [34965])
    assert (r.total_mib, r.used_mib, r.free_mib, r.server_mib, r.others_mib) == (19968, 14366, 5602, 14195, 149)
    assert r.baseline_mib == 171
    assert nvml.read(gi5, [46505]).baseline_mib == 9880 - 9807
    # the recorded GI 6 lists a 9865 MiB process on an instance showing 13 MiB used: flagged, not hidden
    odd = nvml.read(gi6, [42859])
    assert odd.server_mib == 9865 and "different moments" in odd.attribution


def test_unknown_per_process_figure_is_not_zero() -> None:
    procs = nvml.merge_processes([(10, None)], [(11, 5 * MIB)])
    r = nvml.attribute(100 * MIB, 50 * MIB, 50 * MIB, procs, [10])
    assert r.server_mib is None and "per-process" in r.attribution
    assert nvml._bytes(2**64 - 1) is None  # NVML_VALUE_NOT_AVAILABLE


# ---------------------------------------------------------------- errors → skip reasons

@pytest.mark.parametrize("code, says", [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML library not found"),
    (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "driver/library version mismatch"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver not loaded"),
    (pynvml.NVML_ERROR_NO_PERMISSION, "no permission"),
    (pynvml.NVML_ERROR_UNKNOWN, "no NVIDIA GPU usable"),
])
def test_init_failures_give_a_clear_skip_reason(monkeypatch: pytest.MonkeyPatch, code: int, says: str) -> None:
    def fail() -> None:
        raise pynvml.NVMLError(code)

    monkeypatch.setattr(nvml, "init", fail)
    with pytest.raises(NvmlError, match=says):
        NvmlProbe(devices=[0])


@pytest.mark.skipif(bool(ctypes.util.find_library("nvidia-ml")), reason="this host has libnvidia-ml")
def test_real_nvml_on_a_host_without_a_driver() -> None:
    with pytest.raises(NvmlError, match="NVML library not found"):
        NvmlProbe(0)


# ---------------------------------------------------------------- the probe

def test_probe_reads_its_devices_and_names_them(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(reading("nvml_2x5090_llama_server.json")).install(monkeypatch)
    probe = NvmlProbe(devices=[0, 1])
    dev = probe.device([2474219])
    assert (dev.server_mib, dev.baseline_mib, dev.free_mib) == (61076, 30743 + 30746 - 61076, 2 * 32607 - 61489)
    info = probe.describe()
    assert info["hostname"] == socket.gethostname() and info["gpus"] == "0,1"
    assert info["gpu"] == "NVIDIA GeForce RTX 5090, NVIDIA GeForce RTX 5090"
    assert (info["driver"], info["cuda"]) == ("610.57.04", "13.3")
    assert "gpu_index" not in info
    probe.close()
    assert fake.inited == 0


def test_probe_keeps_index_and_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(reading("nvml_2x5090_llama_server.json")).install(monkeypatch)
    probe = NvmlProbe(1, 24 * 1024)  # the older form: one index, emulate a 24 GiB card
    dev = probe.device([])
    assert (dev.total_mib, dev.used_mib, dev.free_mib, dev.server_mib) == (24576, 30746, 24576 - 30746, None)
    assert probe.describe()["gpu_index"] == "1"


# ---------------------------------------------------------------- timeline

def test_timeline_sees_a_short_spike_and_keeps_it_when_downsampled(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(reading("nvml_2x5090_llama_server.json")).install(monkeypatch)
    gpu0 = fake.by_index[0]
    probe = NvmlProbe(devices=[0])
    sampler = Sampler(probe, lambda: None, interval_s=5.0, device_interval_s=0.02).start()
    try:
        deadline = time.monotonic() + 10
        while len(sampler.timeline.points) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        gpu0["used_mib"] = 32000  # a spike between the slow snapshots
        n = len(sampler.timeline.points)
        while len(sampler.timeline.points) < n + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        gpu0["used_mib"] = 30743
        n = len(sampler.timeline.points)
        while len(sampler.timeline.points) < n + 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sampler.stop()
    tl = sampler.timeline
    assert tl.peak_used_mib == 32000 and tl.min_free_mib == 32607 - 32000
    kept = tl.downsampled(max_points=3)
    assert len(kept) <= 3 and min(p["free_mib"] for p in kept) == 607


def test_downsampled_is_bounded_ordered_and_keeps_the_minimum() -> None:
    tl = Timeline()
    for i in range(1000):
        tl.add_point(DevicePoint(100.0 + i * 0.1, 1000.0 + (500 if i == 617 else 0), 9000.0 - (500 if i == 617 else 0)))
    kept = tl.downsampled(max_points=50)
    assert len(kept) == 50 and kept[0]["t"] == 0.0
    assert [p["t"] for p in kept] == sorted(p["t"] for p in kept)
    assert min(p["free_mib"] for p in kept) == 8500 and tl.min_free_mib == 8500
    assert Timeline().downsampled() == []
