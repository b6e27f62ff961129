"""What an image costs on a booted server, and the concurrent-images step.

Image tokens come from the server (a one-image request's ``usage.prompt_tokens`` minus the same request
without the image) and image memory from the sampler's ≤ 100 ms timeline around that request, so both
are measured, never assumed from the projector's shape. Text-only configs get no image (they would
refuse it): their roles are sent as text and the record says so.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import httpx

from .backends import ServerHandle
from .record_vision import VisionMetrics
from .workload import runner
from .workload.client import RequestRecord, StreamingClient
from .workload.images import image_seeds, with_images
from .workload.roles import Role

TEXT_ONLY_NOTE = "text-only config (no projector): image turns were sent as text"
#: The short reply of a concurrent-images request: the step is about encoding, not decoding.
CONCURRENT_REPLY_TOKENS = 8


def can_see(handle: ServerHandle) -> bool:
    """Whether the server was started with a projector (an mmproj config)."""
    return bool(handle.config.mmproj)


def for_server(roles: list[Role], handle: ServerHandle) -> list[Role]:
    """The roles as sent: images only where the server has a projector."""
    return roles if can_see(handle) else [replace(r, images_per_turn=0) for r in roles]


def chat_once(handle: ServerHandle, content: Any, max_tokens: int = 1) -> tuple[dict[str, Any], float, float]:
    """One non-streamed chat request: (usage, seconds to the answer, when it was sent). Raises
    httpx.HTTPError for a refused or failed request."""
    kw = handle.backend.client_options(handle)
    headers = {"Authorization": f"Bearer {kw['api_key']}"} if kw.get("api_key") else {}
    body = {"model": kw.get("model", "gpucap"), "max_tokens": max_tokens, "temperature": 0.0,
            "messages": [{"role": "user", "content": content}]}
    t0 = time.monotonic()
    resp = httpx.post(f"{handle.url}/v1/chat/completions", json=body, headers=headers, timeout=300.0)
    resp.raise_for_status()
    return resp.json().get("usage") or {}, time.monotonic() - t0, t0


def measure_image(handle: ServerHandle, size: tuple[int, int], seed: str = "probe") -> dict[str, Any]:
    """Image tokens per image and the memory one image's encoding takes (MiB), measured on the server.

    The figures are VisionMetrics' keys; on failure only ``image_tokens_from`` says what went wrong.
    """
    text = "Describe the image."
    try:
        base, base_s, _ = chat_once(handle, text)
        before = handle.sampler.sample_device() if handle.sampler else None
        usage, image_s, t0 = chat_once(handle, with_images(text, [f"measure:{seed}:{time.time_ns()}"], size))
        after = handle.sampler.sample_device() if handle.sampler else None
    except (httpx.HTTPError, ValueError) as exc:
        return {"image_tokens_from": f"not measured: {type(exc).__name__}: {str(exc)[:160]}"}
    out: dict[str, Any] = {"encode_s": round(max(0.0, image_s - base_s), 4)}
    if isinstance(usage.get("prompt_tokens"), int) and isinstance(base.get("prompt_tokens"), int):
        out["image_tokens_per_image"] = usage["prompt_tokens"] - base["prompt_tokens"]
        out["image_tokens_from"] = "server usage.prompt_tokens: with one image minus without"
    if before is not None and after is not None:
        window = handle.sampler.timeline.between(t0, after.t) + [after]
        out["image_mib"] = round(max(0.0, max(p.used_mib for p in window) - before.used_mib), 1)
        out["image_mib_from"] = (f"{handle.probe.kind} used memory during encoding minus before "
                                 f"({len(window)} readings, ≤ 100 ms apart)")
    return out


def section(handle: ServerHandle, roles: list[Role], records: list[RequestRecord]) -> VisionMetrics | None:
    """The ``vision`` section of a run whose roles carry images (None when none does)."""
    with_imgs = {r.name: r for r in roles if r.images_per_turn}
    if not with_imgs:
        return None
    turns = [r for r in records if r.role in with_imgs and with_imgs[r.role].images_on(r.turn)]
    first = next(iter(with_imgs.values()))
    base = {"images_per_turn": first.images_per_turn, "image_every": first.image_every,
            "image_size": list(first.image_size), "image_turns": len(turns),
            "images": sum(with_imgs[r.role].images_on(r.turn) for r in turns)}
    if not can_see(handle):
        return VisionMetrics.from_dict({"sent": False, "note": TEXT_ONLY_NOTE, **base})
    return VisionMetrics.from_dict({"sent": True, **base, **measure_image(handle, first.image_size)})


async def _at_once(url: str, n: int, size: tuple[int, int], seed: int, settings: Any, see: bool,
                   api_key: str | None = None, model: str = "gpucap") -> runner.RunResult:
    t0 = time.monotonic()
    records = [RequestRecord(agent=i, role="image", turn=0, scheduled=t0) for i in range(n)]
    async with StreamingClient(url, n, settings.request_timeout_s, 0.0, api_key, model,
                               runner.stall_s(settings)) as client:
        text = "Describe the screenshot in one line."
        await asyncio.gather(*(client.chat(
            records[i], [{"role": "user", "content": with_images(
                text, image_seeds(seed, i, 0, 1) if see else [], size)}],
            CONCURRENT_REPLY_TOKENS, thinking=False) for i in range(n)))
    return runner.RunResult(records, t0, t0, time.monotonic())


def concurrent_step(handle: ServerHandle, settings: Any, size: tuple[int, int]) -> tuple[runner.RunResult, VisionMetrics]:
    """One image on every slot at the same moment (N requests, short replies): the run and its section
    (minimum free memory over the step, the dip from just before, how many requests failed)."""
    before = handle.sampler.sample_device() if handle.sampler else None
    res = runner.run(_at_once(handle.url, handle.config.n, size, settings.seed, settings, can_see(handle),
                              **handle.backend.client_options(handle)))
    window = []
    if handle.sampler:
        window = [p.free_mib for p in handle.sampler.timeline.between(res.started, res.ended)]
        window.append(handle.sampler.sample_device().free_mib)
    low = min(window) if window else None
    data: dict[str, Any] = {"sent": can_see(handle), "concurrent": handle.config.n, "image_size": list(size),
                            "images": handle.config.n if can_see(handle) else 0,
                            "failed": sum(1 for r in res.records if not r.ok),
                            "free_before_mib": None if before is None else round(before.free_mib, 1),
                            "min_free_mib": None if low is None else round(low, 1)}
    if before is not None and low is not None:
        data["dip_mib"] = round(before.free_mib - low, 1)
    if can_see(handle):
        data |= measure_image(handle, size)
    else:
        data["note"] = TEXT_ONLY_NOTE
    return res, VisionMetrics.from_dict(data)
