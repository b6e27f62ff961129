"""Preflight checks and the watchdog: the safeguards that keep a capacity run from hanging its host.

The thresholds mirror the reference study (refuse boot under 13 GiB MemAvailable, skip the workload
under 400 MiB free VRAM after boot, stop the server when MemAvailable < 8 GiB or free VRAM < 200 MiB
for 15 s); profiles set their own.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .matrix import HostProfile
from .probes import MemorySnapshot

def preflight_reason(profile: HostProfile, snap: MemorySnapshot, is_gpu: bool,
                     reserve: tuple[float, str] = (0.0, "")) -> str | None:
    """Why this config must not boot now, or None. Checked before boot; a reason means skip.

    ``reserve`` is the host RAM the server may claim after load (its backend's
    ``host_reserve``: MiB and what it is), counted on top of the floor.
    """
    floor = profile.preflight.min_available_gib * 1024
    reserve_mib, what = reserve
    need = floor + reserve_mib
    if snap.host_available_mib < need:
        extra = f" incl. {reserve_mib:.0f} MiB {what}" if reserve_mib else ""
        return (f"preflight: MemAvailable {snap.host_available_mib / 1024:.1f} GiB < required "
                f"{need / 1024:.1f} GiB (floor {profile.preflight.min_available_gib:g} GiB{extra})")
    if is_gpu and snap.device.free_mib < profile.preflight.min_free_gib * 1024:
        return (f"preflight: free VRAM {snap.device.free_mib:.0f} MiB < floor "
                f"{profile.preflight.min_free_gib * 1024:.0f} MiB")
    return None


def post_boot_reason(profile: HostProfile, snap: MemorySnapshot) -> str | None:
    """Why the workload must not run on this booted server, or None."""
    floor = profile.preflight.post_boot_min_free_gib * 1024
    if snap.device.free_mib < floor:
        return (f"post-boot floor: free device memory {snap.device.free_mib:.0f} MiB < "
                f"{floor:.0f} MiB; workload skipped")
    return None


class Watchdog:
    """Ends the server when memory stays under its limits for a sustained window.

    Fed by the memory sampler; ``tripped`` holds the user-facing reason once it fired.
    """

    def __init__(self, profile: HostProfile, is_gpu: bool, on_trip: Callable[[str], None]) -> None:
        self.limits = profile.watchdog
        self.is_gpu = is_gpu
        self.on_trip = on_trip
        self.tripped: str | None = None
        self._since: float | None = None
        self._lock = threading.Lock()

    def _breach(self, snap: MemorySnapshot) -> str | None:
        lim = self.limits
        if snap.host_available_mib < lim.min_available_gib * 1024:
            return f"MemAvailable {snap.host_available_mib / 1024:.2f} GiB < {lim.min_available_gib:g} GiB"
        if self.is_gpu and snap.device.free_mib < lim.min_free_gib * 1024:
            return f"free VRAM {snap.device.free_mib:.0f} MiB < {lim.min_free_gib * 1024:.0f} MiB"
        return None

    def observe(self, snap: MemorySnapshot) -> None:
        with self._lock:
            if self.tripped:
                return
            breach = self._breach(snap)
            if breach is None:
                self._since = None
                return
            now = time.monotonic()
            if self._since is None:
                self._since = now
            if now - self._since >= self.limits.window_s:
                self.tripped = f"watchdog: {breach} for {now - self._since:.1f} s; server stopped"
        if self.tripped:
            self.on_trip(self.tripped)
