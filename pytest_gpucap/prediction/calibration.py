"""Per-host corrections learned from measured runs, so the estimated parts of a prediction converge.

Only the KV cache is exact; the compute buffer, repacked weight copies and fixed overhead (CUDA
context, the process itself) differ by host and build. :func:`calibrate` fits them from ceiling
records (what the server reported and what the probe measured), and the result is saved per host
profile as JSON and read back by the next session.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..matrix import CapacityConfig
from .compute import estimate_compute_bytes
from .facts import MIB, ModelFacts, is_host_buffer, read_model_facts
from .weights import device_weights


@dataclass(frozen=True)
class ProfileCalibration:
    """How one host profile's measured memory relates to the estimate.

    ``compute_scale``: server-reported compute buffer / :func:`estimate_compute_bytes` (median).
    ``weights_scale``: server-reported model buffers / predicted weight bytes (median): above 1 on a
    CPU whose llama.cpp build keeps repacked copies of some weights (AMX, CPU_REPACK buffers).
    The fit ``used - weights - KV - output = compute_fraction * compute + overhead_mib +
    per_slot_mib * N`` explains the rest: on a GPU ``compute_fraction`` is ~1 and ``overhead_mib`` the
    CUDA context; on the host probe (server RSS) untouched compute pages do not count, so the
    fraction is small and the overhead is the process itself.
    """

    profile: str
    compute_scale: float = 1.0
    compute_fraction: float = 1.0
    weights_scale: float = 1.0
    overhead_mib: float = 0.0
    per_slot_mib: float = 0.0
    n_records: int = 0
    max_residual_mib: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Used when a profile has no calibration yet. On a GPU: the compute buffer counted in full plus a
#: rough CUDA context (+ cuBLAS workspace) guess. On the host probe (server RSS): what the calibration
#: learned on this project's CPU runs (llama.cpp b11434): the process itself is ~21 MiB, ~0.07 MiB
#: per slot, and the compute buffer's pages are hardly touched after load (they are under load).
DEFAULT_CALIBRATION = {
    "cuda": ProfileCalibration("default-cuda", overhead_mib=512.0),
    "host": ProfileCalibration("default-host", compute_fraction=0.0, overhead_mib=21.0, per_slot_mib=0.07),
}


@dataclass(frozen=True)
class Calibration:
    """Per host profile corrections (JSON file keyed by profile name)."""

    profiles: Mapping[str, ProfileCalibration] = field(default_factory=dict)

    def for_profile(self, name: str) -> ProfileCalibration | None:
        return self.profiles.get(name)

    def merged(self, other: "Calibration") -> "Calibration":
        return Calibration({**self.profiles, **other.profiles})

    def save_calibration(self, path: Path) -> None:
        save_calibration(self, path)


def save_calibration(calibration: Calibration, path: Path) -> None:
    """Write ``{profile: {...}}`` as JSON (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({k: v.as_dict() for k, v in calibration.profiles.items()}, indent=2,
                              sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def load_calibration(path: Path) -> Calibration:
    """Read a calibration file; a missing file is an empty calibration."""
    path = Path(path)
    if not path.exists():
        return Calibration()
    data = json.loads(path.read_text(encoding="utf-8"))
    return Calibration({k: ProfileCalibration(**v) for k, v in data.items()})


# ---------------------------------------------------------------- reading ceiling records

def _config_from_record(record: Mapping[str, Any]) -> CapacityConfig:
    c = dict(record["config"])
    for key in ("extra_args",):
        c[key] = tuple(c.get(key) or ())
    c["env"] = tuple(tuple(x) for x in (c.get("env") or ()))
    return CapacityConfig(**c)


def _facts_for(record: Mapping[str, Any], facts: Any) -> ModelFacts | None:
    if isinstance(facts, ModelFacts):
        return facts
    model = (record.get("server") or {}).get("model")
    if isinstance(facts, Mapping) and model in facts:
        return facts[model]
    if model and Path(model).is_file():
        try:
            return read_model_facts(Path(model))
        except (OSError, ValueError, KeyError, IndexError):  # unreadable or unusual GGUF: not calibrated
            return None
    return None


def _server_sum(d: Any) -> float:
    return float(sum(d.values())) if isinstance(d, Mapping) else float(d or 0.0)


def record_parts(record: Mapping[str, Any]) -> dict[str, float] | None:
    """A ceiling record's memory in the prediction's terms (MiB): ``used`` (measured, less the
    baseline) and the server-reported ``weights``, ``kv``, ``compute`` and ``output`` on the probed
    device, plus ``n``; None without a measurement or a server report."""
    mem = record.get("memory") or {}
    rep = mem.get("server_report") or {}
    used = mem.get("used_after_load_mib")
    if used is None or not rep:
        return None
    device = mem.get("probe", "host")
    model = rep.get("model_mib") or {}
    compute = rep.get("compute_mib") or {}
    if device == "nvml":  # device buffers only: CUDA0 etc., not the host's
        model_dev = sum(v for k, v in model.items() if not is_host_buffer(k))
        compute_dev = sum(v for k, v in compute.items() if not is_host_buffer(k))
        output = 0.0
    else:
        model_dev, compute_dev, output = _server_sum(model), _server_sum(compute), _server_sum(rep.get("output_mib"))
    return {"used": float(used) - float(mem.get("baseline_used_mib") or 0.0), "weights": model_dev,
            "kv": float(rep.get("kv_mib") or 0.0), "compute": compute_dev, "output": output,
            "n": float(record["config"]["n"])}


def calibrate(records: Sequence[Mapping[str, Any]], facts: Any = None) -> Calibration:
    """Learn each profile's corrections from ceiling records (see ``ceiling.ceiling_record``).

    Uses ``record["memory"]["server_report"]`` (model/KV/compute MiB), ``used_after_load_mib`` minus
    ``baseline_used_mib`` and ``record["config"]``. ``facts`` (one ModelFacts, or a mapping from the
    record's ``server.model`` path) lets it compare the compute estimate; by default the model file
    named in the record is read when it still exists.
    """
    by_profile: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records:
        if rec.get("kind", "ceiling") == "ceiling" and record_parts(rec) is not None:
            by_profile.setdefault(rec.get("profile") or rec["config"]["profile"], []).append(rec)
    out: dict[str, ProfileCalibration] = {}
    for profile, recs in by_profile.items():
        parts = [record_parts(r) for r in recs]
        ratios, weight_ratios = [], []
        for rec, p in zip(recs, parts):
            f = _facts_for(rec, facts)
            if f is None or not p:
                continue
            cfg = _config_from_record(rec)
            device = "cuda" if (rec.get("memory") or {}).get("probe") == "nvml" else "host"
            predicted_weights = device_weights(cfg, f, device)[0] / MIB
            if predicted_weights > 0 and p["weights"] > 0:
                weight_ratios.append(p["weights"] / predicted_weights)
            est = estimate_compute_bytes(cfg, f) / MIB
            if est > 0 and p["compute"]:
                ratios.append(p["compute"] / est)
        scale = statistics.median(ratios) if ratios else 1.0
        weights_scale = statistics.median(weight_ratios) if weight_ratios else 1.0
        y = np.array([p["used"] - p["weights"] - p["kv"] - p["output"] for p in parts])
        x_c = np.array([p["compute"] for p in parts])
        x_n = np.array([p["n"] for p in parts])
        probe = (recs[0].get("memory") or {}).get("probe", "host")
        frac, per_slot = (1.0 if probe == "nvml" else 0.0), 0.0
        if len(parts) >= 3 and np.ptp(x_c) > 0:
            cols = [x_c, np.ones_like(x_c)] + ([x_n] if np.ptp(x_n) > 0 and len(parts) >= 4 else [])
            sol = np.linalg.lstsq(np.stack(cols, axis=1), y, rcond=None)[0]
            frac = float(min(max(sol[0], 0.0), 1.5))
            if len(cols) == 3:
                per_slot = float(max(sol[2], 0.0))
        overhead = float(np.median(y - frac * x_c - per_slot * x_n))
        resid = y - frac * x_c - per_slot * x_n - overhead
        out[profile] = ProfileCalibration(profile, compute_scale=round(scale, 4), compute_fraction=round(frac, 4),
                                          weights_scale=round(weights_scale, 4),
                                          overhead_mib=round(overhead, 2), per_slot_mib=round(per_slot, 3),
                                          n_records=len(parts),
                                          max_residual_mib=round(float(np.max(np.abs(resid))), 2))
    return Calibration(out)
