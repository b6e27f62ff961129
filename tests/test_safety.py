"""Preflight and watchdog decisions on constructed memory readings (the real-server paths are in test_lifecycle)."""

from __future__ import annotations

import time

from pytest_gpucap.matrix import CapacityConfig, HostProfile, Preflight, WatchdogLimits
from pytest_gpucap.probes import DeviceMemory, MemorySnapshot
from pytest_gpucap.backends.llamacpp import LlamaCpp
from pytest_gpucap.safety import Watchdog, post_boot_reason, preflight_reason


def snap(available_mib: float, free_mib: float) -> MemorySnapshot:
    return MemorySnapshot(time.time(), 24000, available_mib, None, DeviceMemory(24000, 24000 - free_mib, free_mib))


def test_preflight_counts_the_prompt_cache_against_host_ram() -> None:
    prof = HostProfile(name="4090", device="cuda", preflight=Preflight(min_available_gib=13, min_free_gib=1))
    cfg = CapacityConfig(profile="4090", n=3, ctx=65536)
    reason = preflight_reason(prof, snap(14 * 1024, 20000), True, LlamaCpp().host_reserve(cfg))
    assert reason and "21.0 GiB" in reason and "--cache-ram" in reason
    small_cache = CapacityConfig(profile="4090", n=3, ctx=65536, cache_ram_mib=512)
    assert preflight_reason(prof, snap(14 * 1024, 20000), True, LlamaCpp().host_reserve(small_cache)) is None
    assert "free VRAM 500 MiB" in (preflight_reason(prof, snap(14 * 1024, 500), True, LlamaCpp().host_reserve(small_cache)) or "")


def test_post_boot_floor() -> None:
    prof = HostProfile(name="4090", preflight=Preflight(post_boot_min_free_gib=0.4))
    assert post_boot_reason(prof, snap(20000, 300)) and post_boot_reason(prof, snap(20000, 500)) is None


def test_watchdog_needs_a_sustained_breach() -> None:
    trips: list[str] = []
    prof = HostProfile(name="4090", watchdog=WatchdogLimits(min_available_gib=8, min_free_gib=0.2, window_s=0.2))
    dog = Watchdog(prof, is_gpu=True, on_trip=trips.append)
    dog.observe(snap(4000, 5000))
    dog.observe(snap(20000, 5000))  # recovered: the window restarts
    time.sleep(0.25)
    dog.observe(snap(20000, 5000))
    assert dog.tripped is None
    dog.observe(snap(20000, 100))
    time.sleep(0.25)
    dog.observe(snap(20000, 100))
    assert dog.tripped and dog.tripped.startswith("watchdog: free VRAM 100 MiB < 205 MiB")
    assert trips == [dog.tripped]
    dog.observe(snap(20000, 100))
    assert len(trips) == 1


def test_watchdog_ignores_device_floor_on_host_profiles() -> None:
    prof = HostProfile(name="cpu", watchdog=WatchdogLimits(min_free_gib=100, window_s=0))
    dog = Watchdog(prof, is_gpu=False, on_trip=lambda r: None)
    dog.observe(snap(20000, 1))
    assert dog.tripped is None
