"""Record sections of agents run as agents: the per-turn prompt-cache table of a workflow.

An agent's history holds the server's own replies, so each turn's prompt should share the prefix the
server cached on the turn before; the per-turn hit rate (``metrics.cache_turns``) shows whether it
did, and where compaction (dropping the oldest tool results) broke the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from .record_base import Section


@dataclass(frozen=True, kw_only=True)
class CacheTurn(Section):
    """One turn index across all agents (``workload.metrics.cache_turns``): turns whose usage came,
    their prompt and cached tokens, the hit rate, and compactions done before those turns."""

    turn: int | None = None
    n: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    hit_rate: float | None = None
    compactions: int | None = None
