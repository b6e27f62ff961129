"""A config's predicted memory, free memory and headroom verdict before anything boots.

This is where the exact part (:mod:`.kv`) and the estimated parts (weights, :mod:`.compute`,
overhead from :mod:`.calibration`) add up to one :class:`Prediction` per config, the thing the plugin
skips on, the search prunes with and records keep under ``memory.predicted``; :func:`prediction_error`
sets it beside what the server then reported and the probe measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..matrix import BUILTIN_MODELS, GENERATED_PREFIX, CapacityConfig, HostProfile, SLO
from ..mmprojgen import ProjectorShape
from ..modelgen import ModelShape
from .calibration import DEFAULT_CALIBRATION, Calibration, CalibrationSample, ProfileCalibration
from .compute import estimate_compute_bytes
from .facts import MIB, ModelFacts, facts_from_shape, mmproj_bytes, read_model_facts
from .kv import KvCachePrediction, kv_bytes_per_token, kv_layout, kv_problems, predict_kv
from .weights import device_weights, weights_read_per_step


@dataclass(frozen=True)
class Prediction:
    """Predicted memory of one config on one device (MiB unless noted)."""

    config_id: str
    profile: str
    device: str  # cuda | host
    slot_ctx: int  # per-slot context after padding
    weights_mib: float
    mmproj_mib: float
    kv_mib: float
    kv_per_slot_mib: float
    kv_caches: tuple[KvCachePrediction, ...]
    compute_mib: float  # the compute buffer itself (estimate x scale, or as given)
    compute_counted_mib: float  # the part expected in measured memory (x compute_fraction)
    compute_source: str  # estimate | calibrated | given
    output_mib: float
    overhead_mib: float  # fixed + per-slot overhead from the calibration
    total_mib: float  # predicted memory the server uses on the device
    budget_mib: float | None = None
    baseline_used_mib: float = 0.0
    free_mib: float | None = None
    headroom_gib: float | None = None  # the SLO it is judged against
    verdict: str | None = None  # Comfortable | Marginal | Risky | No fit
    problems: tuple[str, ...] = ()  # reasons llama-server would refuse to boot
    notes: tuple[str, ...] = ()
    calibrated: bool = False
    weights_read_bytes: int = 0  # per decode step (roofline)
    kv_cell_bytes: tuple[tuple[int, int], ...] = ()  # per cache: (cells, bytes per cell per slot)
    flash_attn: bool = True
    n: int = 1

    @property
    def fits(self) -> bool:
        """Boots at all: no refusal and predicted free memory >= 0."""
        return not self.problems and (self.free_mib is None or self.free_mib >= 0)

    @property
    def meets_headroom(self) -> bool | None:
        if self.free_mib is None or self.headroom_gib is None:
            return None
        return self.fits and self.free_mib / 1024 >= self.headroom_gib

    def skip_reason(self) -> str | None:
        """A one-line skip reason when the config is predicted not to fit, else None.

        A config the server will refuse (``problems``) is not skipped: it is a mistake in the matrix,
        and booting it fails the case with the server's own words.
        """
        if self.problems:
            return None
        if self.free_mib is not None and self.free_mib < 0:
            return (f"predicted not to fit: {self.total_mib:.0f} MiB needed (weights {self.weights_mib:.0f}"
                    f" + mmproj {self.mmproj_mib:.0f} + KV {self.kv_mib:.0f} + compute {self.compute_counted_mib:.0f}"
                    f" + overhead {self.overhead_mib:.0f}) > {self.budget_mib - self.baseline_used_mib:.0f} MiB "
                    f"available (budget {self.budget_mib:.0f} - in use {self.baseline_used_mib:.0f}); "
                    "--gpucap-no-predict-skip boots it anyway")
        return None

    def as_dict(self) -> dict[str, Any]:
        """For a ceiling record's ``memory.predicted``."""
        r = lambda v: None if v is None else round(v, 2)  # noqa: E731
        return {
            "slot_ctx": self.slot_ctx, "weights_mib": r(self.weights_mib), "mmproj_mib": r(self.mmproj_mib),
            "kv_mib": r(self.kv_mib), "kv_per_slot_mib": r(self.kv_per_slot_mib),
            "kv_lines": [{"kind": k.kind, "cells": k.cells, "layers": k.layers, "seqs": k.seqs,
                          "size_mib": k.printed[0], "k_mib": k.printed[1], "v_mib": k.printed[2],
                          "k_bytes": k.k_bytes, "v_bytes": k.v_bytes} for k in self.kv_caches],
            "compute_mib": r(self.compute_mib), "compute_counted_mib": r(self.compute_counted_mib),
            "compute_source": self.compute_source, "output_mib": r(self.output_mib),
            "overhead_mib": r(self.overhead_mib), "total_mib": r(self.total_mib), "budget_mib": r(self.budget_mib),
            "baseline_used_mib": r(self.baseline_used_mib), "free_mib": r(self.free_mib),
            "headroom_gib": self.headroom_gib, "verdict": self.verdict, "fits": self.fits,
            "problems": list(self.problems), "notes": list(self.notes), "calibrated": self.calibrated,
        }


def predict(cfg: CapacityConfig, facts: ModelFacts, mmproj_bytes: int = 0, compute_mib: float | None = None,
            calibration: Calibration | ProfileCalibration | None = None, profile: HostProfile | None = None,
            baseline_used_mib: float = 0.0, budget_mib: float | None = None) -> Prediction:
    """Predicted device memory for ``cfg``; with ``profile``, also free memory and the headroom verdict.

    ``compute_mib`` (e.g. a compute buffer the server reported for this config earlier) replaces the
    estimate. ``baseline_used_mib`` is memory already in use on the device before boot (a co-tenant);
    ``budget_mib`` overrides ``profile.memory_gib``.
    """
    device = profile.device if profile else "host"
    if isinstance(calibration, ProfileCalibration):
        cal = calibration
    else:
        cal = calibration.for_profile(cfg.profile) if calibration is not None else None
    calibrated = cal is not None
    cal = cal or DEFAULT_CALIBRATION["cuda" if device == "cuda" else "host"]
    lay = kv_layout(cfg)
    problems = tuple(kv_problems(cfg, facts))
    notes = list(facts.notes)
    try:
        caches = predict_kv(cfg, facts)
    except ValueError as exc:  # whole blocks not filled: llama-server refuses too
        caches = ()
        problems += (str(exc),)
    kv_bytes = sum(c.bytes for c in caches)
    weights, wnote = device_weights(cfg, facts, device)
    weights = int(weights * cal.weights_scale)
    if wnote:
        notes.append(wnote)
    kv_dev_bytes = kv_bytes
    if device == "cuda" and cfg.gpu_layers is not None and cfg.gpu_layers <= facts.n_layer and facts.n_layer:
        kv_dev_bytes = kv_bytes * cfg.gpu_layers // facts.n_layer
    if compute_mib is None:
        est = estimate_compute_bytes(cfg, facts, caches) / MIB
        compute = est * cal.compute_scale
        source = "calibrated" if calibrated else "estimate"
    else:
        compute, source = float(compute_mib), "given"
    counted = compute * cal.compute_fraction
    output = lay.n_seq * facts.n_vocab * 4 / MIB if device != "cuda" else 0.0  # host output buffer
    overhead = cal.overhead_mib + cal.per_slot_mib * cfg.n
    mmproj = mmproj_bytes / MIB if cfg.mmproj else 0.0
    if cfg.mmproj and not mmproj_bytes:
        notes.append("mmproj requested but its size is unknown (pass mmproj_bytes)")
    total = weights / MIB + mmproj + kv_dev_bytes / MIB + counted + output + overhead
    budget = budget_mib if budget_mib is not None else (profile.memory_gib * 1024 if profile else None)
    free = verdict = slo_gib = None
    if budget is not None:
        free = budget - baseline_used_mib - total
        slo: SLO = profile.slo if profile else SLO()
        slo_gib = slo.headroom_gib
        verdict = "No fit" if (free < 0 or problems) else slo.headroom_class(free / 1024)
    cell_bytes = []
    per_tok = kv_bytes_per_token(facts, cfg.cache_type_k, cfg.cache_type_v, lay.flash_attn) if not problems else {}
    for c in caches:
        cell_bytes.append((c.cells, per_tok.get(c.kind, 0)))
    return Prediction(
        config_id=cfg.id, profile=cfg.profile, device=device, slot_ctx=lay.n_ctx_seq,
        weights_mib=weights / MIB, mmproj_mib=mmproj, kv_mib=kv_dev_bytes / MIB,
        kv_per_slot_mib=kv_bytes / MIB / cfg.n, kv_caches=caches, compute_mib=compute,
        compute_counted_mib=counted, compute_source=source, output_mib=output, overhead_mib=overhead,
        total_mib=total, budget_mib=budget, baseline_used_mib=baseline_used_mib, free_mib=free,
        headroom_gib=slo_gib, verdict=verdict, problems=problems, notes=tuple(notes), calibrated=calibrated,
        weights_read_bytes=weights_read_per_step(facts, cfg.n), kv_cell_bytes=tuple(cell_bytes),
        flash_attn=lay.flash_attn, n=cfg.n,
    )


def predict_for(cfg: CapacityConfig, profile: HostProfile, model: Path | ModelFacts, mmproj: Path | None = None,
                calibration: Calibration | None = None, baseline_used_mib: float = 0.0) -> Prediction:
    """Convenience for the plugin: read (cached) facts and the projector size, then :func:`predict`."""
    facts = model if isinstance(model, ModelFacts) else read_model_facts(Path(model))
    mm = mmproj_bytes(mmproj) if (cfg.mmproj and mmproj is not None) else 0
    return predict(cfg, facts, mm, calibration=calibration, profile=profile, baseline_used_mib=baseline_used_mib)


def prediction_error(pred: Prediction, sample: CalibrationSample | None) -> dict[str, Any]:
    """Predicted vs server-reported vs measured, for one config's measured ceiling (the records layer
    makes the sample of a ceiling record: ``record_calibration.sample``)."""
    parts = (sample.parts() if sample is not None else None) or {}
    server_kv = [f"{size:.2f}" for size in (sample.kv_line_mib if sample is not None else ())]
    predicted_kv = [c.printed[0] for c in pred.kv_caches]
    measured = parts.get("used")

    def row(p: float, s: float | None, m: float | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"predicted_mib": round(p, 2), "server_mib": None if s is None else round(s, 2)}
        if s is not None:
            d["diff_mib"] = round(p - s, 2)
        if m is not None:
            d["measured_mib"] = round(m, 2)
            d["error_mib"] = round(p - m, 2)
            d["error_pct"] = round(100 * (p - m) / m, 2) if m else None
        return d

    server_total = None
    if parts:
        server_total = parts["weights"] + parts["kv"] + parts["compute"] + parts["output"]
    out = {
        "config_id": pred.config_id,
        "kv": row(sum(float(x) for x in predicted_kv), parts.get("kv")) | {
            "lines_predicted": predicted_kv, "lines_server": server_kv, "exact": predicted_kv == server_kv},
        "weights": row(pred.weights_mib, parts.get("weights")),
        "compute": row(pred.compute_mib, parts.get("compute")),
        "total": row(pred.total_mib, server_total, measured),
    }
    if pred.free_mib is not None and sample is not None and sample.free_after_load_mib is not None:
        out["free"] = {"predicted_mib": round(pred.free_mib, 2), "measured_mib": sample.free_after_load_mib}
    return out


# ---------------------------------------------------------------- the whole matrix (--gpucap-predict)

def _model_table(name: str, models: Mapping[str, Mapping[str, Any]] | None) -> Mapping[str, Any]:
    return (models or {}).get(name) or BUILTIN_MODELS[name]


def facts_for_ref(ref: str, models: Mapping[str, Mapping[str, Any]] | None = None,
                  base_dir: Path | None = None) -> ModelFacts:
    """Facts for a matrix model reference: ``generated:NAME`` (from its shape, no file written) or a path
    (relative to ``base_dir``, the matrix file's folder)."""
    if ref.startswith(GENERATED_PREFIX):
        return facts_from_shape(ModelShape.from_mapping(_model_table(ref.removeprefix(GENERATED_PREFIX), models)))
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return read_model_facts(path)


def _generated_mmproj_bytes(ref: str, models: Mapping[str, Mapping[str, Any]] | None) -> int:
    table = _model_table(ref.removeprefix(GENERATED_PREFIX), models)
    return ProjectorShape.for_model(ModelShape.from_mapping(table)).approx_bytes()


def predict_matrix(matrix: Any, model: str | None = None, mmproj: str | Path | None = None,
                   calibration: Calibration | None = None,
                   baseline_used_mib: Mapping[str, float] | None = None) -> tuple[list[Prediction], list[str]]:
    """Predict every config of a ``matrix.Matrix`` without booting (``--gpucap-predict``).

    ``model``/``mmproj`` are the command-line overrides (as ``--gpucap-model``/``--gpucap-mmproj``);
    otherwise each config's or profile's own. Returns the predictions and one line per config that
    could not be predicted (no model named, file missing).
    """
    base_dir = matrix.path.parent if getattr(matrix, "path", None) else None
    preds: list[Prediction] = []
    missing: list[str] = []
    mm_size: dict[str, int] = {}
    for cfg in matrix.configs:
        profile = matrix.profile(cfg.profile)
        if cfg.backend != "llamacpp":
            missing.append(f"{cfg.id}: backend {cfg.backend} is not predicted")
            continue
        ref = model or cfg.model or profile.model
        if ref is None:
            missing.append(f"{cfg.id}: no model (pass --gpucap-model PATH)")
            continue
        try:
            facts = facts_for_ref(ref, matrix.models, base_dir)
        except (OSError, KeyError, ValueError) as exc:
            missing.append(f"{cfg.id}: model {ref}: {exc}")
            continue
        size = 0
        proj = mmproj or profile.mmproj
        if cfg.mmproj and not proj and ref.startswith(GENERATED_PREFIX):
            size = _generated_mmproj_bytes(ref, matrix.models)  # the plugin generates one next to the model
        elif cfg.mmproj and proj:
            key = str(proj)
            if key not in mm_size:
                try:
                    mm_size[key] = mmproj_bytes(Path(proj))
                except OSError:
                    mm_size[key] = 0
            size = mm_size[key]
        preds.append(predict(cfg, facts, size, calibration=calibration, profile=profile,
                             baseline_used_mib=(baseline_used_mib or {}).get(profile.name, 0.0)))
    return preds, missing
