"""Ceiling records as calibration samples: the records layer reads the records, the prediction layer
(below it) learns from the plain :class:`~pytest_gpucap.prediction.CalibrationSample` s it is given.

``calibrate_from(records)`` is the entry point for a list of record dicts (results.jsonl, the
session's records, a search's ``Outcome.record`` s).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .matrix import CapacityConfig
from .prediction import Calibration, CalibrationSample, calibrate
from .record_sections import is_number
from .records import CeilingRecord, Record, parse


def config_of(record: CeilingRecord) -> CapacityConfig | None:
    """The ``CapacityConfig`` a record measured (None when its config cannot be rebuilt)."""
    c = record.config.to_dict()
    c["extra_args"] = tuple(c.get("extra_args") or ())
    c["env"] = tuple(tuple(x) for x in (c.get("env") or ()))
    try:
        return CapacityConfig(**c)
    except TypeError:  # no config recorded, or keys this version does not know
        return None


def sample(record: Record | Mapping[str, Any]) -> CalibrationSample | None:
    """The calibration sample of a ceiling record (a dict or typed); None for any other record.

    A dict without ``kind`` is read as a ceiling. The sample of a ceiling without a measurement or a
    server report is still made; the calibration leaves it out (``CalibrationSample.parts`` is None).
    """
    if isinstance(record, Mapping):
        record = parse(record if "kind" in record else {**record, "kind": "ceiling"})
    if not isinstance(record, CeilingRecord):
        return None
    config = config_of(record)
    if config is None:
        return None
    mem = record.memory
    rep = mem.server_report
    lines = [line.get("size_mib") for line in rep.kv_lines or () if isinstance(line, Mapping)]
    return CalibrationSample(
        config=config, profile=record.profile or config.profile, probe=mem.probe or "host",
        used_after_load_mib=mem.used_after_load_mib, baseline_used_mib=mem.baseline_used_mib,
        reported=bool(rep.to_dict()), model_mib=rep.model_mib, compute_mib=rep.compute_mib,
        output_mib=rep.output_mib, kv_mib=rep.kv_mib, kv_line_mib=tuple(float(x) for x in lines if is_number(x)),
        free_after_load_mib=mem.free_after_load_mib, model_path=record.server.model)


def samples(records: Iterable[Record | Mapping[str, Any]]) -> list[CalibrationSample]:
    """The samples of the ceiling records among ``records``."""
    return [s for s in map(sample, records) if s is not None]


def calibrate_from(records: Iterable[Record | Mapping[str, Any]], facts: Any = None) -> Calibration:
    """Each profile's corrections learned from the ceiling records among ``records`` (dicts or typed;
    see ``prediction.calibrate`` for ``facts``)."""
    return calibrate(samples(records), facts)


__all__ = ["calibrate_from", "config_of", "sample", "samples"]
