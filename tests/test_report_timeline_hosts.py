"""The memory-over-time chart (from the records' ``memory.timeline``) and records from two hosts shown side by side."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pytest_gpucap.record_sections import WorkloadMemory
from pytest_gpucap.records import Record
from pytest_gpucap.repeat import combine
from pytest_gpucap.report.figures import to_svg
from pytest_gpucap.report.hosts import side_by_side
from pytest_gpucap.report.render import build_context, render_report
from pytest_gpucap.report.timeline import memory_timelines
from test_report import HOST_4090, ceiling, workload, write_results

UP_AT = 1_764_000_000.0
# boot: free falls as the weights load; hold flat; a workload dips lower at t = 31 s
BOOT_TL = [{"t": 0.0, "used_mib": 3400.0, "free_mib": 20682.0}, {"t": 4.0, "used_mib": 16000.0, "free_mib": 8082.0},
           {"t": 10.0, "used_mib": 21110.0, "free_mib": 2972.0}, {"t": 12.0, "used_mib": 21100.0, "free_mib": 2982.0}]
RUN_TL = [{"t": 30.0, "used_mib": 21400.0, "free_mib": 2682.0}, {"t": 31.0, "used_mib": 21800.0, "free_mib": 2282.0},
          {"t": 40.0, "used_mib": 21500.0, "free_mib": 2582.0}]


def _server_records(host: dict[str, str] | None = None, agg: float = 132.1) -> list[Record]:
    c = ceiling(3, 65536, 21110.0, 2972.0, 10.0, host=host)
    c = replace(c, server=replace(c.server, up_at=UP_AT), memory=replace(c.memory, timeline=BOOT_TL))
    w = workload(c.config_id, 3, 65536, "A", ["TL", "Dev", "QA"], agg, 68.6, (96.0, 122.0), 2972.0, (39, 0),
                 mmproj=True)
    w = replace(w, server=replace(w.server, up_at=UP_AT), host=dict(host or HOST_4090),
                memory=WorkloadMemory(free_at_boot_mib=2972.0, min_free_mib=2282.0, timeline=RUN_TL))
    return [c, w]


def test_memory_timeline_chart_has_the_records_series_phases_and_minimum(tmp_path: Path) -> None:
    recs = _server_records()
    (chart,) = memory_timelines(recs)
    free = next(s for s in chart.series if s.name == "free")
    used = next(s for s in chart.series if s.name == "used")
    assert free.points == [(p["t"], p["free_mib"]) for p in BOOT_TL + RUN_TL]
    assert used.points == [(p["t"], p["used_mib"]) for p in BOOT_TL + RUN_TL] and used.dashed
    assert [(s.x0, s.x1, s.label) for s in chart.spans] == [(0.0, 10.0, "boot 10.0 s"), (10.0, 12.0, "load + hold"),
                                                          (30.0, 40.0, "workload A")]
    (marker,) = chart.markers
    assert (marker.x, marker.y) == (31.0, 2282.0) and "min free 2,282.0 MiB" in marker.label
    svg = to_svg(chart)
    for gid in ("series-0-free", "series-1-used", "span-boot-10.0-s", "span-load-hold", "span-workload-A",
                "marker-min-free"):
        assert f'id="{gid}' in svg, gid
    write_results(tmp_path, recs)
    render_report(tmp_path)
    md = (tmp_path / "capacity.md").read_text()
    name = f"{chart.slug}.svg"
    assert "## Memory over time" in md and f"(charts/{name})" in md and (tmp_path / "charts" / name).is_file()
    html = (tmp_path / "capacity.html").read_text()
    assert f'id="chart-{chart.slug}"' in html and 'id="memory-timeline"' in html
    assert memory_timelines([replace(r, memory=replace(r.memory, timeline=None)) for r in recs]) == []


def test_a_repeated_workload_shades_each_run() -> None:
    c, w = _server_records()
    later = [{**p, "t": p["t"] + 20.0} for p in RUN_TL]
    both = combine([w, replace(w, memory=replace(w.memory, timeline=later))])
    (chart,) = memory_timelines([c, both])
    assert [(s.x0, s.x1, s.label) for s in chart.spans[2:]] == [(30.0, 40.0, "workload A run 1"),
                                                              (50.0, 60.0, "workload A run 2")]
    assert len(next(s for s in chart.series if s.name == "free").points) == len(BOOT_TL) + 2 * len(RUN_TL)


HOST_A = {**HOST_4090, "hostname": "rig-a", "gpu_uuid": "GPU-aaaa"}
HOST_B = {**HOST_4090, "hostname": "rig-b", "gpu": "NVIDIA GeForce RTX 3090", "gpu_uuid": "GPU-bbbb"}


def test_two_hosts_group_by_host_and_put_each_config_side_by_side(tmp_path: Path) -> None:
    a = _server_records(HOST_A, agg=132.1)
    b = _server_records(HOST_B, agg=88.4)
    b[0] = replace(b[0], memory=replace(b[0].memory, free_mib=1204.0))
    table = side_by_side(a + b)
    assert table.columns == ["config", "figure", "rig-a · NVIDIA GeForce RTX 4090", "rig-b · NVIDIA GeForce RTX 3090"]
    rows = {(r[0].text, r[1].text): [c.text for c in r[2:]] for r in table.rows}
    cid = a[0].config_id
    assert rows[(cid, "free after load through hold (MiB)")] == ["2,972.0", "1,204.0"]
    assert rows[(cid, "A: aggregate tok/s")] == ["132.1", "88.4"]
    assert rows[(cid, "boot (s)")] == ["10.00", "10.00"]
    assert not side_by_side(a)  # one host: no table
    context, charts = build_context(a + b)
    titles = [m["map"].title for m in context["maps"]]
    assert len(titles) == 2 and titles[0].endswith("— rig-a · NVIDIA GeForce RTX 4090")
    assert titles[1].endswith("— rig-b · NVIDIA GeForce RTX 3090")
    words = "".join(text for text, _ in context["paragraph"])
    assert words.index("rig-a") < words.index("rig-b")
    assert {r.use_case.rsplit(" — ", 1)[1] for r in context["recommendations"]} == {
        "rig-a · NVIDIA GeForce RTX 4090", "rig-b · NVIDIA GeForce RTX 3090"}
    assert len([c for c in charts if c.slug.startswith("timeline-")]) == 2
    write_results(tmp_path, a + b)
    render_report(tmp_path)
    md = (tmp_path / "capacity.md").read_text()
    assert "## Across hosts" in md and "| config | figure | rig-a · NVIDIA GeForce RTX 4090 |" in md
    assert md.index("## Across hosts") < md.index("## Recommended configurations")
    html = (tmp_path / "capacity.html").read_text()
    assert 'id="across-hosts-table"' in html and 'id="host-filter"' in html
