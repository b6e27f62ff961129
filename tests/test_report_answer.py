"""The write-up's first screen is the answer: capacity maps, the verdict paragraph (every number in it a
recorded figure), the gate, and the charts drawn from the records.

Records come from the record constructors in ``test_report`` (the reference 4090 study's figures).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from test_report import (
    ceiling, ramp, study_records, unmeasured, with_metrics, workload, write_results,
)

from pytest_gpucap.records import SearchProbe, SearchRecord, WorkloadInfo
from pytest_gpucap.report import render_report
from pytest_gpucap.report.render import build_context, load_records

NUMBER = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)(k?)(?![\w])")


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


def untraceable(paragraph: str, results: Path) -> list[str]:
    """Numbers in ``paragraph`` that no field of any record in ``results`` holds (at the shown precision).

    Bold spans are names (config ids, profiles, workload labels), not figures; ``128k`` is 131072."""
    recorded = [n for line in results.read_text().splitlines() for n in _numbers(json.loads(line))]
    text = re.sub(r"\*\*.*?\*\*", " ", paragraph)
    bad = []
    for digits, k in NUMBER.findall(text):
        value = float(digits.replace(",", "")) * (1024 if k else 1)
        places = len(digits.split(".")[1]) if "." in digits else 0
        if not any(round(r, places) == value for r in recorded):
            bad.append(digits + k)
    return bad


def _blocks(md: str) -> list[str]:
    return [b for b in md.split("\n\n") if b.strip()]


def twins() -> list[Any]:
    """The study plus the same N × ctx measured without mmproj: the paragraph can name what dropping it frees."""
    recs = [*study_records(), ceiling(5, 65536, 21940.0, 2142.0, 15.0, mmproj=False),
            ceiling(3, 131072, 21922.0, 1160.0, 19.0, mmproj=False)]
    # The 128K run decoded at 0.16 of its bandwidth roofline: not bandwidth-bound.
    return [with_metrics(r, roofline_tps=493.1, efficiency=0.16) if r.config_id == "4090-n3-ctx128k-q8" and r.kind == "workload" else r
            for r in recs]


def test_first_table_is_the_map_and_first_paragraph_the_verdicts(tmp_path: Path) -> None:
    write_results(tmp_path, study_records())
    render_report(tmp_path)
    md = (tmp_path / "capacity.md").read_text()
    blocks = _blocks(md)
    assert blocks[0] == "# Capacity report — 4090"
    paragraph = blocks[1]
    assert paragraph.startswith("**workload A (TL, Dev, QA)** on **4090**: **4090-n3-ctx128k-q8** (N=3 × 128k) is "
                                "the pick, 132.1 tok/s. The next step up, **4090-n3-ctx200k-q8** (N=3 × 200k), is "
                                "bound by throughput and a role's p95: agg_tps 78.90 tok/s below budget 100.00 "
                                "tok/s; Dev p95 293.00 s above budget 150.00 s.")
    assert ("**memory ceiling only** on **4090**: **4090-n7-ctx32k-mmproj-q8** (N=7 × 32k) is the pick, 1,898.0 MiB "
            "free. The next step up, **4090-n5-ctx64k-mmproj-q8** (N=5 × 64k), is bound by memory: headroom 1.02 GiB "
            "below budget 1.50 GiB. Its KV cache takes 5,440.0 MiB as q8_0; q4_0 KV would roughly halve that.") \
        in paragraph
    assert blocks[2].startswith("**Gate: failed** — these config tests failed: **4090-n5-ctx64k-mmproj-q8** — "
                                "headroom 1.02 GiB")
    first_table = next(b for b in blocks if b.startswith("|"))
    assert first_table.splitlines()[0] == "| N \\\\ ctx/slot | 128k | 200k | 256k |"
    assert first_table.splitlines()[2].startswith("| N=3 | Comfortable · knee; 1,823.0 MiB free idle; 1,513.0 MiB "
                                                  "free under load; 132.1 tok/s (A) | Fits, too slow;")


def test_every_number_in_the_paragraph_is_a_recorded_figure(tmp_path: Path) -> None:
    results = write_results(tmp_path, twins())
    render_report(tmp_path)
    paragraph = _blocks((tmp_path / "capacity.md").read_text())[1]
    # The mmproj twin: the same N × ctx without the vision projector, both figures as recorded.
    assert ("The next step up, **4090-n3-ctx128k-mmproj-q8** (N=3 × 128k), is bound by memory: headroom 1.08 GiB "
            "below budget 1.50 GiB. Without mmproj the same N × ctx leaves 1,160.0 MiB free "
            "(**4090-n3-ctx128k-q8**), against 1,102.0 MiB with it.") in paragraph
    assert "It decodes at 0.16 of its bandwidth roofline: not bandwidth-bound, the study's collapse at depth." \
        in paragraph
    assert len(NUMBER.findall(re.sub(r"\*\*.*?\*\*", " ", paragraph))) >= 15
    assert untraceable(paragraph, results) == []
    # The check itself: a figure the records do not hold is caught.
    assert untraceable(paragraph + " N=3 × 128k = 384k in total, 2.35 GiB.", results) == ["384k", "2.35"]


def test_capacity_map_colours_every_verdict_and_outlines_the_knee(tmp_path: Path) -> None:
    """Comfortable / marginal / risky from the ceiling, too slow from the workload, does not fit from a failed
    boot (measured) and from the search's prediction (never booted), not measured for a skipped config."""
    search = SearchRecord(
        test="t", config_id="4090-search", profile="4090", knee="4090-n5-ctx32k-mmproj-q8", boots=3, grid_size=9,
        outcome="passed", probes=(
            SearchProbe(config_id="4090-n9-ctx128k-mmproj-q8", n=9, ctx=131072, cache_type="q8_0", mmproj=True,
                        status="predicted-no-fit", reason="predicted free -5,000 MiB"),))
    slow = workload("4090-n5-ctx32k-mmproj-q8", 5, 32768, "A", ["TL", "Dev", "QA"], 61.0, 20.0, (80.0, 120.0),
                    3154.0, (30, 0), mmproj=True)
    recs = [ceiling(3, 65536, 21110.0, 2972.0, 10.0), ceiling(5, 32768, 20928.0, 3154.0, 10.0),
            ceiling(3, 131072, 22980.0, 1102.0, 20.0), ceiling(3, 32768, 19000.0, 5000.0, 5.0), slow,
            replace(unmeasured("ceiling", "4090-n9-ctx64k", "failed", "ServerError: out of memory", "t::c"),
                    config=replace(unmeasured("ceiling", "x", "failed", "", "t").config, n=9, ctx=65536,
                                   mmproj=True)),
            replace(unmeasured("ceiling", "4090-n9-ctx32k", "skipped", "not enough RAM", "t::d"),
                    config=replace(unmeasured("ceiling", "x", "skipped", "", "t").config, n=9, ctx=32768,
                                   mmproj=True)),
            search]
    write_results(tmp_path, recs)
    written = render_report(tmp_path)
    html = (tmp_path / "capacity.html").read_text()
    grid = re.search(r'<table class="capmap">.*?</table>', html, re.S).group(0)
    cells = re.findall(r'<td class="map ([\w-]+)( knee)?" title="([^"]*)">', grid)
    by_id = {title.split(":")[0]: (verdict, bool(knee)) for verdict, knee, title in cells}
    assert by_id == {
        "4090-n3-ctx32k-mmproj-q8": ("comfortable", False), "4090-n3-ctx64k-mmproj-q8": ("marginal", False),
        "4090-n3-ctx128k-mmproj-q8": ("risky", False), "4090-n5-ctx32k-mmproj-q8": ("too-slow", True),
        "4090-n9-ctx64k": ("no-fit", False), "4090-n9-ctx32k": ("not-measured", False),
        "4090-n9-ctx128k-mmproj-q8": ("no-fit-predicted", False)}
    assert "workload A: agg_tps 61 tok/s below budget 100 tok/s" in grid  # the tooltip says why
    svg = next(p for p in written if p.name == "capacity-map-4090-q8_0-mmproj.svg").read_text()
    assert sorted(re.findall(r'<g id="cell-(\d+-\d+-[\w-]+)"', svg)) == sorted([
        "0-0-comfortable", "0-1-marginal", "0-2-risky", "1-0-too-slow-knee", "2-0-not-measured", "2-1-no-fit",
        "2-2-no-fit-predicted"])


def _series_ids(svg: str) -> list[str]:
    return re.findall(r'<g id="series-\d+-([\w.-]+)"', svg)


def test_each_chart_renders_from_the_records(tmp_path: Path) -> None:
    base = workload("4090-n3-ctx64k-q8", 3, 65536, "A", ["TL", "Dev", "QA"], 142.3, 69.7, (93.0, 114.0),
                    2972.0, (42, 0))
    rtts = [replace(with_metrics(base, agg_tps=tps), workload=WorkloadInfo(name="A", agents=["TL", "Dev", "QA"],
                                                                       rtt_s=rtt))
            for rtt, tps in ((0.0, 142.3), (0.5, 120.4), (2.0, 71.8))]
    write_results(tmp_path, [*study_records(), *rtts])
    written = {p.name: p for p in render_report(tmp_path)}
    context, charts = build_context(load_records(tmp_path / "results.jsonl"))
    assert {c.filename for c in charts} == set(written) - {"capacity.md", "capacity.html"}
    html = (tmp_path / "capacity.html").read_text()
    for chart in charts:
        svg = written[chart.filename].read_text()
        assert svg.startswith("<?xml") and "<svg" in svg and chart.title in html
        assert f'id="chart-{chart.slug}"' in html  # inlined in the HTML too
        if chart.cells:
            assert len(re.findall(r'<g id="cell-', svg)) == len(chart.cells) > 0
        else:
            shown = [s for s in chart.series if s.points]
            assert len(_series_ids(svg)) == len(shown) > 0, chart.slug
    svg = {name: p.read_text() for name, p in written.items() if name.endswith(".svg")}
    assert _series_ids(svg["tps-vs-ctx.svg"])[:2] == ["N-3-A-TL-Dev-QA-agg", "N-3-A-TL-Dev-QA-per-call"]
    assert _series_ids(svg["latency-vs-ctx.svg"])[0] == "N-3-A-TL-Dev-QA-p95"
    assert _series_ids(svg["ramp-1-4090-n6-ctx32k-q8-latency.svg"]) == ["turn-p95", "turn-p50", "TTFT-p95",
                                                                        "TTFT-p50"]
    assert 'id="marker-knee-N-4"' in svg["ramp-1-4090-n6-ctx32k-q8-latency.svg"]
    assert _series_ids(svg["ramp-1-4090-n6-ctx32k-q8-memory.svg"]) == ["server-RSS", "device-used"]
    assert 'id="marker-knee-N-4"' in svg["ramp-1-4090-n6-ctx32k-q8-memory.svg"]
    assert _series_ids(svg["tps-vs-rtt.svg"]) == ["4090-n3-ctx64k-q8-A"]
    (rtt,) = [c for c in charts if c.slug == "tps-vs-rtt"]
    (even,) = rtt.markers  # 120.4 tok/s at 0.5 s, 71.8 at 2 s: through the 100 tok/s budget at 0.5 + 20.4/48.6 × 1.5 s
    assert even.x == pytest.approx(0.5 + 20.4 / 48.6 * 1.5) and even.y == 100.0
    assert even.label.startswith("break-even 1,130 ms") and 'id="marker-break-even-1-130-ms' in svg["tps-vs-rtt.svg"]
    assert _series_ids(svg["memory-vs-total-ctx.svg"]) == ["4090-q8_0-mmproj-used", "4090-q8_0-mmproj-server-buffers"]
    md = (tmp_path / "capacity.md").read_text()
    assert [c.filename for c in charts if f"](charts/{c.filename})" not in md] == []


def test_without_records_for_a_chart_it_is_not_drawn(tmp_path: Path) -> None:
    write_results(tmp_path, [ceiling(3, 65536, 21110.0, 2972.0, 10.0), ramp()])
    names = {p.name for p in render_report(tmp_path)}
    assert "tps-vs-ctx.svg" not in names and "tps-vs-rtt.svg" not in names
    assert {"capacity-map-4090-q8_0-mmproj.svg", "ramp-1-4090-n6-ctx32k-q8-latency.svg"} <= names
