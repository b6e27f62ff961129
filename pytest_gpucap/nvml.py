"""NVML, kept thin: one small function per NVML call, and the logic above them that tests run on
recorded readings (no GPU needed).

The adapter functions (``init`` … ``graphics_processes``) only call ``pynvml`` and convert its
types; everything else here (selection by index / UUID / MIG, per-process attribution, skip
reasons) works on what they return, so a test fakes those functions with values recorded from
real ``nvidia-smi`` output and exercises the rest as it runs on a GPU host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

MIB = 1024 * 1024

#: One running process as NVML lists it: (pid, used bytes or None where NVML cannot tell).
Process = tuple[int, "int | None"]


class NvmlError(RuntimeError):
    """NVML is missing, broken, or cannot see the requested GPU; the message is a skip reason."""


# ---------------------------------------------------------------- the thin adapter

def _nv() -> Any:
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise NvmlError(f"nvidia-ml-py is not installed: {exc}") from None
    return pynvml


def init() -> None:
    _nv().nvmlInit()


def shutdown() -> None:
    _nv().nvmlShutdown()


def device_count() -> int:
    return int(_nv().nvmlDeviceGetCount())


def card_count() -> int:
    """How many cards NVML sees: 0 without the library or a driver (``--gpucap-gpus auto``)."""
    try:
        init()
    except Exception:  # NvmlError (no nvidia-ml-py) or pynvml.NVMLError: no library, no driver
        return 0
    try:
        return device_count()
    finally:
        shutdown()


def handle_by_index(index: int) -> Any:
    return _nv().nvmlDeviceGetHandleByIndex(index)


def handle_by_uuid(uuid: str) -> Any:
    return _nv().nvmlDeviceGetHandleByUUID(uuid)


def mig_handle(parent: Any, index: int) -> Any:
    return _nv().nvmlDeviceGetMigDeviceHandleByIndex(parent, index)


def memory_info(handle: Any) -> tuple[int, int, int]:
    """(total, used, free) in bytes."""
    info = _nv().nvmlDeviceGetMemoryInfo(handle)
    return int(info.total), int(info.used), int(info.free)


def name(handle: Any) -> str:
    return _text(_nv().nvmlDeviceGetName(handle))


def uuid(handle: Any) -> str:
    return _text(_nv().nvmlDeviceGetUUID(handle))


def driver_version() -> str:
    return _text(_nv().nvmlSystemGetDriverVersion())


def cuda_driver_version() -> int:
    """CUDA version the driver supports, as NVML encodes it (12020 = 12.2)."""
    return int(_nv().nvmlSystemGetCudaDriverVersion())


def compute_processes(handle: Any) -> list[Process]:
    return [(int(p.pid), _bytes(p.usedGpuMemory)) for p in _nv().nvmlDeviceGetComputeRunningProcesses(handle)]


def graphics_processes(handle: Any) -> list[Process]:
    return [(int(p.pid), _bytes(p.usedGpuMemory)) for p in _nv().nvmlDeviceGetGraphicsRunningProcesses(handle)]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> int | None:
    """NVML reports an unknown per-process figure as None (or NVML_VALUE_NOT_AVAILABLE, 2**64-1)."""
    return None if value is None or value >= 2**63 else int(value)


# ---------------------------------------------------------------- errors → skip reasons

_REASONS = {
    "NVMLError_LibraryNotFound": "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver is installed here",
    "NVMLError_LibRmVersionMismatch": (
        "NVIDIA driver/library version mismatch: the loaded kernel module and libnvidia-ml differ "
        "(a driver upgrade without a reboot); reboot or reload the nvidia module"),
    "NVMLError_DriverNotLoaded": "NVIDIA driver not loaded (is the nvidia kernel module present?)",
    "NVMLError_NoPermission": "no permission to query the GPU through NVML",
    "NVMLError_GpuIsLost": "the GPU has fallen off the bus (NVML: GPU is lost)",
}


def reason(exc: BaseException, what: str = "") -> str:
    """A one-line skip reason for an NVML failure; ``what`` names the device asked for."""
    known = _REASONS.get(type(exc).__name__)
    if known:
        return known
    if type(exc).__name__ == "NVMLError_NotFound" and what:
        return f"GPU {what} not found (NVML: {exc})"
    return f"no NVIDIA GPU usable ({what + ': ' if what else ''}NVML: {exc})"


def _nvml_error_types() -> tuple[type[BaseException], ...]:
    try:
        return (_nv().NVMLError,)
    except NvmlError:
        return ()


# ---------------------------------------------------------------- selection

@dataclass(frozen=True)
class Gpu:
    """One selected device (a whole GPU or a MIG instance)."""

    spec: str  # as asked: "0", "GPU-…", "MIG-…", "1:0" (GPU 1, MIG device 0)
    name: str
    uuid: str
    mig: bool
    handle: Any = None

    def describe(self) -> dict[str, str]:
        return {"spec": self.spec, "name": self.name, "uuid": self.uuid, "mig": str(self.mig).lower()}


_MIG_INDEX_RE = re.compile(r"^([0-9]+):([0-9]+)$")


def select(devices: Sequence[int | str]) -> list[Gpu]:
    """Handles for NVML indices (``0``), UUIDs (``GPU-…``, ``MIG-…``) or ``GPU:MIG`` index pairs.
    Raises ``NvmlError`` with a skip reason; call ``init()`` first."""
    errors = _nvml_error_types()
    out: list[Gpu] = []
    for dev in devices:
        spec = str(dev).strip()
        try:
            mig = _MIG_INDEX_RE.match(spec)
            if spec.isdigit():
                handle = handle_by_index(int(spec))
            elif mig:
                handle = mig_handle(handle_by_index(int(mig[1])), int(mig[2]))
            elif spec.startswith(("GPU-", "MIG-")):
                handle = handle_by_uuid(spec)
            else:
                raise NvmlError(f"GPU {spec!r} is neither an NVML index, a GPU-/MIG- UUID nor GPU:MIG")
            ident = uuid(handle)
            out.append(Gpu(spec, name(handle), ident, ident.startswith("MIG-") or bool(mig), handle))
        except errors as exc:
            raise NvmlError(reason(exc, spec)) from None
    return out


# ---------------------------------------------------------------- attribution

@dataclass(frozen=True)
class Reading:
    """Device memory split three ways (MiB): the server's processes, everything else, and free.

    ``baseline_mib`` = used − server: co-tenants, the desktop, and what no process is charged for
    (driver, contexts). ``server_mib`` is None when NVML lists no figure for the server's PIDs (a
    container's PID namespace, or a driver that hides per-process use); then only used/free hold.
    """

    total_mib: float
    used_mib: float
    free_mib: float
    server_mib: float | None
    others_mib: float  # what NVML charges to processes outside the server's tree
    attribution: str  # "processes" or why not

    @property
    def baseline_mib(self) -> float | None:
        return None if self.server_mib is None else self.used_mib - self.server_mib


def merge_processes(*lists: Iterable[Process]) -> dict[int, int | None]:
    """One figure per PID over the compute and graphics lists (a "C+G" process is in both)."""
    out: dict[int, int | None] = {}
    for procs in lists:
        for pid, used in procs:
            seen = out.get(pid)
            out[pid] = used if seen is None else max(seen, used or 0)
    return out


def attribute(total: int, used: int, free: int, procs: dict[int, int | None], server_pids: Iterable[int]) -> Reading:
    """Split one device's memory between the server's process tree and the rest."""
    pids = set(server_pids)
    mine = [procs[p] for p in pids if p in procs]
    others = sum(v or 0 for p, v in procs.items() if p not in pids) / MIB
    if not pids:
        server, why = None, "no server running"
    elif not mine:
        server, why = None, "the server's PIDs are not in NVML's process list (container PID namespace?)"
    elif any(v is None for v in mine):
        server, why = None, "NVML does not report per-process memory here"
    else:
        server, why = sum(v or 0 for v in mine) / MIB, "processes"
        if server > used / MIB + 1:  # NVML's lists and its memory counters are not one atomic reading
            why = "per-process use exceeds the device's used memory (readings from different moments)"
    return Reading(total / MIB, used / MIB, free / MIB, server, others, why)


def read(gpu: Gpu, server_pids: Iterable[int]) -> Reading:
    """One device: memory info plus the compute and graphics process lists."""
    total, used, free = memory_info(gpu.handle)
    errors = _nvml_error_types()
    try:
        procs = merge_processes(compute_processes(gpu.handle), graphics_processes(gpu.handle))
    except errors as exc:
        return Reading(total / MIB, used / MIB, free / MIB, None, 0.0, f"process list unavailable ({exc})")
    return attribute(total, used, free, procs, server_pids)


def combine(readings: Sequence[Reading]) -> Reading:
    """Several devices (tensor parallel) as one: sums; the server figure only when every device has one."""
    servers = [r.server_mib for r in readings]
    known = all(s is not None for s in servers)
    why = "processes" if known else next(r.attribution for r in readings if r.server_mib is None)
    return Reading(sum(r.total_mib for r in readings), sum(r.used_mib for r in readings),
                   sum(r.free_mib for r in readings), sum(s or 0.0 for s in servers) if known else None,
                   sum(r.others_mib for r in readings), why)


def cuda_version_text(encoded: int) -> str:
    """12020 → "12.2" (NVML's encoding: 1000 × major + 10 × minor)."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"
