"""The write-up's "Vision" table: what an image costs per config (image tokens, memory per image) and the
concurrent-images row (one image on every slot at once: minimum free memory, failed requests)."""

from __future__ import annotations

from ..records import Record, WorkloadRecord
from . import fmt
from .tables import Cell, Table, _n, _table, ident, of_kind


def vision_table(records: list[Record]) -> Table:
    """One row per workload record with a ``vision`` section (image turns or the concurrent-images step)."""
    cols = [("Config", False), ("Workload", False), ("Images sent", False), ("Image turns", True),
            ("Images", True), ("Image tokens/image", True), ("MiB/image", True), ("Concurrent", True),
            ("Failed", True), ("Min free (MiB)", True), ("Dip (MiB)", True)]
    rows = []
    for r in of_kind(records, "workload"):
        if not isinstance(r, WorkloadRecord) or r.vision is None:
            continue
        v = r.vision
        failed = fmt.as_int(v.failed)
        rows.append([Cell(ident(r)), Cell(fmt.text(r.workload.name), "text"),
                     Cell("yes" if v.sent else f"no ({fmt.text(v.note)})", "text" if v.sent else "text warn"),
                     _n(fmt.integer(v.image_turns)), _n(fmt.integer(v.images)),
                     _n(fmt.integer(v.image_tokens_per_image)), _n(fmt.mib(v.image_mib)),
                     _n(fmt.integer(v.concurrent)),
                     Cell(fmt.integer(v.failed), "num" if failed is None else ("num ok" if failed == 0 else "num bad")),
                     _n(fmt.mib(v.min_free_mib)), _n(fmt.mib(v.dip_mib))])
    table = _table(cols, rows)
    table.notes = ["Image tokens/image: prompt tokens of a one-image request minus the same request without it "
                   "(server usage); MiB/image: used memory during that request minus just before (≤ 100 ms "
                   "readings). Concurrent: one image on every slot at the same moment; Dip = free before − min free."]
    return table
