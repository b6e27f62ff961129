"""What a profile declares about the rest of its host: production services to stop and restore
around the session, and co-tenants that run beside every config (``[[profiles.NAME.services]]``,
``[[profiles.NAME.cotenants]]``).

Commands are argv lists and run without a shell (write ``["sh", "-c", "..."]`` for one), so a
path with a space or a quote in a matrix file means what it says. Errors are ``ValueError`` with
one line naming the entry and the fix; ``matrix`` turns them into ``MatrixError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

SERVICE_KEYS = ("name", "stop", "start", "health", "timeout_s")
COTENANT_KEYS = ("name", "argv", "env", "health", "timeout_s", "load")
LOAD_KEYS = ("url", "every_s", "json")


@dataclass(frozen=True)
class Health:
    """How to tell a service or co-tenant is up: a URL answering 200, or a command exiting 0."""

    url: str | None = None
    argv: tuple[str, ...] = ()

    def describe(self) -> str:
        return self.url or " ".join(self.argv)


@dataclass(frozen=True)
class ServiceSpec:
    """A production service that must not run during the session: stopped first, started again last."""

    name: str
    stop: tuple[str, ...]
    start: tuple[str, ...]
    health: Health | None = None
    timeout_s: float = 60.0


@dataclass(frozen=True)
class CotenantLoad:
    """Light load on a co-tenant (an embedding request every ``every_s``), so interference is measured."""

    url: str
    every_s: float = 5.0
    body: str = "{}"  # the JSON request body, kept as text so the spec stays hashable


@dataclass(frozen=True)
class CotenantSpec:
    """A process that runs beside every config, as it will in production (the study's embedding server)."""

    name: str
    argv: tuple[str, ...]
    health: Health
    env: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 120.0
    load: CotenantLoad | None = None


def _argv(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list) or not value or \
            not all(isinstance(a, str) and a for a in value):
        raise ValueError(f'{where}: {key} must be a non-empty list of strings (no shell; write '
                         f'["sh", "-c", "..."] for one), got {value!r}')
    return tuple(value)


def _health(value: Any, where: str) -> Health:
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return Health(url=value)
    if isinstance(value, list):
        return Health(argv=_argv(value, "health", where))
    raise ValueError(f'{where}: health must be a URL ("http://127.0.0.1:8080/health") or a command list, got {value!r}')


def _entries(value: Any, keys: tuple[str, ...], where: str) -> list[tuple[str, Mapping[str, Any]]]:
    if not isinstance(value, list) or not all(isinstance(e, Mapping) for e in value):
        raise ValueError(f"{where}: must be an array of tables ([[{where.rsplit(': ', 1)[-1]}]])")
    out = []
    names: set[str] = set()
    for i, entry in enumerate(value):
        ewhere = f"{where}[{i}]"
        unknown = sorted(set(entry) - set(keys))
        if unknown:
            raise ValueError(f"{ewhere}: unknown key {unknown[0]!r} (valid keys: {', '.join(keys)})")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f'{ewhere}: needs a name, e.g. name = "production-llm"')
        if name in names:
            raise ValueError(f"{ewhere}: two entries are named {name!r}")
        names.add(name)
        out.append((ewhere, entry))
    return out


def _timeout(entry: Mapping[str, Any], where: str, default: float) -> float:
    value = entry.get("timeout_s", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}: timeout_s must be a number > 0, got {value!r}")
    return float(value)


def services_from(value: Any, where: str) -> tuple[ServiceSpec, ...]:
    """Validate ``[[profiles.NAME.services]]``."""
    specs = []
    for ewhere, entry in _entries(value, SERVICE_KEYS, where):
        for key in ("stop", "start"):
            if key not in entry:
                raise ValueError(f'{ewhere}: needs {key} = ["systemctl", "--user", "{key}", "..."]')
        health = _health(entry["health"], ewhere) if "health" in entry else None
        specs.append(ServiceSpec(entry["name"], _argv(entry["stop"], "stop", ewhere),
                                 _argv(entry["start"], "start", ewhere), health, _timeout(entry, ewhere, 60.0)))
    return tuple(specs)


def cotenants_from(value: Any, where: str) -> tuple[CotenantSpec, ...]:
    """Validate ``[[profiles.NAME.cotenants]]``."""
    specs = []
    for ewhere, entry in _entries(value, COTENANT_KEYS, where):
        if "argv" not in entry or "health" not in entry:
            raise ValueError(f'{ewhere}: needs argv = ["llama-server", ...] and health = "http://127.0.0.1:PORT/health"')
        env = entry.get("env", {})
        if not isinstance(env, Mapping) or not all(isinstance(v, str) for v in env.values()):
            raise ValueError(f'{ewhere}: env must be a table of strings, e.g. env = {{ CUDA_VISIBLE_DEVICES = "0" }}')
        specs.append(CotenantSpec(entry["name"], _argv(entry["argv"], "argv", ewhere), _health(entry["health"], ewhere),
                                  tuple(sorted(env.items())), _timeout(entry, ewhere, 120.0),
                                  _load(entry.get("load"), f"{ewhere}.load")))
    return tuple(specs)


def _load(value: Any, where: str) -> CotenantLoad | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or sorted(set(value) - set(LOAD_KEYS)):
        raise ValueError(f'{where}: must be a table with {", ".join(LOAD_KEYS)}, e.g. load = {{ url = '
                         f'"http://127.0.0.1:8090/v1/embeddings", every_s = 5, json = {{ input = "hello" }} }}')
    url = value.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"{where}: url must be an http(s) URL, got {url!r}")
    every = value.get("every_s", 5.0)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or every <= 0:
        raise ValueError(f"{where}: every_s must be a number > 0, got {every!r}")
    body = value.get("json", {})
    if not isinstance(body, Mapping):
        raise ValueError(f"{where}: json must be a table (the request body)")
    return CotenantLoad(url, float(every), json.dumps(body))
