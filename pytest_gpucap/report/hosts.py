"""Records from several hosts: the write-up groups by host (``record.host``: hostname and GPU) and shows the
same config's headline figures side by side, one column per host.

Without this, two hosts' records of one config id would supersede each other (the last one read wins)
and a reader could not see that the same N × ctx fits on one card and not on the other.
"""

from __future__ import annotations

from dataclasses import replace

from ..records import TRACKED, MeasuredRecord, Record, workload_name
from . import fmt
from .answer import CapacityMap, Piece, capacity_maps, verdict_paragraph
from .recommend import Recommendation, recommendations
from .tables import Cell, Table, host_label, ident

#: (kind, tracked figure, row label): the headline figures compared across hosts (all in ``records.TRACKED``).
HEADLINES = (("ceiling", "free_mib", "free after load through hold (MiB)"),
             ("ceiling", "used_after_load_mib", "used after load (MiB)"),
             ("ceiling", "boot_s", "boot (s)"),
             ("workload", "agg_tps", "aggregate tok/s"),
             ("workload", "e2e_p95_s", "end-to-end p95 (s)"),
             ("ramp", "max_clean_n", "ramp: max clean N"))
FIGURES = {(f.kind, f.name): f for f in TRACKED}
DIGITS = {"boot_s": 2, "e2e_p95_s": 2, "max_clean_n": 0}


def hosts(records: list[Record]) -> list[str]:
    """The hosts (hostname · GPU) measured records came from, in the order first seen."""
    return list(dict.fromkeys(h for r in records if isinstance(r, MeasuredRecord) and (h := host_label(r))))


def by_host(records: list[Record]) -> dict[str, list[Record]]:
    """Each host's records; a record without a host (a config skipped before boot, a search) goes to every host."""
    names = hosts(records)
    return {h: [r for r in records if not isinstance(r, MeasuredRecord) or host_label(r) in (h, "")]
            for h in names}


def side_by_side(records: list[Record]) -> Table:
    """Config × host: each headline figure of each config one row, one column per host (empty with one host)."""
    names = hosts(records)
    if len(names) < 2:
        return Table([])
    latest: dict[tuple[str, str, str, str], Record] = {}
    for r in records:
        if isinstance(r, MeasuredRecord):
            latest[(ident(r), str(r.kind), workload_name(r), host_label(r))] = r
    rows: dict[tuple[str, str, str], list[Cell]] = {}
    for (cid, kind, workload, host), r in latest.items():
        for fig_kind, name, label in HEADLINES:
            if fig_kind != kind:
                continue
            value = FIGURES[(kind, name)].values(r).get(name)
            if value is None:
                continue
            key = (cid, workload, label)
            row = rows.setdefault(key, [Cell(cid), Cell(f"{workload}: {label}" if workload else label)]
                                  + [Cell(fmt.DASH, "num") for _ in names])
            row[2 + names.index(host)] = Cell(fmt.num(value, DIGITS.get(name, 1)), "num")
    order = {label: i for i, (_, _, label) in enumerate(HEADLINES)}
    table = Table(["config", "figure", *names], numeric=[False, False, *([True] * len(names))])
    table.rows = [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], order[k[2]]))]
    return table


def first_screen(records: list[Record]) -> tuple[list[CapacityMap], list[Recommendation], list[Piece]]:
    """The capacity maps, the ranked recommendations and the verdict paragraph: once for one host, else per
    host (each map, ranked table and sentence names its host), so one host's figures never stand for another's."""
    groups = by_host(records)
    if len(groups) < 2:
        recs = recommendations(records)
        return capacity_maps(records), recs, verdict_paragraph(records, recs)
    maps: list[CapacityMap] = []
    recs = []
    paragraph: list[Piece] = []
    for host, subset in groups.items():
        host_recs = recommendations(subset)
        for m in capacity_maps(subset):
            m.host = host
            maps.append(m)
        recs += [replace(r, use_case=f"{r.use_case} — {host}") for r in host_recs]
        paragraph += [(" " if paragraph else "", False), ("On ", False), (host, True), (": ", False),
                      *verdict_paragraph(subset, host_recs)]
    return maps, recs, paragraph
