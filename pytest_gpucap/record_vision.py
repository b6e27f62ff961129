"""``vision``: what images cost on a server, in a workload record (vision turns, the concurrent-images step).

Why a section of its own: image tokens and image memory are per-image figures the study's headroom
table is about ("free after one image"), and text-only configs must say their images were not sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from .record_sections import Section, opt


@dataclass(frozen=True, kw_only=True)
class VisionMetrics(Section):
    """Images of one run: how many went out, what one costs in prompt tokens and in memory.

    ``image_tokens_per_image``: prompt tokens of a one-image request minus the same request without the
    image (``usage.prompt_tokens``, measured once per run on the server). ``image_mib``: device (host
    profile: server RSS) used memory during that request's encoding minus just before, from the sampler's
    ≤ 100 ms timeline. ``sent`` is False on a text-only config (no projector): the turns went as text.
    """

    sent: bool | None = None
    note: str | None = opt()
    images_per_turn: int | None = opt()
    image_every: int | None = opt()
    image_size: list[int] | None = opt()
    image_turns: int | None = opt()  # turns that carried images (sent, or would have been on text-only)
    images: int | None = opt()  # images in those turns
    image_tokens_per_image: int | None = opt()
    image_tokens_from: str | None = opt()
    image_mib: float | None = opt()
    image_mib_from: str | None = opt()
    encode_s: float | None = opt()  # the one-image request's TTFT minus the text-only one's
    # the concurrent-images step: one image on every slot at the same moment
    concurrent: int | None = opt()
    failed: int | None = opt()
    free_before_mib: float | None = opt()
    min_free_mib: float | None = opt()
    dip_mib: float | None = opt()
