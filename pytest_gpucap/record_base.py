"""The dict <-> dataclass mechanism behind every record section (``record_sections``, ``record_agents``):
a frozen dataclass whose typed fields are what readers look at, and whose ``from_dict`` → ``to_dict``
gives back the same dict (keys not typed ride along in ``extra``). Its own module so that section
modules can build on it without importing each other in a circle.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Iterable, Mapping, TypeVar

S = TypeVar("S", bound="Section")
_META = ("extra", "_keys", "absent")


# ---------------------------------------------------------------- the dict <-> dataclass mechanism

def opt(default: Any = None) -> Any:
    """A field the writer adds only sometimes: left out of ``to_dict`` while it holds its default."""
    return field(default=default, metadata={"optional": True})


def sub(cls: type, *, optional: bool = False, many: str = "") -> Any:
    """A nested section: one ``cls`` (required unless ``optional``), or ``many="list"``/``"map"`` of them."""
    meta = {"section": cls, "many": many, "optional": optional}
    if many == "list":
        return field(default=(), metadata=meta)
    if many == "map":
        return field(default_factory=dict, metadata=meta)
    return field(default=None, metadata=meta) if optional else field(metadata=meta)


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _single(f: Field[Any]) -> bool:
    return f.metadata.get("section") is not None and not f.metadata["many"]


def _load(f: Field[Any], value: Any) -> tuple[Any, bool]:
    """``value`` parsed for field ``f``, and whether writing the parsed value back gives ``value``."""
    cls, many = f.metadata.get("section"), f.metadata.get("many")
    if cls is None:
        return value, True
    if not many:
        if isinstance(value, Mapping):
            return cls.from_dict(value), True
        if f.metadata.get("optional"):
            return None, value is None
        return cls._read({}, absent=True), False
    if many == "map" and isinstance(value, Mapping):
        pairs: Iterable[tuple[Any, Any]] = value.items()
    elif many == "list" and isinstance(value, list):
        pairs = enumerate(value)
    else:
        return _default(f), False
    out, exact = {}, True
    for key, item in pairs:
        try:
            parsed = cls.from_dict(item)
        except (TypeError, KeyError, ValueError):
            exact = False
            continue
        exact = exact and parsed.to_dict() == item
        out[key] = parsed
    return (tuple(out.values()) if many == "list" else out), exact


def _dump(f: Field[Any], value: Any) -> Any:
    if f.metadata.get("section") is None or value is None:
        return value
    many = f.metadata.get("many")
    if many == "list":
        return [v.to_dict() for v in value]
    if many == "map":
        return {k: v.to_dict() for k, v in value.items()}
    return value.to_dict()


@dataclass(frozen=True, kw_only=True)
class Section:
    """A JSON object with typed fields. ``extra``: keys not typed here; ``_keys``: the keys it was read
    with (None when built in code, then every field is written except optional ones at their default);
    ``absent``: an empty stand-in for a required section the source did not have (never written back)."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    _keys: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    absent: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        return cls._read(data)

    @classmethod
    def _read(cls: type[S], data: Mapping[str, Any], absent: bool = False) -> S:
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls) if f.name not in _META}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            f = known.get(key)
            if f is None:
                extra[key] = value
                continue
            values[key], exact = _load(f, value)
            if not exact:
                extra[key] = value  # kept verbatim; the typed field holds what could be read
        for name, f in known.items():
            if name not in values and f.default is MISSING and f.default_factory is MISSING:
                values[name] = f.metadata["section"]._read({}, absent=True) if _single(f) else None
        return cls(**values, extra=extra, _keys=tuple(k for k in data if k in known), absent=absent)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in _META or f.name in self.extra:
                continue
            value = getattr(self, f.name)
            if self._writes(f, value):
                out[f.name] = _dump(f, value)
        out.update(self.extra)
        return out

    def _writes(self, f: Field[Any], value: Any) -> bool:
        default = _default(f)
        if self._keys is not None:
            return f.name in self._keys or (value != default and not (isinstance(value, Section) and value.absent))
        return not (f.metadata.get("optional") and value == default)


# ---------------------------------------------------------------- small sections

def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(value: Any) -> float | None:
    """A recorded figure as a float; None when absent, not a number, or NaN."""
    return float(value) if is_number(value) and not math.isnan(value) else None
