"""Inference server backends: the shared process core, the handle, and one module per server.

``REGISTRY`` maps ``backend = "…"`` in the matrix to its class; adding a server is one module
plus one line here.
"""

from __future__ import annotations

from .base import Backend, CommandLookup, MemoryReport, MetricNames
from .external import External
from .handle import LaunchSpec, PreflightSkip, ServerHandle
from .llamacpp import LlamaCpp
from .process import Readiness, ServerError
from .vllm import Vllm

REGISTRY: dict[str, type[Backend]] = {cls.name: cls for cls in (LlamaCpp, Vllm, External)}


def backend_for(name: str) -> Backend:
    """The backend for a matrix ``backend`` value (validated when the matrix is loaded)."""
    try:
        return REGISTRY[name]()
    except KeyError:
        raise ServerError(f"unknown backend {name!r} (known: {', '.join(REGISTRY)})") from None


__all__ = ["REGISTRY", "Backend", "CommandLookup", "LaunchSpec", "MemoryReport", "MetricNames", "PreflightSkip",
           "Readiness", "ServerError", "ServerHandle", "backend_for"]
