"""Memory probes behind one interface, and the sampler that records a timeline while a config is up.

A GPU profile reads NVML (``nvidia-ml-py``); a host profile lets the server's resident memory
stand in for device memory against the profile's budget, so the same tests and SLOs run on a
machine without a GPU. Host MemAvailable is always recorded because that is what hangs a host.
"""

from __future__ import annotations

import platform
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import psutil

from . import nvml
from .nvml import NvmlError

__all__ = ["DeviceMemory", "HostProbe", "MemoryProbe", "MemorySnapshot", "NvmlError", "NvmlProbe", "Sampler",
           "Timeline", "take_snapshot"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class DeviceMemory:
    """Device memory as the profile sees it (capped by the profile budget)."""

    total_mib: float
    used_mib: float
    free_mib: float
    server_mib: float | None = None
    baseline_mib: float | None = None  # used - the server's share: co-tenants, desktop, driver


@dataclass(frozen=True)
class MemorySnapshot:
    """One reading of host and device memory."""

    t: float  # time.monotonic(), the clock request records use
    host_total_mib: float
    host_available_mib: float
    server_rss_mib: float | None
    device: DeviceMemory

    @property
    def free_gib(self) -> float:
        return self.device.free_mib / 1024


class MemoryProbe(Protocol):
    """Reads device memory; ``kind`` is ``nvml`` or ``host``."""

    kind: str

    def device(self, server_pids: Iterable[int]) -> DeviceMemory: ...

    def describe(self) -> dict[str, str]: ...

    def close(self) -> None: ...


def process_tree_rss_mib(pid: int | None) -> float | None:
    """Resident memory of a process and all its children (the server may fork helpers)."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / MIB


def tree_pids(pid: int | None) -> list[int]:
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.Error:
        return []


class HostProbe:
    """Host memory stands in for device memory: used = the server's RSS, total = the budget."""

    kind = "host"

    def __init__(self, budget_mib: float) -> None:
        self.budget_mib = budget_mib

    def device(self, server_pids: Iterable[int]) -> DeviceMemory:
        used = 0.0
        for pid in server_pids:
            try:
                used += psutil.Process(pid).memory_info().rss / MIB
            except psutil.Error:
                continue
        return DeviceMemory(self.budget_mib, used, self.budget_mib - used, used, 0.0)

    def describe(self) -> dict[str, str]:
        return {"device": "host", "hostname": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
                "cpus": str(psutil.cpu_count()), "ram_gib": f"{psutil.virtual_memory().total / 2**30:.1f}"}

    def close(self) -> None:
        pass


class NvmlProbe:
    """The GPUs a config runs on, through NVML (``nvml``), optionally capped to a smaller budget to
    emulate a smaller card.

    ``devices`` are NVML indices, ``GPU-``/``MIG-`` UUIDs or ``GPU:MIG`` pairs; several devices
    (tensor parallel) read as one: totals and the server's share summed. ``index`` is the older
    single-device form. Raises ``NvmlError`` whose message is the skip reason.
    """

    kind = "nvml"

    def __init__(self, index: int | None = None, budget_mib: float | None = None, *,
                 devices: Sequence[int | str] | None = None) -> None:
        specs = list(devices) if devices else [0 if index is None else index]
        try:
            nvml.init()
        except NvmlError:
            raise
        except Exception as exc:  # pynvml's NVMLError: library missing, driver mismatch, ...
            raise NvmlError(nvml.reason(exc)) from None
        try:
            self.gpus = nvml.select(specs)
        except NvmlError:
            self.close()
            raise
        self.index = specs[0] if len(specs) == 1 else None
        self.budget_mib = budget_mib

    def device(self, server_pids: Iterable[int]) -> DeviceMemory:
        pids = list(server_pids)
        reading = nvml.combine([nvml.read(g, pids) for g in self.gpus])
        total, used, free = reading.total_mib, reading.used_mib, reading.free_mib
        if self.budget_mib is not None and self.budget_mib < total:
            total = self.budget_mib
            free = min(free, total - used)
        return DeviceMemory(total, used, free, reading.server_mib if pids else None, reading.baseline_mib)

    def describe(self) -> dict[str, str]:
        out = {"device": "cuda", "hostname": socket.gethostname(),
               "gpu": ", ".join(g.name for g in self.gpus), "gpu_uuid": ", ".join(g.uuid for g in self.gpus),
               "gpus": ",".join(g.spec for g in self.gpus)}
        if self.index is not None:
            out["gpu_index"] = str(self.index)
        for key, read in (("gpu_total_gib", self._total_gib), ("driver", nvml.driver_version),
                          ("cuda", lambda: nvml.cuda_version_text(nvml.cuda_driver_version()))):
            try:
                out[key] = read()
            except Exception:  # an old driver without the call, a lost GPU: the record lacks the field
                continue
        return out

    def _total_gib(self) -> str:
        return f"{sum(nvml.memory_info(g.handle)[0] for g in self.gpus) / 2**30:.1f}"

    def close(self) -> None:
        try:
            nvml.shutdown()
        except Exception:  # already shut down, or NVML never came up
            pass


def take_snapshot(probe: MemoryProbe, server_pid: int | None) -> MemorySnapshot:
    vm = psutil.virtual_memory()
    return MemorySnapshot(
        t=time.monotonic(), host_total_mib=vm.total / MIB, host_available_mib=vm.available / MIB,
        server_rss_mib=process_tree_rss_mib(server_pid), device=probe.device(tree_pids(server_pid)),
    )


#: Device memory is read this often while a config is up, so a short spike (image encoding, a
#: large prefill) is seen; full snapshots (host memory, RSS) stay at the watchdog's interval.
DEVICE_INTERVAL_S = 0.1


@dataclass(frozen=True)
class DevicePoint:
    """One fast reading of device memory (MiB)."""

    t: float
    used_mib: float
    free_mib: float
    server_mib: float | None = None


@dataclass
class Timeline:
    """Snapshots taken while a config is up, the fast device readings, and the extremes that matter."""

    samples: list[MemorySnapshot] = field(default_factory=list)
    points: list[DevicePoint] = field(default_factory=list)

    def add(self, snap: MemorySnapshot) -> None:
        self.samples.append(snap)
        self.points.append(DevicePoint(snap.t, snap.device.used_mib, snap.device.free_mib, snap.device.server_mib))

    def add_point(self, point: DevicePoint) -> None:
        self.points.append(point)

    @property
    def min_free_mib(self) -> float | None:
        return min((p.free_mib for p in self.points), default=None)

    def between(self, start: float, end: float) -> list[DevicePoint]:
        """The fast device readings from ``start`` to ``end`` (one burst, one image's encoding)."""
        return [p for p in list(self.points) if start <= p.t <= end]

    @property
    def peak_used_mib(self) -> float | None:
        return max((p.used_mib for p in self.points), default=None)

    @property
    def min_host_available_mib(self) -> float | None:
        return min((s.host_available_mib for s in self.samples), default=None)

    @property
    def peak_server_rss_mib(self) -> float | None:
        return max((s.server_rss_mib or 0.0 for s in self.samples), default=None)

    def downsampled(self, max_points: int = 120, start: float | None = None,
                    end: float | None = None) -> list[dict[str, float]]:
        """At most ``max_points`` readings for the record, in time order: per bucket the reading with
        the least free memory, so the minimum (and the spike that caused it) survives. ``start``/``end``
        keep one window (a workload run); t stays counted from the first reading, so the windows of one
        server line up on one time axis."""
        everything = sorted(self.points, key=lambda p: p.t)
        if not everything:
            return []
        t0 = everything[0].t
        points = [p for p in everything if (start is None or p.t >= start) and (end is None or p.t <= end)]
        size = max(1, -(-len(points) // max_points))
        kept = [min(points[i:i + size], key=lambda p: p.free_mib) for i in range(0, len(points), size)]
        return [{"t": round(p.t - t0, 3), "used_mib": round(p.used_mib, 1), "free_mib": round(p.free_mib, 1)}
                for p in kept]


class Sampler:
    """Background threads: a snapshot every ``interval_s`` into a timeline, handed to observers, and
    a device-only reading every ``device_interval_s`` (≤ 100 ms) for the extremes."""

    def __init__(self, probe: MemoryProbe, pid: Callable[[], int | None], interval_s: float = 0.5,
                 observers: Iterable[Callable[[MemorySnapshot], None]] = (),
                 device_interval_s: float | None = DEVICE_INTERVAL_S) -> None:
        self.probe = probe
        self._pid = pid
        self.interval_s = interval_s
        self.device_interval_s = device_interval_s
        self.observers = list(observers)
        self.timeline = Timeline()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="gpucap-sampler", daemon=True)
        self._fast = threading.Thread(target=self._run_device, name="gpucap-device-sampler", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        if self.device_interval_s:
            self._fast.start()
        return self

    def sample(self) -> MemorySnapshot:
        snap = take_snapshot(self.probe, self._pid())
        with self._lock:
            self.timeline.add(snap)
        for observe in self.observers:
            observe(snap)
        return snap

    def sample_device(self) -> DevicePoint:
        dev = self.probe.device(tree_pids(self._pid()))
        point = DevicePoint(time.monotonic(), dev.used_mib, dev.free_mib, dev.server_mib)
        with self._lock:
            self.timeline.add_point(point)
        return point

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a probe hiccup must not kill the watchdog thread
                continue

    def _run_device(self) -> None:
        while not self._stop.wait(self.device_interval_s or DEVICE_INTERVAL_S):
            try:
                self.sample_device()
            except Exception:  # as above: a missed reading, not a dead sampler
                continue

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._fast):
            if thread.is_alive():
                thread.join(timeout=5)
