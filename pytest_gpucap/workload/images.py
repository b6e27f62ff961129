"""Deterministic PNG images for vision turns, sent the OpenAI way (``image_url`` data URIs).

An image is seeded noise on a few coloured blocks: the same seed and size always give the same bytes,
so a seed reproduces the request stream (and the server's prompt cache sees the same image again), and
noise keeps PNG from compressing a 1000x562 screenshot-sized image to nothing.
"""

from __future__ import annotations

import base64
import io
import random
from functools import lru_cache
from typing import Any

from ..load_keys import DEFAULT_IMAGE_SIZE


@lru_cache(maxsize=64)
def png_bytes(seed: int | str, size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> bytes:
    """The PNG of ``seed`` at ``size`` (width, height); cached, since agents resend the same sizes."""
    import numpy as np
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(random.Random(f"image:{seed}").getrandbits(64))
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    step = max(1, min(width, height) // 4)
    for y in range(0, height, step):
        for x in range(0, width, step):
            pixels[y:y + step, x:x + step] = rng.integers(0, 256, 3, dtype=np.uint8)
    noise = rng.integers(-24, 25, (height, width, 3))
    pixels = np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def image_part(seed: int | str, size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> dict[str, Any]:
    """One OpenAI ``image_url`` content part holding the PNG as a data URI."""
    url = "data:image/png;base64," + base64.b64encode(png_bytes(seed, tuple(size))).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def with_images(text: str, seeds: list[int | str], size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> Any:
    """A user message's content: the text alone without seeds, else a text part beside the image parts."""
    if not seeds:
        return text
    return [{"type": "text", "text": text}, *(image_part(s, size) for s in seeds)]


def image_seeds(seed: int, agent: int, turn: int, count: int) -> list[str]:
    """The seeds of one turn's images (distinct per agent, turn and position)."""
    return [f"{seed}:{agent}:{turn}:{k}" for k in range(count)]
