"""Deterministic synthetic prompts: tool-result blobs sized in tokens, seeded per agent and turn.

Tool results never depend on what the model answered, so a seed reproduces them exactly; an agent's
history holds the server's own replies (``runner.Conversation.commit``), so later turns repeat only
as far as the server's sampling does.
"""

from __future__ import annotations

import random

from typing import Any, Callable

import httpx

_WORDS = (
    "def", "return", "self", "import", "class", "for", "in", "if", "else", "None", "True", "False",
    "value", "result", "config", "request", "response", "buffer", "index", "count", "error", "path",
    "print", "yield", "async", "await", "with", "open", "data", "items", "key", "len", "range", "dict",
    "list", "str", "int", "float", "raise", "except", "try", "lambda", "assert", "cache", "slot", "token",
)
_PUNCT = ("(", ")", ":", ",", ".", "=", "[", "]", "{", "}", "\n", "    ", " ", " ", " ", " ")

DEFAULT_CHARS_PER_TOKEN = 3.5


def filler(rng: random.Random, n_chars: int) -> str:
    """Code-like text of about ``n_chars`` characters."""
    parts: list[str] = []
    size = 0
    while size < n_chars:
        piece = rng.choice(_WORDS) + rng.choice(_PUNCT)
        parts.append(piece)
        size += len(piece)
    return "".join(parts)[:n_chars]


def tool_blob(seed: int, agent: int, turn: int, n_tokens: int, chars_per_token: float) -> str:
    """The synthetic ``[TOOL RESULT]`` block an agent reads before a turn: about ``n_tokens`` in all,
    its header included (the header alone is ~20 tokens, a tenth of a 200-token blob)."""
    rng = random.Random(f"{seed}:{agent}:{turn}")
    head = f"[TOOL RESULT {agent}.{turn}]\n"
    return head + filler(rng, max(0, int(n_tokens * chars_per_token) - len(head)))


def reply_stub(seed: int, agent: int, turn: int, n_tokens: int, chars_per_token: float) -> str:
    """A reply-sized text independent of sampling (for compaction-policy checks); agent runs commit
    the server's real reply instead."""
    rng = random.Random(f"reply:{seed}:{agent}:{turn}")
    return filler(rng, int(n_tokens * chars_per_token))


def calibrate(base_url: str, timeout_s: float = 10.0, request: Callable[[str], tuple[str, dict[str, Any]] | None]
              | None = None, api_key: str | None = None) -> tuple[float, str]:
    """Characters per token of this server's tokenizer, via its tokenize endpoint.

    ``request(text) -> (path, body)`` is the backend's tokenize call (default: llama.cpp's
    ``/tokenize`` with ``{"content": ...}``). Returns the ratio and where it came from; falls back
    to a typical value when the server has no tokenizer endpoint.
    """
    sample = filler(random.Random(0), 4000)
    call = request(sample) if request is not None else ("/tokenize", {"content": sample})
    if call is None:
        return DEFAULT_CHARS_PER_TOKEN, "default (no tokenize endpoint)"
    path, body = call
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=timeout_s)
        resp.raise_for_status()
        data = resp.json()
        count = data.get("count") or len(data.get("tokens", []))
        if count:
            return len(sample) / count, path
    except (httpx.HTTPError, ValueError):
        pass
    return DEFAULT_CHARS_PER_TOKEN, "default (no /tokenize)"
