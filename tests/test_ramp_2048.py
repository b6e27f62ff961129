"""The agent-connection ramp to 2,048 agents on the tiny generated model: a measurement that names its limit.

A real llama-server with 64 slots (256 tokens each, ``--metrics`` on, booted through the plugin's own
handle) gets N = 1, 2, 4, ... 2,048 agents at once, each on its own connection, one 8-token turn each,
through the harness, which records the ramp as the capacity suite does. Measured clean to 2,048 on the
2-core development host (turn p95 about 30 s), so the record should say "none up to 2,048"; on a slower
or busier host it must instead name one of the declared limits, with its evidence at the last step.
Asserted: counts, shapes and the named limit; the step figures are printed, never asserted.

    PYTHONPATH=. .venv/bin/python -m pytest tests/test_ramp_2048.py -s
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import plugin_server
from pytest_gpucap.backends import ServerHandle
from pytest_gpucap.harness import Harness
from pytest_gpucap.matrix import SLO, CapacityConfig, Workload
from pytest_gpucap.ramp_sections import LIMITS
from pytest_gpucap.records import RampRecord, parse
from pytest_gpucap.report.tables import ramp_table

SLOTS = 64
CEILING = 2048
#: Bounds, not expectations: a turn may wait this long for its slot, and a step ends by then.
SETTINGS = Workload(ramp_ceiling=CEILING, ramp_max_tokens=8, request_timeout_s=150, stall_s=120)


@pytest.fixture(scope="module")
def slots64(llama_server_bin: Path, tiny_model: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    cfg = CapacityConfig(profile="cpu", n=SLOTS, ctx=256, threads=2, cache_ram_mib=0)
    with plugin_server(llama_server_bin, tiny_model, cfg, tmp_path_factory.mktemp("ramp-logs")) as handle:
        yield handle


def test_ramp_to_2048_agents_names_its_limit(slots64: ServerHandle, restore_nofile: None) -> None:
    records: list[dict[str, Any]] = []
    lines: list[str] = []
    harness = Harness(slots64, SLO(), SETTINGS, {}, {}, "ramp-2048", records.append, lines.append, client_procs=1)
    t0 = time.monotonic()
    record = harness.ramp()
    wall = time.monotonic() - t0
    print(f"\nramp to {CEILING} on {SLOTS} slots in {wall:.0f} s")
    for line in lines:
        print("  " + line)
    assert records == [record]
    typed = parse(record)
    assert isinstance(typed, RampRecord)
    steps = typed.steps
    assert [s.n for s in steps] == [2 ** i for i in range(len(steps))], [s.n for s in steps]
    assert all(s.ok + s.errors == s.n for s in steps)
    assert typed.slots == SLOTS and typed.ceiling == CEILING and typed.client_procs == 1
    # the limit is named, with its evidence at the last step
    assert typed.limit in LIMITS and typed.limit_detail, record
    assert typed.limit_evidence is not None and typed.limit_evidence.at_n == steps[-1].n
    assert (typed.limit == "none") == (typed.max_clean_n == CEILING == steps[-1].n), record
    if typed.limit == "none":
        assert typed.limit_detail.startswith("none up to 2,048 agents"), typed.limit_detail
        assert typed.summary_line().endswith("limit: none up to 2,048")
    else:
        assert typed.summary_line().endswith(f"limit: {typed.limit} at N={steps[-1].n:,}")
    assert [c.text for c in ramp_table(typed).rows[-1]][9].endswith(
        "limit: " + ("none up to 2,048" if typed.limit == "none" else typed.limit))
    # the server's own queue was read during every step: past 64 agents, some wait for a slot
    assert all(s.metrics_polls and s.metrics_polls > 0 for s in steps)
    assert max(s.server_processing_max or 0 for s in steps) == SLOTS, [vars(s) for s in steps]
    assert any((s.server_deferred_max or 0) > 0 for s in steps if s.n > SLOTS), [vars(s) for s in steps]


