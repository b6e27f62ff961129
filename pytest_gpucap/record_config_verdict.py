"""The ``config-verdict`` record: one per config at session end, the config's capacity verdict in words.

Judged by ``capacity_verdict.config_verdict`` from every record of the config, so the terminal
summary, results.jsonl and the write-up read the same word: "fits", "fits, too slow" (memory passes,
a speed SLO fails), "does not fit" or "not measured".
"""

from __future__ import annotations

from dataclasses import dataclass

from .record_sections import RecordConfig, sub
from .records import KINDS, Record


@dataclass(frozen=True, kw_only=True)
class ConfigVerdictRecord(Record):
    """A config's verdict and the breaches (or the reason) behind it."""

    kind: str = "config-verdict"
    config: RecordConfig = sub(RecordConfig)
    verdict: str | None = None
    reasons: tuple[str, ...] = ()
    records: int | None = None  # how many records of this config were judged

    def summary_line(self) -> str:
        """The config and its verdict word: a derived record has no test outcome to show."""
        why = "; ".join(self.reasons)
        return f"{str(self.config_id):<28} {self.kind}  {self.verdict}" + (f": {why}" if why else "")


KINDS["config-verdict"] = ConfigVerdictRecord
