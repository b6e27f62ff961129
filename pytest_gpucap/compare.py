"""Run-to-run comparison of two results.jsonl files: per-config deltas of the headline figures.

Regressions are judged per metric direction (less free memory, more used memory, slower boot,
lower TPS, higher latency are worse) so ``--fail-on-regression`` can gate a CI run. A figure measured
over repeated runs (``--gpucap-repeat``) is judged against the larger of the threshold and its measured
spread: a change the host's own run-to-run noise explains is not a regression.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .records import TRACKED, Figure, Record, SchemaError, as_record, read_jsonl, workload_name

DEFAULT_THRESHOLD_PCT = 5.0

#: The figures the gate judges: the tracked figures (``records.TRACKED``) marked ``gated``.
GATED: tuple[Figure, ...] = tuple(f for f in TRACKED if f.gated)
KINDS = tuple(dict.fromkeys(f.kind for f in GATED))


class CompareError(Exception):
    """An input cannot be compared (missing or empty); the message is one line."""


@dataclass(frozen=True)
class Row:
    """One metric of one config in both runs (``old``/``new`` None when a side lacks it)."""

    kind: str
    config_id: str
    workload: str
    metric: str
    old: float | None
    new: float | None
    higher_is_better: bool
    threshold_pct: float
    spread_pct: float | None = None  # the larger run-to-run spread of the two sides (--gpucap-repeat)

    @property
    def tolerance_pct(self) -> float:
        """How far the figure may worsen: the threshold, or the measured spread when that is larger."""
        return max(self.threshold_pct, self.spread_pct or 0.0)

    @property
    def spread_binds(self) -> bool:
        return (self.spread_pct or 0.0) > self.threshold_pct

    @property
    def delta(self) -> float | None:
        return None if self.old is None or self.new is None else self.new - self.old

    @property
    def delta_pct(self) -> float | None:
        """Change relative to the old value; ``inf`` when the old value was 0 and it changed."""
        d = self.delta
        if d is None:
            return None
        if self.old == 0:
            return 0.0 if d == 0 else math.copysign(math.inf, d)
        return d / abs(self.old) * 100

    @property
    def worse(self) -> bool:
        d = self.delta
        return bool(d) and ((d < 0) if self.higher_is_better else (d > 0))

    @property
    def regression(self) -> bool:
        pct = self.delta_pct
        return self.worse and pct is not None and abs(pct) > self.tolerance_pct

    def fails(self, gate_pct: float) -> bool:
        """Whether ``--fail-on-regression gate_pct`` fails on this row (again beyond the spread, if larger)."""
        pct = self.delta_pct
        return self.worse and pct is not None and abs(pct) > max(gate_pct, self.spread_pct or 0.0)

    @property
    def marker(self) -> str:
        if self.old is None and self.new is None:
            return "no value"
        if self.old is None:
            return "only in new"
        if self.new is None:
            return "only in old"
        spread = f"spread {self.spread_pct:.1f}%" if self.spread_binds else ""
        if self.regression:
            return f"REGRESSION (beyond {spread})" if spread else "REGRESSION"
        if self.worse:
            return f"worse (within {spread or 'threshold'})"
        return "better" if self.delta else ""


def _key(record: Record) -> tuple[str, str, str]:
    return record.kind, str(record.config_id), workload_name(record)


def _latest(records: Iterable[Record | Mapping[str, Any]]) -> dict[tuple[str, str, str], Record]:
    """Last record per (kind, config, workload): a re-run appended later supersedes the earlier one."""
    out: dict[tuple[str, str, str], Record] = {}
    for r in records:
        if isinstance(r, (Record, Mapping)) and (rec := as_record(r)).kind in KINDS:
            out[_key(rec)] = rec
    return out


def compare_records(old: list[Record | Mapping[str, Any]], new: list[Record | Mapping[str, Any]],
                    threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> tuple[list[Row], list[Row]]:
    """All metric rows (old order, then configs only in new) and the rows that regressed past the threshold."""
    a, b = _latest(old), _latest(new)
    rows: list[Row] = []
    for key in [*a, *(k for k in b if k not in a)]:
        kind, cid, workload = key
        ra, rb = a.get(key), b.get(key)
        for fig in (f for f in GATED if f.kind == kind):
            spreads = [s for s in (fig.spread_pct(ra, fig.name), fig.spread_pct(rb, fig.name)) if s is not None]
            rows.append(Row(kind, cid, workload, fig.name, fig.values(ra)[fig.name] if ra else None,
                            fig.values(rb)[fig.name] if rb else None, fig.higher_is_better, threshold_pct,
                            max(spreads) if spreads else None))
    return rows, [r for r in rows if r.regression]


def spread_note(rows: list[Row]) -> str:
    """One line for the gate output when repeated runs widened the tolerance of some figures ("" if none)."""
    wide = [r for r in rows if r.spread_binds]
    if not wide:
        return ""
    threshold = wide[0].threshold_pct
    return (f"{len(wide)} figure(s) measured over repeated runs (--gpucap-repeat) spread wider than "
            f"{threshold:g}%: each is judged beyond the larger of the threshold and its measured spread "
            f"(up to {max(r.spread_pct or 0.0 for r in wide):.1f}%).")


def load(path: Path) -> list[dict[str, Any]]:
    """Record dicts from a results.jsonl, or from DIR/results.jsonl when given a directory (one line
    naming the file and the version when it was written by another schema version)."""
    path = Path(path)
    file = path / "results.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise CompareError(f"{file}: no such file (pass a results.jsonl or the report directory holding one)")
    try:
        records = read_jsonl(file)
    except SchemaError as exc:
        raise CompareError(str(exc)) from None
    if not records:
        raise CompareError(f"{file}: no result records in the file")
    return records


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _fmt_pct(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "+∞%" if value > 0 else "−∞%"
    return f"{value:+.1f}%"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def format_table(rows: list[Row]) -> str:
    """A Markdown table (readable as plain text) with a marker column for regressions."""
    lines = ["| kind | config | workload | metric | old | new | Δ | Δ% | |", "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        delta = r.delta
        lines.append("| " + " | ".join(_cell(x) for x in (
            r.kind, r.config_id, r.workload or "—", r.metric + (" ↑" if r.higher_is_better else " ↓"),
            _fmt(r.old), _fmt(r.new), "—" if delta is None else f"{delta:+,.2f}", _fmt_pct(r.delta_pct),
            f"**{r.marker}**" if r.regression else r.marker)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m pytest_gpucap compare OLD NEW [--fail-on-regression PCT] [--threshold PCT]``."""
    p = argparse.ArgumentParser(prog="python -m pytest_gpucap compare",
                                description="Per-config deltas of headline figures between two runs.")
    p.add_argument("old", type=Path, help="results.jsonl (or its directory) of the baseline run")
    p.add_argument("new", type=Path, help="results.jsonl (or its directory) of the run to check")
    p.add_argument("--fail-on-regression", type=float, metavar="PCT", default=None,
                   help="exit 1 when a tracked metric regresses by more than PCT percent")
    p.add_argument("--threshold", type=float, metavar="PCT", default=None,
                   help=f"mark regressions beyond PCT percent (default: the --fail-on-regression value, "
                        f"else {DEFAULT_THRESHOLD_PCT:g})")
    p.add_argument("--html", type=Path, metavar="FILE", default=None,
                   help="also write the two runs side by side (maps, verdicts, deltas, regressions first) to FILE")
    args = p.parse_args(argv)
    for name in ("fail_on_regression", "threshold"):
        value = getattr(args, name)
        if value is not None and (value < 0 or math.isnan(value)):
            p.error(f"--{name.replace('_', '-')} must be a percentage >= 0, got {value:g}")
    threshold = args.threshold if args.threshold is not None else (
        args.fail_on_regression if args.fail_on_regression is not None else DEFAULT_THRESHOLD_PCT)
    try:
        old, new = load(args.old), load(args.new)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, _ = compare_records(old, new, threshold)
    print(format_table(rows))
    if args.html is not None:
        from .report.comparison import render_comparison

        print(render_comparison(old, new, rows, threshold, (str(args.old), str(args.new)), args.html))
    gate = args.fail_on_regression
    failing = [r for r in rows if gate is not None and r.fails(gate)]
    marked = sum(r.regression for r in rows)
    print(f"\n{marked} regression(s) beyond {threshold:g}% "
          "(↑ higher is better, ↓ lower is better; Δ = new − old, Δ% relative to old).")
    if note := spread_note(rows):
        print(note)
    if failing:
        print(f"FAIL: {len(failing)} tracked metric(s) regressed by more than {gate:g}%: "
              + ", ".join(f"{r.config_id} {r.metric} {_fmt_pct(r.delta_pct)}" for r in failing), file=sys.stderr)
        return 1
    return 0
