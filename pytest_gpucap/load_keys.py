"""Matrix keys for load that the study feared: vision keys of ``[roles.NAME]`` and the
``[profiles.NAME.burst]`` table. Layer 0 beside ``matrix`` (which calls these), so matrix.py stays small."""

from __future__ import annotations

from typing import Any, Mapping

from .budgets import Burst

#: The built-in workflows (the study's agent mixes at N=3), which a config's ``workflows`` may name beside the
#: matrix's own ``[workflows]``; ``workload.roles`` scales them to a config's N.
BUILTIN_WORKFLOWS: dict[str, tuple[str, ...]] = {
    "A": ("TL", "Dev", "QA"),
    "B": ("Research", "Research", "Research"),
    "ToolStorm": ("ToolStorm", "ToolStorm", "ToolStorm"),
}
#: Keys a ``[roles.NAME]`` table may carry beside the text ones.
ROLE_IMAGE_KEYS = ("images_per_turn", "image_every", "image_size")
#: The study's screenshot size (width, height).
DEFAULT_IMAGE_SIZE = (1000, 562)
#: Larger images only make the client slow; no vision encoder takes them unscaled.
MAX_IMAGE_SIDE = 8192


def check_role_images(role: Mapping[str, Any], where: str) -> str | None:
    """The first problem with a role's image keys, as one line (None: fine)."""
    n = role.get("images_per_turn", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        return f"{where}: images_per_turn must be an integer >= 0, got {n!r}"
    every = role.get("image_every", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        return f"{where}: image_every must be a positive integer (every k-th turn), got {every!r}"
    size = role.get("image_size", DEFAULT_IMAGE_SIZE)
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_IMAGE_SIDE for s in size)):
        return (f"{where}: image_size must be [width, height] in pixels (1..{MAX_IMAGE_SIDE}), got {size!r} "
                "(write e.g. image_size = [1000, 562])")
    return None


def burst_from_mapping(data: Any, where: str) -> Burst:
    """Validate ``[profiles.NAME.burst]``; ValueError with one line."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: must be a table (enabled, fill, reply_tokens, image)")
    known = ("enabled", "fill", "reply_tokens", "image")
    for key in data:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r} (valid keys: {', '.join(known)})")
    for key in ("enabled", "image"):
        if key in data and not isinstance(data[key], bool):
            raise ValueError(f"{where}: {key} must be true or false, got {data[key]!r}")
    fill = data.get("fill", Burst.fill)
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not 0 < fill < 1:
        raise ValueError(f"{where}: fill must be a share of the slot's context in (0, 1), got {fill!r} "
                         "(write e.g. fill = 0.9)")
    reply = data.get("reply_tokens", Burst.reply_tokens)
    if isinstance(reply, bool) or not isinstance(reply, int) or reply < 1:
        raise ValueError(f"{where}: reply_tokens must be a positive integer, got {reply!r}")
    return Burst(enabled=data.get("enabled", True), fill=float(fill), reply_tokens=reply,
                 image=data.get("image", True))
