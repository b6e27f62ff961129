"""Number and label formatting shared by the Markdown and HTML write-ups.

Both outputs format through these helpers so a figure reads the same in each, and the rounding
rule stated at the top of the report is the one actually applied.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

DASH = "—"

ROUNDING_NOTE = ("Figures are copied from results.jsonl and rounded for display only: MiB to 0.1, "
                 "GiB to 0.01, seconds to 0.01, tokens/s to 0.1. Figures marked † are derived from "
                 "recorded values by the formula stated next to them.")


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def num(value: Any, digits: int = 1) -> str:
    """``1930.7`` → ``1,930.7``; missing → ``—``."""
    if missing(value):
        return DASH
    try:
        return f"{float(value):,.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def integer(value: Any) -> str:
    if missing(value):
        return DASH
    try:
        return f"{int(value):,}"
    except (TypeError, ValueError):
        return str(value)


def mib(value: Any) -> str:
    return num(value, 1)


def gib(value: Any) -> str:
    return num(value, 2)


def secs(value: Any) -> str:
    return num(value, 2)


def tps(value: Any) -> str:
    return num(value, 1)


def short_ctx(ctx: Any) -> str:
    """Token counts the way people say them: ``65536`` → ``64k``."""
    if missing(ctx):
        return DASH
    ctx = int(ctx)
    if ctx and ctx % 1024 == 0:
        return f"{ctx // 1024}k"
    return f"{ctx:,}"


def agents(names: Any) -> str:
    """``["Research"]*3 + ["Dev"]`` → ``3×Research, Dev`` (first-seen order)."""
    if not names:
        return DASH
    if isinstance(names, str):
        return names
    counts = Counter(str(n) for n in names)
    seen: list[str] = []
    for n in names:
        if str(n) not in seen:
            seen.append(str(n))
    return ", ".join(f"{counts[n]}×{n}" if counts[n] > 1 else n for n in seen)


def devices(mapping: Any) -> tuple[float | None, str]:
    """A device→MiB dict as (total, text); the text names devices only when there are several."""
    if not isinstance(mapping, dict) or not mapping:
        return None, DASH
    values = {str(k): f for k, v in mapping.items() if (f := as_float(v)) is not None}
    if not values:
        return None, DASH
    total = sum(values.values())
    if len(values) == 1:
        return total, mib(total)
    parts = " + ".join(f"{k} {mib(v)}" for k, v in sorted(values.items()))
    return total, f"{mib(total)} ({parts})"


def text(value: Any) -> str:
    """Any recorded label as text; missing (None/NaN from a pandas frame) → ``—``."""
    return DASH if missing(value) or value == "" else str(value)


def as_float(value: Any) -> float | None:
    """A recorded number as float, None when missing or not a number (records are not type-checked)."""
    if missing(value) or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def as_int(value: Any) -> int | None:
    """Integers that may have passed through pandas (numpy ints, or floats when a column had gaps)."""
    f = as_float(value)
    return int(f) if f is not None and f.is_integer() else None
