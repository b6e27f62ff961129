"""``burst``: the burst ceiling in a ceiling record: every slot at once near full, with an image and a
long reply. Why: the study's headroom is "free after one image + 5K-token response", not free at idle."""

from __future__ import annotations

from dataclasses import dataclass

from .record_sections import Section, opt


@dataclass(frozen=True, kw_only=True)
class BurstInfo(Section):
    """What the burst sent and what it left free (MiB); the headroom verdict reads ``min_free_mib``."""

    slots: int | None = None
    fill: float | None = None  # the share of each slot's context asked for
    target_prompt_tokens: int | None = None
    prompt_tokens: list[int] | None = None  # per slot, as the server counted (usage.prompt_tokens)
    fill_reached: float | None = None  # the smallest prompt_tokens / slot context
    reply_tokens: int | None = None  # asked per slot (profile-scaled)
    completion_tokens: list[int] | None = None
    image: bool | None = None
    failed: int | None = None
    errors: list[str] | None = opt()
    seconds: float | None = None
    free_before_mib: float | None = None
    min_free_mib: float | None = None
    samples: int | None = None
    tokens_from: str | None = None
    aborted: str | None = opt()
