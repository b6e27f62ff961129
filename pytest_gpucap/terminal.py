"""Text for the terminal: what ``--gpucap-predict`` prints instead of running anything.

Kept out of :mod:`pytest_gpucap.prediction`, which computes figures and formats none, so the
prediction stays usable without a terminal and the wording can change without touching the model.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .backends.fit_params import DISAGREE_PCT
from .prediction import Prediction


def fit_table(rows: Iterable[Prediction], projections: Mapping[str, float | None] | None = None) -> str:
    """A text table for ``--gpucap-predict``: one line per config, nothing booted; with ``projections``
    (llama.cpp's own total per config id, ``llama-fit-params``) a column beside our total."""
    rows = list(rows)
    theirs = dict(projections or {})
    head = ("config", "slot ctx", "weights", "KV", "KV/slot", "compute", "total", "llama.cpp", "budget", "free",
            "verdict")
    lines = []
    for p in rows:
        verdict = p.verdict or "-"
        if p.problems:
            verdict = f"No boot: {p.problems[0]}"
        unknown_mmproj = any(n.startswith("mmproj requested") for n in p.notes)
        weights = f"{p.weights_mib + p.mmproj_mib:.0f}" + ("+?" if unknown_mmproj else "")
        lines.append((p.config_id, str(p.slot_ctx), weights, f"{p.kv_mib:.1f}",
                      f"{p.kv_per_slot_mib:.1f}", f"{p.compute_mib:.0f}", f"{p.total_mib:.0f}",
                      _theirs(p.total_mib, theirs.get(p.config_id)),
                      "-" if p.budget_mib is None else f"{p.budget_mib:.0f}",
                      "-" if p.free_mib is None else f"{p.free_mib:.0f}",
                      verdict + ("" if p.calibrated else "*")))
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(head)]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 10) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = [fmt(head) + "   (MiB; weights incl. mmproj)", fmt(tuple("-" * w for w in widths))]
    out += [fmt(r) for r in lines]
    if any(any(n.startswith("mmproj requested") for n in p.notes) for p in rows):
        out.append("+? the vision projector's size is unknown: pass --gpucap-mmproj PATH")
    if any(_theirs(p.total_mib, theirs.get(p.config_id)).endswith("!") for p in rows):
        out.append(f"! llama.cpp's own projection (llama-fit-params) differs from ours by more than {DISAGREE_PCT:g} %")
    if any(not p.calibrated for p in rows):
        out.append("* uncalibrated: compute and overhead are estimates (calibrate from a measured run)")
    if any(p.compute_counted_mib < p.compute_mib for p in rows):
        out.append("total counts the share of the compute buffer seen in memory after load (host RSS: "
                   "pages untouched until the first large batch)")
    return "\n".join(out)


def _theirs(ours: float, theirs: float | None) -> str:
    """llama.cpp's total, ``!`` when it differs from ours by more than the disagreement threshold."""
    if theirs is None:
        return "-"
    return f"{theirs:.0f}" + ("!" if theirs and abs(100 * (ours - theirs) / theirs) > DISAGREE_PCT else "")
