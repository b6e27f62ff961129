"""A profile's capacity search as the matrix declares it (``[profiles.NAME.search]``) or a marker does.

The shipped search test is parametrized over the profiles whose matrix declares a search, so a user's
matrix decides what is searched (and a matrix without a ``cpu`` profile still collects). The same
validation reads the ``@pytest.mark.gpucap_search(...)`` marker, so both spell the space one way.
The search itself (``search.SearchSpace``, the probing) sits above; this module only validates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .matrix import CACHE_TYPES, CapacityConfig, MatrixError, config_from_mapping, merge_defaults

PRUNES = ("fit", "slo", "none")
STRATEGIES = ("split", "columns")
SEARCH_KEYS = {"ns", "ctxs", "cache_types", "mmproj", "base", "prune", "strategy", "max_boots", "probe"}
PROBE_KEYS = {"workflow", "duration_s"}


@dataclass(frozen=True)
class ProbeWorkload:
    """The short load every search probe runs after its hold, so the probe is judged on the test's
    latency, throughput and goodput SLOs and not on idle headroom alone. ``workflow = ""`` judges
    headroom only (the search of earlier versions)."""

    workflow: str = "A"
    duration_s: float = 4.0


@dataclass(frozen=True)
class SearchDecl:
    """One declared search: the grid, the config every probe starts from, and how to probe."""

    profile: str
    ns: tuple[int, ...]
    ctxs: tuple[int, ...]
    cache_types: tuple[str, ...] = ("f16",)
    mmproj: tuple[bool, ...] = (False,)
    base: CapacityConfig | None = None  # profile defaults + ``base`` keys, at the smallest N and ctx
    prune: str = "fit"
    strategy: str = "split"
    max_boots: int | None = None  # None: a third of the grid (at least one boot)
    probe: ProbeWorkload = ProbeWorkload()

    @property
    def grid_size(self) -> int:
        return len(set(self.ns)) * len(set(self.ctxs)) * len(self.cache_types) * len(self.mmproj)

    @property
    def boot_budget(self) -> int:
        """The most boots this search may spend: ``max_boots``, else a third of the grid."""
        return self.max_boots if self.max_boots is not None else max(1, self.grid_size // 3)


def _fail(where: str, message: str) -> MatrixError:
    return MatrixError(f"{where}: {message}")


def _ints(value: Any, key: str, where: str) -> tuple[int, ...]:
    if (isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise _fail(where, f"{key} must be a non-empty list of positive integers, got {value!r} "
                           f"(write e.g. {key} = [1, 2, 4])")
    return tuple(value)


def _probe(value: Any, where: str) -> ProbeWorkload:
    if not isinstance(value, Mapping):
        raise _fail(where, f"probe must be a table, got {value!r} (write e.g. probe = {{ workflow = \"A\", "
                           "duration_s = 4 }})")
    unknown = sorted(set(value) - PROBE_KEYS)
    if unknown:
        raise _fail(where, f"unknown probe key {unknown[0]!r} (valid keys: {', '.join(sorted(PROBE_KEYS))})")
    workflow = value.get("workflow", ProbeWorkload.workflow)
    if not isinstance(workflow, str):
        raise _fail(where, f"probe.workflow must be a workflow name (or \"\" for headroom only), got {workflow!r}")
    duration = value.get("duration_s", ProbeWorkload.duration_s)
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration <= 0:
        raise _fail(where, f"probe.duration_s must be a number of seconds > 0, got {duration!r}")
    return ProbeWorkload(workflow, float(duration))


def search_from_mapping(profile: str, data: Mapping[str, Any], defaults: Mapping[str, Any], where: str,
                        workflows: Mapping[str, Any] | None = None) -> SearchDecl:
    """Validate one search table (matrix ``[profiles.NAME.search]`` or the marker's kwargs).

    ``defaults`` are the profile's config defaults; ``workflows`` the matrix's (with the built-in
    A/B/ToolStorm, checked by name when given)."""
    if not isinstance(data, Mapping):
        raise _fail(where, "must be a table: [profiles.NAME.search] with ns = [...] and ctxs = [...]")
    unknown = sorted(set(data) - SEARCH_KEYS)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r} (valid keys: {', '.join(sorted(SEARCH_KEYS))})")
    if "ns" not in data or "ctxs" not in data:
        raise _fail(where, "a search needs ns (slots) and ctxs (context per slot), e.g. ns = [1, 2, 4], "
                           "ctxs = [8192, 16384]")
    ns, ctxs = _ints(data["ns"], "ns", where), _ints(data["ctxs"], "ctxs", where)
    caches = data.get("cache_types", ("f16",))
    if isinstance(caches, str) or not isinstance(caches, (list, tuple)) or not caches \
            or any(c not in CACHE_TYPES for c in caches):
        raise _fail(where, f"cache_types must be a non-empty list of {', '.join(CACHE_TYPES)}, got {caches!r}")
    mmproj = data.get("mmproj", (False,))
    if isinstance(mmproj, bool):
        mmproj = (mmproj,)
    if not isinstance(mmproj, (list, tuple)) or not mmproj or not all(isinstance(m, bool) for m in mmproj):
        raise _fail(where, f"mmproj must be a list of true/false, got {mmproj!r} (write e.g. mmproj = [false, true])")
    kw: dict[str, Any] = {}
    for key, choices in (("prune", PRUNES), ("strategy", STRATEGIES)):
        if key in data:
            if data[key] not in choices:
                raise _fail(where, f"{key} must be one of {', '.join(choices)}, got {data[key]!r}")
            kw[key] = data[key]
    if "max_boots" in data:
        value = data["max_boots"]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _fail(where, f"max_boots must be a positive integer, got {value!r}")
        kw["max_boots"] = value
    if "probe" in data:
        kw["probe"] = _probe(data["probe"], where)
        if workflows is not None and kw["probe"].workflow and kw["probe"].workflow not in workflows:
            raise _fail(where, f"probe.workflow {kw['probe'].workflow!r} is no workflow (known: "
                               f"{', '.join(sorted(workflows))})")
    base_keys = data.get("base", {})
    if not isinstance(base_keys, Mapping):
        raise _fail(where, "base must be a table of config keys, e.g. base = { threads = 2 }")
    searched = sorted({"n", "ctx", "cache_type", "cache_type_k", "cache_type_v", "mmproj", "name"} & set(base_keys))
    if searched:
        raise _fail(where, f"base sets {', '.join(searched)}, which the search varies or names: drop it")
    base = config_from_mapping(profile, merge_defaults(defaults, {**base_keys, "n": min(ns), "ctx": min(ctxs)}),
                               f"{where}.base")
    return SearchDecl(profile, ns, ctxs, tuple(caches), tuple(mmproj), base, **kw)


def searches_from(raw_profiles: Mapping[str, Any], defaults: Mapping[str, Mapping[str, Any]],
                  label: str) -> dict[str, SearchDecl]:
    """Every ``[profiles.NAME.search]`` of a matrix document, by profile (``matrix.parse_matrix``; the
    probe's workflow name is checked where the workflows are known, ``search_run``)."""
    out = {}
    for name, raw in raw_profiles.items():
        if isinstance(raw, Mapping) and "search" in raw:
            out[name] = search_from_mapping(name, raw["search"], defaults.get(name, {}),
                                            f"{label}: profiles.{name}.search")
    return out


__all__ = ["PROBE_KEYS", "PRUNES", "ProbeWorkload", "SEARCH_KEYS", "STRATEGIES", "SearchDecl",
           "search_from_mapping", "searches_from"]
