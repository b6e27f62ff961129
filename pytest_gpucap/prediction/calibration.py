"""Per-host corrections learned from measured runs, so the estimated parts of a prediction converge.

Only the KV cache is exact; the compute buffer, repacked weight copies and fixed overhead (CUDA
context, the process itself) differ by host and build. :func:`calibrate` fits them from measured
ceilings (:class:`CalibrationSample`: what the server reported and what the probe measured; the
records layer builds them from ceiling records, ``record_calibration``), and the result is saved per
host profile as JSON and read back by the next session.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..files import write_atomically
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
    text = json.dumps({k: v.as_dict() for k, v in calibration.profiles.items()}, indent=2, sort_keys=True)
    write_atomically(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load_calibration(path: Path) -> Calibration:
    """Read a calibration file; a missing file is an empty calibration."""
    path = Path(path)
    if not path.exists():
        return Calibration()
    data = json.loads(path.read_text(encoding="utf-8"))
    return Calibration({k: ProfileCalibration(**v) for k, v in data.items()})


# ---------------------------------------------------------------- samples: measured ceilings

Buffers = Mapping[str, float] | float | None  # MiB per device buffer (``{"CPU": 1.5, "CUDA0": 300.0}``) or one sum


@dataclass(frozen=True)
class CalibrationSample:
    """One measured ceiling in the calibration's terms: the config, where it was measured and the
    server's own account of its buffers. Built from a ceiling record at the records layer
    (``record_calibration.sample``), so this package never reads records.

    ``probe``: the memory probe's kind (``"nvml"`` counts device buffers only; any other is the host).
    ``used_after_load_mib`` / ``baseline_used_mib``: what the probe measured (used less baseline is
    the server's share). ``model_mib`` / ``compute_mib`` / ``output_mib`` / ``kv_mib``: the buffers the
    server logged at load; ``reported``: whether it logged any. ``kv_line_mib``: the size of each KV
    cache line it printed; ``free_after_load_mib``: free memory after load; ``model_path``: the model
    file, read for its facts when none are given.
    """

    config: CapacityConfig
    profile: str
    probe: str | None = "host"
    used_after_load_mib: float | None = None
    baseline_used_mib: float | None = None
    reported: bool = False
    model_mib: Buffers = None
    compute_mib: Buffers = None
    output_mib: Buffers = None
    kv_mib: float | None = None
    kv_line_mib: tuple[float, ...] = ()
    free_after_load_mib: float | None = None
    model_path: str | None = None

    @property
    def device(self) -> str:
        return "cuda" if self.probe == "nvml" else "host"

    def parts(self) -> dict[str, float] | None:
        """The measured memory in the prediction's terms (MiB): ``used`` (measured, less the baseline)
        and the server-reported ``weights``, ``kv``, ``compute`` and ``output`` on the probed device,
        plus ``n``; None without a measurement or a server report."""
        if self.used_after_load_mib is None or not self.reported:
            return None
        if self.probe == "nvml":  # device buffers only: CUDA0 etc., not the host's
            weights, compute = _device_sum(self.model_mib), _device_sum(self.compute_mib)
            output = 0.0
        else:
            weights, compute, output = (_server_sum(self.model_mib), _server_sum(self.compute_mib),
                                        _server_sum(self.output_mib))
        return {"used": float(self.used_after_load_mib) - float(self.baseline_used_mib or 0.0), "weights": weights,
                "kv": float(self.kv_mib or 0.0), "compute": compute, "output": output, "n": float(self.config.n)}


def _server_sum(d: Any) -> float:
    return float(sum(d.values())) if isinstance(d, Mapping) else float(d or 0.0)


def _device_sum(d: Any) -> float:
    return float(sum(v for k, v in d.items() if not is_host_buffer(k))) if isinstance(d, Mapping) else 0.0


def _facts_for(sample: CalibrationSample, facts: Any) -> ModelFacts | None:
    if isinstance(facts, ModelFacts):
        return facts
    model = sample.model_path
    if isinstance(facts, Mapping) and model in facts:
        return facts[model]
    if model and Path(model).is_file():
        try:
            return read_model_facts(Path(model))
        except (OSError, ValueError, KeyError, IndexError):  # unreadable or unusual GGUF: not calibrated
            return None
    return None


def calibrate(samples: Iterable[CalibrationSample], facts: Any = None) -> Calibration:
    """Learn each profile's corrections from measured ceilings (for ceiling record dicts:
    ``pytest_gpucap.record_calibration.calibrate_from``).

    Uses each sample's server-reported model/KV/compute/output MiB, ``used_after_load_mib`` minus
    ``baseline_used_mib`` and its config; samples without a measurement or a server report are left
    out. ``facts`` (one ModelFacts, or a mapping from ``model_path``) lets it compare the compute
    estimate; by default the sample's model file is read when it still exists.
    """
    by_profile: dict[str, list[tuple[CalibrationSample, dict[str, float]]]] = {}
    for sample in samples:
        if not isinstance(sample, CalibrationSample):
            raise TypeError(f"calibrate takes CalibrationSample, not {type(sample).__name__}: for records use "
                            "pytest_gpucap.record_calibration.calibrate_from(records)")
        p = sample.parts()
        if p is not None:
            by_profile.setdefault(sample.profile, []).append((sample, p))
    out: dict[str, ProfileCalibration] = {}
    for profile, pairs in by_profile.items():
        parts = [p for _, p in pairs]
        ratios, weight_ratios = [], []
        for sample, p in pairs:
            f = _facts_for(sample, facts)
            if f is None:
                continue
            cfg = sample.config
            predicted_weights = device_weights(cfg, f, sample.device)[0] / MIB
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
        frac, per_slot = (1.0 if pairs[0][0].probe == "nvml" else 0.0), 0.0
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
