"""Which cards a config's server runs on, and what the server and the probe are told about them.

A config names cards as the caller sees them (``gpus = [1]`` is the second card of the caller's
``CUDA_VISIBLE_DEVICES``, or of the machine when it is unset). The server gets
``CUDA_VISIBLE_DEVICES`` for exactly those cards, translated through the caller's own list (indices
or UUIDs), so inside the server they are numbered from 0; llama.cpp is told to stay on one card or
split over several. Everything here is pure: the caller passes the environment in.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from . import nvml
from .matrix import CapacityConfig, HostProfile

VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


class PinError(ValueError):
    """A config names a card the caller cannot see; the message says which and why."""


def config_gpus(cfg: CapacityConfig, profile: HostProfile, worker_gpu: int | None = None) -> tuple[int, ...]:
    """The cards a config is pinned to: its own ``gpus``, else the xdist worker's card
    (``--gpucap-gpus``), else the profile's ``gpu_index`` on a cuda profile; none on an unpinned host profile."""
    if cfg.gpus:
        return cfg.gpus
    if worker_gpu is not None:
        return (worker_gpu,)
    return (profile.gpu_index,) if profile.device == "cuda" else ()


def visible_entries(caller: str | None) -> list[str] | None:
    """The caller's ``CUDA_VISIBLE_DEVICES`` as a list (None: unset, every card is visible)."""
    if caller is None:
        return None
    return [e.strip() for e in caller.split(",") if e.strip()]


def map_gpus(gpus: Sequence[int], caller: str | None) -> tuple[str, ...]:
    """The device ids to give the server for ``gpus``: the caller's entries at those positions
    (``gpus = [1]`` under ``CUDA_VISIBLE_DEVICES=3,5`` is ``5``), or the indices themselves."""
    entries = visible_entries(caller)
    if entries is None:
        return tuple(str(g) for g in gpus)
    beyond = [g for g in gpus if g >= len(entries)]
    if beyond:
        raise PinError(f"gpus = {list(gpus)}: card(s) {beyond} not visible ({VISIBLE_ENV}={caller!r} lists "
                       f"{len(entries)} card(s), numbered from 0)")
    return tuple(entries[g] for g in gpus)


def device_keys(mapped: Sequence[str], profile: HostProfile) -> tuple[str, ...]:
    """The devices a server occupies (one lock each): ``gpu<id>`` per pinned card, else the profile's device."""
    return tuple(f"gpu{m}" for m in mapped) if mapped else (profile.device_key,)


def probe_cards(mapped: Sequence[str]) -> tuple[int | str, ...]:
    """The cards the NVML probe reads for a pinned server: NVML numbers cards as the machine does
    (it ignores ``CUDA_VISIBLE_DEVICES``), so the mapped ids, as indices where they are numbers, else UUIDs."""
    return tuple(int(m) if m.isdigit() else m for m in mapped)


def llama_args(n_cards: int, cuda: bool) -> list[str]:
    """llama.cpp flags matching the pin: one card → no split, stay on it; several → an even layer split."""
    if not cuda or n_cards == 0:
        return []
    if n_cards == 1:
        return ["--split-mode", "none", "--main-gpu", "0"]
    return ["--split-mode", "layer", "--tensor-split", ",".join(["1"] * n_cards)]


def parse_gpu_list(raw: str) -> tuple[int, ...] | None:
    """``--gpucap-gpus`` value: ``auto`` (None: ask the machine) or ``0,1,…``; raises ValueError."""
    if raw.strip().lower() == "auto":
        return None
    items = [p.strip() for p in raw.split(",") if p.strip()]
    if not items or not all(p.isdigit() for p in items) or len(set(items)) != len(items):
        raise ValueError(f"--gpucap-gpus must be auto or distinct card indices such as 0,1; got {raw!r}")
    return tuple(int(p) for p in items)


def detect_gpus(environ: Mapping[str, str] | None = None) -> tuple[int, ...]:
    """``--gpucap-gpus auto``: every card the caller can see (its ``CUDA_VISIBLE_DEVICES`` list, else
    NVML's device count); raises ValueError when there is none."""
    env = os.environ if environ is None else environ
    entries = visible_entries(env.get(VISIBLE_ENV))
    if entries is not None:
        count = len(entries)
    else:
        count = nvml.card_count()
    if count == 0:
        raise ValueError("--gpucap-gpus auto: no NVIDIA GPU found (NVML sees none and CUDA_VISIBLE_DEVICES "
                         "is unset or empty); list the cards instead, e.g. --gpucap-gpus 0,1")
    return tuple(range(count))


def worker_gpu(gpus: Sequence[int], worker_id: str | None) -> int | None:
    """The card of xdist worker ``gwN`` (the N-th listed card, wrapping round); the first card outside xdist."""
    if not gpus:
        return None
    if worker_id and worker_id.startswith("gw") and worker_id[2:].isdigit():
        return gpus[int(worker_id[2:]) % len(gpus)]
    return gpus[0]
