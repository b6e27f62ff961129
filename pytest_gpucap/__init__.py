"""pytest-gpucap: GPU capacity planning for self-hosted LLM inference as a gating pytest suite.

The public API, for capacity suites and conftest hooks::

    from pytest_gpucap import CapacityConfig, Ceiling, Harness, ReportSection, SearchRun, ServerHandle

Names resolve on first use: ``python -m pytest_gpucap.hfmodel`` runs inside vLLM's own
environment, which has neither pytest nor the plugin's other dependencies.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "CapacityConfig": "matrix",
    "Ceiling": "ceiling",
    "Harness": "harness",
    "ReportSection": "hookspec",
    "SearchRun": "search_run",
    "ServerHandle": "backends",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:
    from .backends import ServerHandle  # noqa: F401
    from .ceiling import Ceiling  # noqa: F401
    from .harness import Harness  # noqa: F401
    from .hookspec import ReportSection  # noqa: F401
    from .matrix import CapacityConfig  # noqa: F401
    from .search_run import SearchRun  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pytest_gpucap' has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value
