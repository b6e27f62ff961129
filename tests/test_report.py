"""The capacity write-up: rendered from saved records only, numbers equal to the records, hostile
strings escaped, torn files still renderable, the CLI, and the HTML checked in real headless Chromium.

Record fixtures are built through the record constructors the plugin writes with (``records``) and
judged by ``verdicts``, so they cannot drift from the schema: the reference 4090 study's Phase-1 and
Phase-2 figures, a ramp, and the checks sections (memory prediction, client/server cross-check,
roofline, vLLM headroom and queueing) with the sections ``prediction``, the harness and the vLLM
backend fill in, plus the records of configs that were never measured.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pytest_gpucap import records
from pytest_gpucap.matrix import SLO, CapacityConfig
from pytest_gpucap.records import (
    CeilingMemory, CeilingRecord, Crosscheck, Goodput, KvHeadroom, Percentiles, Predicted, PredictionCheck,
    QueueTimes, RampRecord, RampStep, Record, RecordConfig, RoleMetrics, SearchProbe, SearchRecord, ServerBuffers,
    ServerInfo, ServerView, SloBudgets, WorkloadInfo, WorkloadMemory, WorkloadMetrics, WorkloadRecord,
)
from pytest_gpucap.record_calibration import sample
from pytest_gpucap.report import ReportError, render_report
from pytest_gpucap.verdicts import Verdict, ceiling_verdicts, headroom_class

HOSTILE = "<script>alert(1)</script>"
MODEL = "/models/gemma4-26b-a4b-q4.gguf"
HOST_4090 = {"device": "cuda", "gpu": "NVIDIA GeForce RTX 4090", "driver": "570.86.15", "gpu_index": "0",
             "gpu_total_gib": "24.0", "python": "3.11.7"}
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- record fixtures

#: The budgets the workload fixtures are judged against (their verdicts say agg TPS ≥ 100, Dev p95 ≤ 150 s).
WORKLOAD_SLO = SLO(headroom_gib=0.4, p95_s=(("Dev", 150.0),), min_agg_tps=100.0)


def _server(cfg: CapacityConfig, model: str = MODEL, argv_extra: tuple[str, ...] = ()) -> ServerInfo:
    """The server section ``records.header`` writes for a llama-server booted for ``cfg``."""
    argv = ["/opt/llama.cpp/build/bin/llama-server", "--model", model, "--host", "127.0.0.1", "--port", "41001",
            "--parallel", str(cfg.n), "--ctx-size", str(cfg.n * cfg.ctx), "--cache-type-k", "q8_0",
            "--cache-type-v", "q8_0", "--flash-attn", "on", "--threads", "16", *argv_extra]
    return ServerInfo(backend="llamacpp", binary=argv[0], version="version: 9500 (b9500)", argv=argv,
                      url="http://127.0.0.1:41001", model=model, total_slots=cfg.n, n_ctx_slot=cfg.ctx)


def ceiling(n: int, ctx: int, used: float, free: float, boot: float, *, mmproj: bool = True,
            name: str | None = None, model: str = MODEL, argv_extra: tuple[str, ...] = (),
            outcome: str = "passed", host: dict[str, str] | None = None, predicted: float | None = None,
            slo: SLO = SLO(headroom_gib=1.5)) -> CeilingRecord:
    """A ceiling record as ``ceiling.build_ceiling`` builds it (then ``outcome``, as the recorder adds it)."""
    cfg = CapacityConfig(profile="4090", n=n, ctx=ctx, mmproj=mmproj, cache_type_k="q8_0", cache_type_v="q8_0",
                         flash_attn="on", threads=16, name=name)
    kv_mib = n * ctx / 1024 * 17.0
    memory = CeilingMemory(
        probe="nvml", device_total_mib=24082.0, baseline_used_mib=3400.0, used_after_load_mib=used,
        free_after_load_mib=free + 12.5, free_mib=free, peak_used_mib=used + 12.5, server_rss_mib=2311.4,
        host_available_min_mib=14336.0, samples=11,
        server_report=ServerBuffers(
            kv_mib=kv_mib, model_mib={"CUDA0": 12970.0, "CPU": 525.0}, kv_buffer_mib={"CUDA0": kv_mib},
            compute_mib={"CUDA0": 522.0, "CUDA0_Host": 40.0}, output_mib={"CPU": 3.9}, kv_lines=[],
            extra={"breakdown": [], "prompt_cache_limit_mib": 8192, "n_slots": n, "n_ctx_slot": ctx}),
        kv_per_slot_mib=kv_mib / n, predicted_kv_per_slot_mib=predicted,
    )
    return CeilingRecord(
        test=f"capacity_tests/test_ceiling.py::test_ceiling[{cfg.id}]", config_id=cfg.id,
        config=RecordConfig.of(cfg), profile="4090", host=dict(host or HOST_4090),
        server=_server(cfg, model, argv_extra), boot_s=boot, memory=memory,
        slo=SloBudgets(headroom_gib=slo.headroom_gib), verdicts=tuple(ceiling_verdicts(free, slo, None, n)),
        headroom_class=headroom_class(free / 1024, slo), outcome=outcome)


def workload(cfg_id: str, n: int, ctx: int, name: str, agents: list[str], agg: float, per_call: float,
             dev: tuple[float | None, float | None], free_at_boot: float, turns: tuple[int, int],
             mmproj: bool = False, e2e_p95: float | None = None) -> WorkloadRecord:
    """A workload record as the harness builds it, with verdicts: agg TPS ≥ 100, Dev p95 ≤ 150 s, min free ≥ 0.4 GiB."""
    cfg = CapacityConfig(profile="4090", n=n, ctx=ctx, mmproj=mmproj, cache_type_k="q8_0", cache_type_v="q8_0")
    min_free = free_at_boot - 310.0
    roles: dict[str, RoleMetrics] = {}
    for role in dict.fromkeys(agents):
        roles[role] = RoleMetrics(p50_s=None, p95_s=None, turns_ok=4, turns_failed=0, tps=per_call)
    if "Dev" in roles:
        roles["Dev"] = replace(roles["Dev"], p50_s=dev[0], p95_s=dev[1], turns_ok=turns[0] // 3,
                               turns_failed=turns[1])
    verdicts = [Verdict("agg_tps", agg, 100.0, "tok/s"), Verdict("headroom_min", min_free / 1024, 0.4, "GiB")]
    if dev[1] is not None:
        verdicts.append(Verdict("Dev p95", dev[1], 150.0, "s", higher_is_better=False))
    elif "Dev" in roles:
        verdicts.append(Verdict("Dev turns ok", 0, 1, "turns"))
    ok = all(v.ok for v in verdicts)
    metrics = WorkloadMetrics(
        agg_tps=agg, per_call_tps=per_call, ttft_s=Percentiles(p50=0.41, p95=1.37, p99=2.05),
        e2e_s=Percentiles(p50=(dev[0] or 30.0) * 0.8, p95=e2e_p95 or (dev[1] or 60.0), p99=300.0),
        roles=roles, turns_ok=turns[0], turns_failed=turns[1], errors={"timeout": turns[1]} if turns[1] else {})
    return WorkloadRecord(
        test=f"capacity_tests/test_workload.py::test_workload[{cfg_id}]", config_id=cfg_id,
        config=RecordConfig.of(cfg), profile="4090", host=dict(HOST_4090), server=_server(cfg), boot_s=10.0,
        workload=WorkloadInfo(name=name, agents=agents, duration_s=600.0), metrics=metrics,
        memory=WorkloadMemory(free_at_boot_mib=free_at_boot, min_free_mib=min_free),
        slo=SloBudgets.of(WORKLOAD_SLO), verdicts=tuple(verdicts), outcome="passed" if ok else "failed")


def with_metrics(rec: WorkloadRecord, **changes: Any) -> WorkloadRecord:
    return replace(rec, metrics=replace(rec.metrics, **changes))


def ramp() -> RampRecord:
    cfg = CapacityConfig(profile="4090", n=6, ctx=32768, cache_type_k="q8_0", cache_type_v="q8_0")
    steps = []
    for n, (p50, p95, rss, used, errors) in enumerate(
            [(8.2, 9.9, 2301.0, 19012.0, 0), (9.1, 11.4, 2312.5, 19140.0, 0), (10.3, 13.8, 2330.0, 19260.0, 0),
             (14.9, 21.7, 2351.0, 19410.0, 0), (19.6, 33.2, 2372.2, 19555.0, 0), (41.0, 97.5, 2398.0, 19701.0, 2)],
            start=1):
        steps.append(RampStep(n=n, ok=12 * n - errors, errors=errors, ttft_p50_s=0.3 * n, ttft_p95_s=0.55 * n,
                              turn_p50_s=p50, turn_p95_s=p95, server_rss_mib=rss, device_used_mib=used))
    return RampRecord(
        test=f"capacity_tests/test_workload.py::test_agent_connection_ramp[{cfg.id}]", config_id=cfg.id,
        config=RecordConfig.of(cfg), profile="4090", host=dict(HOST_4090), server=_server(cfg), boot_s=6.0,
        steps=tuple(steps), max_clean_n=5, knee_n=4, ceiling=6, slo=SloBudgets.of(WORKLOAD_SLO), outcome="passed")


def study_records() -> list[Record]:
    """The reference study's Phase 1 and Phase 2 figures, as records."""
    return [
        ceiling(3, 131072, 22980.0, 1102.0, 20.0),
        ceiling(3, 65536, 21110.0, 2972.0, 10.0, predicted=1024.0),
        ceiling(5, 65536, 23038.0, 1044.0, 15.0, outcome="failed"),
        ceiling(5, 32768, 20928.0, 3154.0, 10.0),
        ceiling(7, 32768, 22184.0, 1898.0, 6.0),
        workload("4090-n3-ctx64k-mmproj-q8", 3, 65536, "A", ["TL", "Dev", "QA"], 142.3, 69.7, (93.0, 114.0),
                 2972.0, (42, 0), mmproj=True),
        workload("4090-n3-ctx64k-mmproj-q8", 3, 65536, "B", ["Research"] * 3, 180.2, 58.7, (None, None),
                 2972.0, (61, 0), mmproj=True, e2e_p95=88.5),
        workload("4090-n3-ctx128k-q8", 3, 131072, "A", ["TL", "Dev", "QA"], 132.1, 68.6, (96.0, 122.0),
                 1823.0, (39, 0)),
        workload("4090-n3-ctx200k-q8", 3, 204800, "A", ["TL", "Dev", "QA"], 78.9, 29.2, (293.0, 293.0),
                 971.0, (12, 1)),
        workload("4090-n3-ctx256k-q8", 3, 262144, "A", ["TL", "Dev", "QA"], 10.5, 10.1, (None, None),
                 1077.0, (3, 2)),
        ramp(),
    ]


def write_results(directory: Path, recs: list[Record]) -> Path:
    for r in recs:
        records.append_jsonl(directory / "results.jsonl", r)
    return directory / "results.jsonl"


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    write_results(tmp_path, study_records())
    (tmp_path / "session.json").write_text(json.dumps({
        "command": "pytest capacity_tests -m 4090 --gpucap-report reports/",
        "versions": {"pytest-gpucap": "0.1.0", "pytest": "9.2.0", "llama-server": "b9500"},
        "git": "e1d1589c0ffee"}))
    return tmp_path


def _section(md: str, heading: str) -> str:
    """The Markdown from ``heading`` to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    body = md.split(heading + "\n", 1)[1]
    return re.split(rf"^#{{1,{len(level)}}} ", body, maxsplit=1, flags=re.M)[0]


def _rows(md: str, first_cell: str) -> list[list[str]]:
    """Markdown table rows whose first cell is ``first_cell``, split into cells."""
    out = []
    for line in md.splitlines():
        if line.startswith(f"| {first_cell} |"):
            out.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return out


# ---------------------------------------------------------------- content

def test_markdown_tables_equal_the_records(study_dir: Path) -> None:
    written = render_report(study_dir)
    md = (study_dir / "capacity.md").read_text()
    assert written[:2] == [study_dir / "capacity.md", study_dir / "capacity.html"]
    assert {p.name for p in written[2:]} >= {"memory-vs-total-ctx.svg", "tps-vs-ctx.svg", "latency-vs-ctx.svg"}
    assert all(p.is_file() for p in written)

    # Phase 1 ceiling: every figure of the N3 ctx128K row, in order, with its verdict word.
    phase1 = _section(md, "## Phase 1 — memory ceiling")
    ceiling_md, kv_md = phase1.split("### Per-slot KV cost")
    row = _rows(ceiling_md, "4090-n3-ctx128k-mmproj-q8")[0]
    assert row == ["4090-n3-ctx128k-mmproj-q8", "3", "131,072", "393,216", "22,980.0", "1,102.0", "—", "20.00", "1.50",
                   "Risky", "passed"]  # no burst in these records: "free under burst" is a dash
    assert _rows(ceiling_md, "4090-n3-ctx64k-mmproj-q8")[0][4:10] == ["21,110.0", "2,972.0", "—", "10.00", "1.50",
                                                                     "Marginal"]
    assert _rows(ceiling_md, "4090-n5-ctx32k-mmproj-q8")[0][9] == "Comfortable"
    assert _rows(ceiling_md, "4090-n5-ctx64k-mmproj-q8")[0][10] == "failed"
    assert "Comfortable ≥ 2× the headroom SLO, Marginal ≥ the SLO, Risky below" in md
    assert "SLO 1.50 GiB — Comfortable ≥ 3.00 GiB free" in md

    # Per-slot KV: theoretical (when recorded), server-reported, measured (NVML), server breakdown.
    kv = _rows(kv_md, "4090-n3-ctx64k-mmproj-q8")[0]
    measured = (21110.0 - 3400.0 - 12970.0 - 522.0) / 3
    assert kv[4:8] == ["1,024.0", "1,088.0", f"{measured:,.1f}", f"{measured - 1088.0:,.1f}"]
    assert kv[8] == "13,495.0 (CPU 525.0 + CUDA0 12,970.0)"
    assert _rows(kv_md, "4090-n3-ctx128k-mmproj-q8")[0][4] == "—"

    # Phase 2 workload: the reference's columns.
    phase2 = _section(md, "## Phase 2 — workload")
    wl = _rows(phase2, "4090-n3-ctx128k-q8")[0]
    # Roofline and efficiency are "—": these records carry no roofline (no prediction was made)
    assert wl == ["4090-n3-ctx128k-q8", "3", "131,072", "A (TL, Dev, QA)", "132.1", "—", "—", "68.6", "96.00",
                  "122.00", "122.00", "1.37", "1,823.0", "1,513.0", "39 / 0", "passed"]
    assert "B (3×Research)" in md and "180.2" in md
    assert _rows(phase2, "4090-n3-ctx200k-q8")[0][14:] == ["12 / 1 (timeout 1)", "failed"]
    verdicts = _rows(_section(md, "### SLO verdicts"), "4090-n3-ctx200k-q8")
    assert verdicts[0] == ["4090-n3-ctx200k-q8", "A", "agg_tps", "78.90", "≥ 100.00", "-21.10", "tok/s", "BREACH"]
    assert verdicts[2] == ["4090-n3-ctx200k-q8", "A", "Dev p95", "293.00", "≤ 150.00", "-143.00", "s", "BREACH"]

    # Ramp table and its markers.
    ramp_rows = _rows(_section(md, "## Ramp"), "4")
    assert ramp_rows[0][5:9] == ["14.90", "21.70", "2,351.0", "19,410.0"] and ramp_rows[0][9] == "knee"
    assert "Max clean N: **5**; knee at N = **4**" in md

    # Scaling at fixed N: the reference's "N=3 Workflow A" curve, ordered by ctx.
    assert "Scaling at fixed N: N=3, workload A (TL, Dev, QA), profile 4090" in md
    curve = [r[0] for r in _rows(md, "64k") + _rows(md, "128k") + _rows(md, "200k") + _rows(md, "256k")]
    assert curve == ["64k", "128k", "200k", "256k"]
    assert _rows(md, "256k")[0][6] == f"{(10.5 / 142.3 - 1) * 100:+.1f}%"

    # Charts next to the Markdown.
    for name in ("memory-vs-total-ctx", "tps-vs-ctx", "latency-vs-ctx", "ramp-1-4090-n6-ctx32k-q8-latency"):
        assert f"](charts/{name}.svg)" in md


def test_recommendations_pick_largest_passing_config(study_dir: Path) -> None:
    """One ranked table per use case, largest first: the pick, what passes, and each other row's breach."""
    render_report(study_dir)
    md = (study_dir / "capacity.md").read_text()
    wl_a = _section(md, "### Workload A (TL, Dev, QA) (profile 4090)")
    assert "**Pick: 4090-n3-ctx128k-q8** (N=3 × 128k = 384k)" in wl_a
    assert [r[1] for r in _ranked(wl_a)] == ["4090-n3-ctx256k-q8", "4090-n3-ctx200k-q8", "4090-n3-ctx128k-q8",
                                            "4090-n3-ctx64k-mmproj-q8"]
    assert re.search(r"\| 4090-n3-ctx256k-q8 \| 3 \| 256k \| 10\.5 \| agg_tps 10\.50 tok/s below budget "
                     r"100\.00 tok/s;.*Dev turns ok", wl_a)
    assert "| 2 | 4090-n3-ctx200k-q8 | 3 | 200k | 78.9 | agg_tps 78.90 tok/s below budget 100.00 tok/s; " \
           "Dev p95 293.00 s above budget 150.00 s |" in wl_a
    assert "| 3 | 4090-n3-ctx128k-q8 | 3 | 128k | 132.1 | pick |" in wl_a
    assert "| 4 | 4090-n3-ctx64k-mmproj-q8 | 3 | 64k | 142.3 | passes |" in wl_a
    assert "smaller than the pick" not in md
    ceiling_only = _section(md, "### Memory ceiling only (profile 4090)")
    # N5 ctx64K is the largest but failed; N3 ctx128K and N7 ctx32K are Risky/Marginal: Risky fails the SLO.
    assert "**Pick: 4090-n7-ctx32k-mmproj-q8** (N=7 × 32k = 224k)" in ceiling_only
    assert "| 1 | 4090-n3-ctx128k-mmproj-q8 | 3 | 128k | 1,102.0 | headroom 1.08 GiB below budget 1.50 GiB |" \
        in ceiling_only
    assert "| 2 | 4090-n5-ctx64k-mmproj-q8 | 5 | 64k | 1,044.0 | headroom 1.02 GiB below budget 1.50 GiB |" \
        in ceiling_only


def _ranked(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in md.splitlines()
            if re.match(r"\| \d+ \| ", line)]


def test_environment_and_reproduction(study_dir: Path) -> None:
    render_report(study_dir)
    md = (study_dir / "capacity.md").read_text()
    assert "```text\npytest capacity_tests -m 4090 --gpucap-report reports/\n```" in md
    assert "Git revision: e1d1589c0ffee" in md
    assert "| pytest-gpucap | 0.1.0 |" in md
    assert "gpu NVIDIA GeForce RTX 4090" in md and "driver 570.86.15" in md
    assert "--parallel 3 --ctx-size 393216" in md
    (study_dir / "session.json").unlink()
    render_report(study_dir)
    assert "session.json not found" in (study_dir / "capacity.md").read_text()


def test_html_has_the_same_cells(study_dir: Path) -> None:
    render_report(study_dir)
    html = (study_dir / "capacity.html").read_text()
    assert "<td>4090-n3-ctx128k-mmproj-q8</td>" in html
    assert ('<td class="num">22,980.0</td><td class="num">1,102.0</td><td class="num">—</td>'
            '<td class="num">20.00</td>') in html
    assert '<td class="bad">Risky</td>' in html and '<td class="ok">Comfortable</td>' in html
    assert html.count('<svg class="chart"') == 7  # two capacity maps, memory, tps, latency, ramp ×2
    assert external_resources(html) == []  # nothing to fetch: self-contained
    assert "<link" not in html and "<script src" not in html and html.count("<script>") == 1


#: Anything that would make a browser fetch: src/href/action/srcset attributes, CSS url() and @import.
RESOURCE = re.compile(r"""(?:\b(?:src|href|action|srcset|data|poster)\s*=\s*["']?|url\(\s*["']?|@import\s+["']?)"""
                      r"""\s*((?:https?:)?//[^"')\s>]+)""", re.I)


def external_resources(html: str) -> list[str]:
    """The http(s):// (or protocol-relative) resources a page references; text that merely names a URL
    (a server's --host in a command line, an SVG namespace) is not a resource."""
    return RESOURCE.findall(html)


def test_external_resource_check_catches_references() -> None:
    assert external_resources('<img src="https://x.test/a.png"><style>b{background:url(//cdn.test/i)}</style>'
                              '<link href="http://x.test/s.css">') == ["https://x.test/a.png", "//cdn.test/i",
                                                                       "http://x.test/s.css"]
    assert external_resources('<svg xmlns="http://www.w3.org/2000/svg"></svg><pre>http://127.0.0.1:1</pre>') == []


def test_ceiling_only_run_renders_no_workload_note(tmp_path: Path) -> None:
    write_results(tmp_path, [ceiling(3, 65536, 21110.0, 2972.0, 10.0)])
    render_report(tmp_path)
    md = (tmp_path / "capacity.md").read_text()
    assert "No workload records" in md and "No ramp records." in md
    assert "**Pick: 4090-n3-ctx64k-mmproj-q8**" in md
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == ["capacity-map-4090-q8_0-mmproj.svg",
                                                                         "memory-vs-total-ctx.svg"]


def test_hostile_strings_render_escaped(tmp_path: Path) -> None:
    evil = ceiling(2, 8192, 5000.0, 4000.0, 1.5, name=f"n2 {HOSTILE} a|b`[link](javascript:alert(1))",
                   model=f"/m/{HOSTILE}.gguf", argv_extra=("--alias", HOSTILE, "--x", "a`b"),
                   host={**HOST_4090, "gpu": '<img src=x onerror="alert(2)">'})
    wl = workload(f"n2 {HOSTILE}", 2, 8192, HOSTILE, ["Dev", HOSTILE], 120.0, 60.0, (10.0, 20.0), 4000.0, (9, 0))
    evil = replace(evil, reason=f"log line: {HOSTILE}")
    write_results(tmp_path, [evil, wl, replace(ramp(), config_id=HOSTILE)])
    (tmp_path / "session.json").write_text(json.dumps({"command": f"pytest -k '{HOSTILE}' ```", "git": HOSTILE}))
    written = render_report(tmp_path)
    html = (tmp_path / "capacity.html").read_text()
    assert HOSTILE not in html and html.count("<script") == 1 and "<img" not in html  # only the page's own script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in html
    md = (tmp_path / "capacity.md").read_text()
    outside_code = re.sub(r"(`{3,})text\n.*?\n\1", "", md, flags=re.S)
    assert "<script" not in outside_code and "<img" not in outside_code
    assert "&lt;script&gt;" in outside_code
    assert "a\\|b\\`\\[link\\](javascript" in outside_code  # no table break, code span or link
    assert "````text\npytest -k '<script>alert(1)</script>' ```\n````" in md  # fence longer than the data's
    svgs = {p.name: p.read_text() for p in written[2:]}
    assert not [name for name, text in svgs.items() if "<script" in text]
    # the ceiling's GPU name differs from the workload's: two hosts, one map each (the workload's host holds the label)
    assert [name for name, text in svgs.items() if "&lt;script&gt;" in text] == [
        "capacity-map-4090-q8_0-text-NVIDIA-GeForce-RTX-4090.svg",
        "tps-vs-ctx.svg", "latency-vs-ctx.svg", "ramp-1-script-alert-1-script-latency.svg",
        "ramp-1-script-alert-1-script-memory.svg"]


def test_truncated_last_line_still_renders(tmp_path: Path) -> None:
    path = write_results(tmp_path, study_records()[:3])
    with open(path, "a") as fh:
        fh.write(json.dumps(ceiling(7, 32768, 22184.0, 1898.0, 6.0).to_dict())[:150])  # crash mid-write
    render_report(tmp_path)
    md = (tmp_path / "capacity.md").read_text()
    assert "Rendered from 3 records" in md
    assert "4090-n5-ctx64k-mmproj-q8" in md and "4090-n7-ctx32k" not in md


def test_missing_or_empty_results_raise(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no such file"):
        render_report(tmp_path)
    (tmp_path / "results.jsonl").write_text('{"kind": "ceil')
    with pytest.raises(ReportError, match="no result records"):
        render_report(tmp_path)


def test_rerender_is_stable_and_drops_stale_charts(study_dir: Path) -> None:
    render_report(study_dir)
    first = (study_dir / "capacity.html").read_text()
    (study_dir / "charts" / "stale.svg").write_text("<svg/>")
    render_report(study_dir)
    assert (study_dir / "capacity.html").read_text() == first
    assert not (study_dir / "charts" / "stale.svg").exists()


# ---------------------------------------------------------------- CLI

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_gpucap", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_cli_report(study_dir: Path) -> None:
    (study_dir / "capacity.md").write_text("old")
    proc = _cli("report", str(study_dir))
    assert proc.returncode == 0, proc.stderr
    assert str(study_dir / "capacity.html") in proc.stdout
    assert (study_dir / "capacity.md").read_text().startswith("# Capacity report — 4090")


def test_cli_report_errors(tmp_path: Path) -> None:
    proc = _cli("report", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "results.jsonl: no such file" in proc.stderr
    (tmp_path / "results.jsonl").write_text("")
    proc = _cli("report", str(tmp_path))
    assert proc.returncode == 2 and "no result records" in proc.stderr and "Traceback" not in proc.stderr
    assert _cli("report").returncode == 2


def test_cli_usage_and_genmodel_still_listed() -> None:
    proc = _cli()
    assert proc.returncode == 2
    assert all(cmd in proc.stdout for cmd in ("genmodel", "report", "compare"))
    assert _cli("--help").returncode == 0
    proc = _cli("genmodel", "--help")
    assert proc.returncode == 0 and "--layers" in proc.stdout


# ---------------------------------------------------------------- real browser

def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("GPUCAP_REQUIRE_BROWSER"):
            pytest.fail("chromium required (GPUCAP_REQUIRE_BROWSER=1): apt-get install -y chromium")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return found


def _run_chromium(binary: str, profile: Path, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1280,2000",
           *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _page_errors(stderr: str) -> list[str]:
    """Lines where the page itself logged to the console or threw (Chromium's own dbus noise is not the page)."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def test_html_in_headless_chromium(study_dir: Path, tmp_path: Path) -> None:
    binary = _chromium()
    render_report(study_dir)
    page = study_dir / "capacity.html"
    shot = tmp_path / "capacity.png"
    proc = _run_chromium(binary, tmp_path / "profile-shot", page, f"--screenshot={shot}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert _page_errors(proc.stderr) == []

    dom = _run_chromium(binary, tmp_path / "profile-dom", page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _page_errors(dom.stderr) == []
    out = dom.stdout
    assert 'id="ceiling-table"' in out and 'id="workload-table"' in out
    assert '<td class="num">22,980.0</td><td class="num">1,102.0</td>' in out
    assert '<td class="bad">Risky</td>' in out
    assert '<strong class="pick-id">4090-n3-ctx128k-q8</strong>' in out
    assert len(re.findall(r'<svg[^>]*class="chart"', out)) == 7
    assert len(re.findall(r'<g id="series-', out)) >= 14 and len(re.findall(r'<g id="cell-', out)) == 8
    if os.environ.get("GPUCAP_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["GPUCAP_KEEP_SCREENSHOT"])


def test_console_error_detection_works(tmp_path: Path) -> None:
    """Guard for the check above: a page that throws must be caught by ``_page_errors``."""
    binary = _chromium()
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('gpucap-probe'); "
                    "throw new Error('boom')</script></body></html>")
    proc = _run_chromium(binary, tmp_path / "profile", page, "--dump-dom")
    errors = _page_errors(proc.stderr)
    assert any("gpucap-probe" in e for e in errors) and any("Uncaught" in e for e in errors), proc.stderr[-2000:]


def test_step_summary_is_the_map_and_the_verdicts(study_dir: Path) -> None:
    """$GITHUB_STEP_SUMMARY gets the answer only: verdict paragraph, gate, capacity maps; no images, no detail."""
    from pytest_gpucap.report import render_summary

    text = render_summary(study_dir)
    paragraph = text.split("\n\n")[1]
    assert "**4090-n3-ctx128k-q8** (N=3 × 128k) is the pick, 132.1 tok/s" in paragraph
    assert "**Gate: failed**" in text
    assert "| N=3 | — | Marginal; 2,972.0 MiB free idle; 2,662.0 MiB free under load; 142.3 tok/s (A); " \
           "180.2 tok/s (B) | Risky; 1,102.0 MiB free idle |" in text
    assert "](charts/" not in text and "## Environment" not in text and "## Phase 1" not in text
    assert not (study_dir / "capacity.md").exists()  # nothing written


def test_search_record_renders_every_probe(tmp_path: Path) -> None:
    search = SearchRecord(
        test="t", config_id="4090-search", profile="4090", knee="4090-n5-ctx32k-mmproj-q8", boots=2, grid_size=4,
        boot_fraction=0.5, known_used=0, assumption="monotone in N and ctx", seconds=1.0, outcome="passed",
        probes=(SearchProbe(config_id="4090-n5-ctx32k-mmproj-q8", n=5, ctx=32768, cache_type="q8_0", mmproj=True,
                            status="booted-pass", reason="free 3154 MiB (Comfortable)", boot_order=1,
                            predicted_free_mib=3100.0),
                SearchProbe(config_id="4090-n7-ctx64k-mmproj-q8", n=7, ctx=65536, cache_type="q8_0", mmproj=True,
                            status="predicted-no-fit", reason="predicted not to fit: <b>x</b>", boot_order=None,
                            predicted_free_mib=-900.0)))
    write_results(tmp_path, [ceiling(5, 32768, 20928.0, 3154.0, 10.0), search])
    render_report(tmp_path)
    md = (tmp_path / "capacity.md").read_text()
    section = _section(md, "## Capacity search — profile 4090")
    assert "Knee: **4090-n5-ctx32k-mmproj-q8**, found with 2 boots of a 4-config grid" in section
    assert _rows(section, "4090-n7-ctx64k-mmproj-q8")[0][4:6] == ["predicted-no-fit", "-900.0"]
    html = (tmp_path / "capacity.html").read_text()
    assert "Capacity search — profile 4090" in html and "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html
    assert "Records of other kinds" not in md


# ---------------------------------------------------------------- checks: prediction, cross-check, roofline, vLLM

def with_prediction(rec: CeilingRecord, measured_over: float, kv_server_extra_mib: float = 0.0) -> CeilingRecord:
    """Attach a real memory-model prediction as ``ceiling.build_ceiling`` does, with the server's buffers
    equal to the prediction (KV lines off by ``kv_server_extra_mib``) and the meter ``measured_over`` × it."""
    from pytest_gpucap import prediction
    from pytest_gpucap.modelgen import ModelShape

    config = rec.config.to_dict()
    cfg = CapacityConfig(**{**config, "extra_args": tuple(config["extra_args"]), "env": tuple(config["env"])})
    facts = prediction.facts_from_shape(ModelShape(n_layer=4, n_embd=512, n_head=8, n_head_kv=2))
    pred = prediction.predict(cfg, facts)
    kv = pred.kv_mib + kv_server_extra_mib
    mem = replace(rec.memory, server_report=replace(
        rec.memory.server_report, kv_mib=kv, kv_buffer_mib={"CUDA0": kv}, model_mib={"CUDA0": pred.weights_mib},
        compute_mib={"CUDA0": pred.compute_counted_mib}, output_mib={}, kv_lines=[{"size_mib": kv}]),
        used_after_load_mib=round(rec.memory.baseline_used_mib + pred.total_mib * measured_over, 1))
    predicted = pred.as_dict()
    error = prediction.prediction_error(pred, sample(replace(rec, memory=mem)))
    return replace(rec, memory=replace(mem, predicted=Predicted.from_dict(predicted),
                                       predicted_kv_per_slot_mib=predicted["kv_per_slot_mib"],
                                       prediction_error=PredictionCheck.from_dict(error)))


def test_memory_prediction_table_per_config(tmp_path: Path) -> None:
    exact = with_prediction(ceiling(2, 8192, 0.0, 20000.0, 1.0, mmproj=False), 1.03)
    off = with_prediction(ceiling(4, 8192, 0.0, 20000.0, 1.0, mmproj=False), 0.9, kv_server_extra_mib=2.0)
    plain = ceiling(3, 65536, 21110.0, 2972.0, 10.0)  # no prediction: not in the table
    write_results(tmp_path, [exact, off, plain])
    render_report(tmp_path)
    md = (tmp_path / "capacity.md").read_text()
    section = _section(md, "### Memory prediction")
    err = exact.to_dict()["memory"]["prediction_error"]
    row = _rows(section, exact.config_id)[0]
    assert row[3:11] == [f"{err['total']['predicted_mib']:,.1f}", f"{err['total']['server_mib']:,.1f}",
                         f"{err['total']['measured_mib']:,.1f}", f"{err['total']['error_mib']:+,.1f}",
                         f"{err['total']['error_pct']:+.1f}%", f"{err['kv']['predicted_mib']:,.1f}",
                         f"{err['kv']['server_mib']:,.1f}", "exact"]
    assert err["total"]["error_pct"] == pytest.approx(100 * (1 / 1.03 - 1), abs=0.1)
    off_row = _rows(section, off.config_id)[0]
    assert off_row[7] == f"{off.to_dict()['memory']['prediction_error']['total']['error_pct']:+.1f}%"
    assert off_row[10] == "off by -2.00 MiB"
    assert _rows(section, plain.config_id) == []
    assert "largest +11.1% (4090-n4-ctx8k-q8)" in section  # |−10%| of measured = +11.1% of it
    html = (tmp_path / "capacity.html").read_text()
    assert 'id="prediction-table"' in html
    assert f'<td class="num ok">{err["total"]["error_pct"]:+.1f}%</td>' in html
    assert '<td class="num warn">+11.1%</td>' in html and '<td class="bad">off by -2.00 MiB</td>' in html

    without = tmp_path / "without"
    write_results(without, [plain])
    render_report(without)
    assert "Memory prediction" not in (without / "capacity.md").read_text()
    assert "prediction-table" not in (without / "capacity.html").read_text()


def _checked(rec: WorkloadRecord, *, behind: bool = False, usage_missing: int = 0,
             timings: bool = True) -> WorkloadRecord:
    """A workload record with the harness's cross-check, goodput and roofline figures (``harness._finish``)."""
    m = rec.metrics
    tokens = 4000
    crosscheck = Crosscheck(client_tokens=tokens, server_timing_tokens=tokens if timings else 0,
                            server_metrics_tokens=tokens + 40.0 if timings else None,
                            token_ratio=1.0 if timings else None,
                            metrics_token_ratio=tokens / (tokens + 40.0) if timings else None,
                            decode_rate_ratio=(0.72 if behind else 0.995) if timings else None,
                            client_behind=behind)
    goodput = Goodput(good_turns=m.turns_ok - 1, finished_turns=m.turns_ok + m.turns_failed,
                      fraction=(m.turns_ok - 1) / (m.turns_ok + m.turns_failed),
                      turns_per_s=0.0652, tokens_per_s=118.25)
    rec = with_metrics(rec, crosscheck=crosscheck, usage_missing=usage_missing, goodput=goodput)
    return replace(rec, tokens_from="server usage" if not usage_missing else
                   f"server usage missing on {usage_missing} turns")


def test_client_server_crosscheck_and_goodput(tmp_path: Path) -> None:
    ok = _checked(workload("4090-n3-ctx64k-q8", 3, 65536, "A", ["TL", "Dev", "QA"], 142.3, 69.7, (93.0, 114.0),
                           2972.0, (42, 0)))
    behind = _checked(workload("4090-n3-ctx128k-q8", 3, 131072, "A", ["TL", "Dev", "QA"], 132.1, 68.6,
                               (96.0, 122.0), 1823.0, (39, 0)), behind=True)
    blind = _checked(workload("4090-n5-ctx32k-q8", 5, 32768, "B", ["Research"] * 3, 180.2, 58.7, (None, None),
                              3154.0, (61, 0)), usage_missing=61, timings=False)
    write_results(tmp_path, [ok, behind, blind])
    render_report(tmp_path)
    md = (tmp_path / "capacity.md").read_text()
    section = _section(md, "### Client vs server cross-check")
    assert _rows(section, "4090-n3-ctx64k-q8")[0][2:] == ["4,000", "4,000", "4,040", "1.000", "0.990", "0.995",
                                                          "server usage", "no"]
    assert _rows(section, "4090-n3-ctx128k-q8")[0][7:] == ["0.720", "server usage", "yes"]
    assert _rows(section, "4090-n5-ctx32k-q8")[0][3:] == ["—", "—", "—", "—", "—",
                                                          "server usage missing on 61 turns", "no"]
    flags = [line for line in section.splitlines() if line.startswith("- 4090-")]
    assert flags == [
        "- 4090-n3-ctx128k-q8 (A (TL, Dev, QA)): client fell behind the server: figures understate it "
        "(decode-rate ratio 0.720); raise --gpucap-client-procs.",
        "- 4090-n5-ctx32k-q8 (B (3×Research)): the server gave no token usage on any turn: their tokens are not "
        "counted, so TPS understates the run.",
        "- 4090-n5-ctx32k-q8 (B (3×Research)): the server reported no timings and no token counter: the client's "
        "figures could not be cross-checked.",
    ]
    goodput = _section(md, "### Goodput under the SLOs")
    assert _rows(goodput, "4090-n3-ctx64k-q8")[0][2:] == ["41 / 42", "98%", "0.065", "118.2", "142.3"]
    html = (tmp_path / "capacity.html").read_text()
    assert 'id="crosscheck-table"' in html and 'id="goodput-table"' in html
    assert "<li class=\"warn\">4090-n3-ctx128k-q8 (A (TL, Dev, QA)): client fell behind the server: figures " \
           "understate it (decode-rate ratio 0.720); raise --gpucap-client-procs.</li>" in html
    assert '<td class="bad">yes</td>' in html

    clean = tmp_path / "clean"
    write_results(clean, [ok])
    render_report(clean)
    assert "Client and server agree on every run." in (clean / "capacity.md").read_text()


def test_low_roofline_efficiency_flagged_in_words(tmp_path: Path) -> None:
    fast = workload("4090-n3-ctx64k-q8", 3, 65536, "A", ["TL", "Dev", "QA"], 142.3, 69.7, (93.0, 114.0),
                    2972.0, (42, 0))
    fast = with_metrics(fast, roofline_tps=200.0, roofline_full_slots_tps=150.0, efficiency=142.3 / 200.0)
    slow = workload("4090-n3-ctx256k-q8", 3, 262144, "A", ["TL", "Dev", "QA"], 10.5, 10.1, (None, None),
                    1077.0, (3, 2))
    slow = with_metrics(slow, roofline_tps=175.0, roofline_full_slots_tps=52.5, efficiency=10.5 / 175.0)
    write_results(tmp_path, [fast, slow])
    render_report(tmp_path)
    md = (tmp_path / "capacity.md").read_text()
    phase2 = _section(md, "## Phase 2 — workload")
    assert _rows(phase2, "4090-n3-ctx256k-q8")[0][4:7] == ["10.5", "175.0", "6%"]
    assert _rows(phase2, "4090-n3-ctx64k-q8")[0][4:7] == ["142.3", "200.0", "71%"]
    flagged = [line for line in phase2.splitlines() if line.startswith("- 4090-")]
    assert flagged == ["- 4090-n3-ctx256k-q8 (A (TL, Dev, QA)): 6% of the roofline (10.5 of 175.0 tok/s); "
                       "20% of the all-slots-full ceiling (52.5 tok/s)."]
    assert "Below half the bandwidth roofline, so not bandwidth-bound" in phase2
    html = (tmp_path / "capacity.html").read_text()
    assert '<ul id="low-efficiency"><li class="warn">4090-n3-ctx256k-q8 (A (TL, Dev, QA)): 6% of the roofline' in html
    assert "4090-n3-ctx64k-q8 (A (TL, Dev, QA)): 71%" not in html


def vllm_ceiling(n: int, ctx: int, seqs: float | None, free: float) -> CeilingRecord:
    """A vLLM ceiling record: free memory is low by design (pre-allocated KV), headroom is KV capacity
    (the vLLM backend's headroom rule, as ``ceiling.build_ceiling`` judges it)."""
    rec = ceiling(n, ctx, 24082.0 - free, free, 38.0, mmproj=False)
    kv_headroom = KvHeadroom(
        kind="kv_capacity", kv_capacity_sequences=seqs, n=n,
        explain="vLLM pre-allocates its KV cache, so free memory after load is not headroom; headroom is "
                "how many concurrent full-length sequences the KV pool holds vs N",
        spare_sequences=None if seqs is None else seqs - n, ok=None if seqs is None else seqs >= n,
        extra={"kv_cache_tokens": None if seqs is None else int(seqs * ctx), "kv_cache_gib": 7.5,
               "kv_sizing": "utilization"})
    verdicts = ceiling_verdicts(free, SLO(headroom_gib=1.5), kv_headroom.to_dict(), n)
    return replace(rec, config=replace(rec.config, backend="vllm"),
                   config_id=rec.config_id.replace("4090-", "4090-vllm-"),
                   server=replace(rec.server, backend="vllm"), memory=replace(rec.memory, kv_headroom=kv_headroom),
                   verdicts=tuple(verdicts), outcome="passed" if all(v.ok for v in verdicts) else "failed")


def test_vllm_headroom_is_kv_capacity_and_queueing_shown(tmp_path: Path) -> None:
    fits, short = vllm_ceiling(4, 32768, 12.5, 600.0), vllm_ceiling(16, 32768, 12.5, 600.0)
    llama = ceiling(3, 65536, 21110.0, 2972.0, 10.0)
    over = workload("4090-vllm-n4-ctx32k-q8", 4, 32768, "fixed-c8", ["fixed x8"], 310.0, 40.2, (None, None),
                    600.0, (64, 0))
    over = with_metrics(over, server=ServerView(
        samples=40, scrape_errors=0, window_s=20.0, max_waiting=4.0, mean_waiting=2.1,
        waiting_fraction=0.55, max_running=4.0, mean_running=3.9, max_kv_cache_usage=0.31,
        preemptions=2.0, server_errors=0.0, prefix_cache_hit_rate=0.0, overloaded=True,
        queue_time_s=QueueTimes(mean=1.25, p50=1.1, p95=2.75, p99=3.0, extra={"count": 64, "sum": 80.0}),
        max_num_seqs=4, running_at_cap=True))
    calm = workload("4090-vllm-n16-ctx32k-q8", 16, 32768, "fixed-c8", ["fixed x8"], 300.0, 40.0, (None, None),
                    600.0, (64, 0))
    calm = with_metrics(calm, server=ServerView(samples=0, scrape_errors=3))
    write_results(tmp_path, [fits, short, llama, over, calm])
    render_report(tmp_path)
    md = (tmp_path / "capacity.md").read_text()
    phase1 = _section(md, "## Phase 1 — memory ceiling")
    assert _rows(phase1, "4090-vllm-n4-ctx32k-q8")[0][8:10] == [
        "n/a (vLLM)", "KV pool holds 12.5 full-length sequences for N=4"]
    assert _rows(phase1, "4090-vllm-n16-ctx32k-q8")[0][9] == "KV pool holds 12.5 full-length sequences for N=16"
    assert _rows(phase1, "4090-n3-ctx64k-mmproj-q8")[0][9] == "Marginal"  # llama.cpp keeps the free-memory class
    assert md.count("headroom is how many concurrent full-length sequences the KV pool holds vs N") == 1
    assert "the Comfortable / Marginal / Risky free-memory class does not apply" in phase1
    assert _rows(phase1.split("### Per-slot KV cost")[1], "4090-vllm-n4-ctx32k-q8")[0][6:8] == ["—", "—"]
    # The free-memory verdict (600 MiB < 1.5 GiB) is no reason against a vLLM config; KV capacity is.
    ceiling_only = _section(md, "### Memory ceiling only (profile 4090)")
    assert "headroom 0.59 GiB" not in md and "**Pick: 4090-n3-ctx64k-mmproj-q8**" in ceiling_only
    assert re.search(r"\| 4090-vllm-n16-ctx32k-q8 \| 16 \| 32k \| [\d,.]+ \| KV capacity \(concurrent full-length "
                     r"sequences\) 12\.50 seq below budget 16\.00 seq \|", ceiling_only)
    assert re.search(r"\| 4090-vllm-n4-ctx32k-q8 \| 4 \| 32k \| [\d,.]+ \| passes \|", ceiling_only)
    queue = _section(md, "### Server-side queueing (vLLM)")
    assert _rows(queue, "4090-vllm-n4-ctx32k-q8")[0][1:] == ["fixed-c8", "1.25", "2.75", "4", "55%", "4 / 4", "2",
                                                             "31%", "0%", "yes"]
    assert _rows(queue, "4090-vllm-n16-ctx32k-q8")[0][10] == "no /metrics samples (3 scrape errors)"
    html = (tmp_path / "capacity.html").read_text()
    assert '<td class="ok">KV pool holds 12.5 full-length sequences for N=4</td>' in html
    assert '<td class="bad">KV pool holds 12.5 full-length sequences for N=16</td>' in html
    vllm_rows = [r for r in re.findall(r"<tr>.*?</tr>", html) if "<td>4090-vllm-" in r and "Free" not in r]
    assert vllm_rows and not [r for r in vllm_rows if re.search(r">(Comfortable|Marginal|Risky)<", r)]
    assert 'id="queueing-table"' in html and '<td class="bad">yes</td>' in html

    llama_only = tmp_path / "llama"
    write_results(llama_only, [llama])
    render_report(llama_only)
    md = (llama_only / "capacity.md").read_text()
    assert "Server-side queueing" not in md and "Headroom on vLLM" not in md


def unmeasured(kind: str, config_id: str, outcome: str, reason: str, test: str) -> Record:
    """A record of a config test that ended before measuring: config, outcome and reason only."""
    cfg = CapacityConfig(profile="4090", n=7, ctx=65536, cache_type_k="q8_0", cache_type_v="q8_0", name=config_id)
    return replace(records.outcome_record(cfg, test, kind, reason), outcome=outcome)


def test_unmeasured_records_render_without_figures(tmp_path: Path) -> None:
    skipped = unmeasured("ceiling", "n7-big", "skipped",
                         f"predicted not to fit: 30,211 MiB needed > 20,682 MiB {HOSTILE} a|b",
                         "capacity_tests/test_ceiling.py::test_ceiling[n7-big]")
    boot_failed = unmeasured("ceiling", "n9-boom", "failed", "ServerError: llama-server exited with status 1",
                             "capacity_tests/test_ceiling.py::test_ceiling[n9-boom]")
    wl_skipped = unmeasured("unmeasured", "n7-big", "skipped", "predicted not to fit",
                            "capacity_tests/test_workload.py::test_workflow[n7-big-A]")
    records = [*study_records(), skipped, boot_failed, wl_skipped]
    write_results(tmp_path, records)
    render_report(tmp_path)
    md = (tmp_path / "capacity.md").read_text()
    assert "Rendered from 14 records" in md and "1 unmeasured" in md
    phase1 = _section(md, "## Phase 1 — memory ceiling")
    ceiling_md, kv_md = phase1.split("### Per-slot KV cost")
    assert _rows(ceiling_md, "n7-big")[0] == [
        "n7-big", "7", "65,536", "458,752", "—", "—", "—", "—", "—", "—",
        "skipped: predicted not to fit: 30,211 MiB needed &gt; 20,682 MiB &lt;script&gt;alert(1)&lt;/script&gt; a\\|b"]
    assert _rows(ceiling_md, "n9-boom")[0][10] == "failed: ServerError: llama-server exited with status 1"
    assert _rows(kv_md, "n7-big") == [] and _rows(kv_md, "4090-n3-ctx64k-mmproj-q8")
    not_measured = _section(md, "## Not measured")
    assert [r[:3] for r in _rows(not_measured, "n7-big")] == [
        ["n7-big", "capacity_tests/test_ceiling.py::test_ceiling\\[n7-big\\]", "skipped"],
        ["n7-big", "capacity_tests/test_workload.py::test_workflow\\[n7-big-A\\]", "skipped"]]
    assert _rows(not_measured, "n9-boom")[0][3] == "ServerError: llama-server exited with status 1"
    assert "Records of other kinds" not in md
    ceiling_only = _section(md, "### Memory ceiling only (profile 4090)")
    assert "**Pick: 4090-n7-ctx32k-mmproj-q8**" in ceiling_only
    assert re.search(r"\| n9-boom \| 7 \| 64k \| — \| test failed \(ServerError: llama-server exited with "
                     r"status 1\) \|", ceiling_only)
    html = (tmp_path / "capacity.html").read_text()
    assert HOSTILE not in html and 'id="not-measured-table"' in html
    assert "20,682 MiB &lt;script&gt;alert(1)&lt;/script&gt; a|b</td>" in html
    assert "<td>n7-big</td><td class=\"text\">capacity_tests/test_workload.py::test_workflow[n7-big-A]</td>" in html
    from pytest_gpucap.report import render_summary

    assert "Does not fit (measured)" in render_summary(tmp_path)  # the boot that failed, on the map


def test_only_unmeasured_records_still_render(tmp_path: Path) -> None:
    write_results(tmp_path, [
        unmeasured("ceiling", "n7-big", "skipped", "not enough RAM", "t::test_ceiling[n7-big]"),
        unmeasured("unmeasured", "n7-big", "failed", "boot failed", "t::test_workflow[n7-big-A]"),
        unmeasured("mystery", "n7-big", "failed", "?", "t::other")])
    written = render_report(tmp_path)
    md = (tmp_path / "capacity.md").read_text()
    assert [p.name for p in written] == ["capacity.md", "capacity.html", "capacity-map-4090-q8_0-text.svg"]
    assert "No ceiling config was measured." in md and "No workload records" in md
    assert "Headroom verdict rule" not in md  # no measured record to state a rule for
    assert "Records of other kinds not shown: mystery ×1." in md
    assert len(_rows(_section(md, "## Not measured"), "n7-big")) == 2
    # the same config skipped for one reason in several tests is one row naming them all
    again = tmp_path / "grouped"
    write_results(again, [unmeasured("ceiling", "n7-big", "skipped", "not enough RAM", "t::test_ceiling[n7-big]"),
                          unmeasured("unmeasured", "n7-big", "skipped", "not enough RAM", "t::test_workflow[n7-big-A]")])
    render_report(again)
    (row,) = _rows(_section((again / "capacity.md").read_text(), "## Not measured"), "n7-big")
    assert row[1:] == ["t::test_ceiling\\[n7-big\\], t::test_workflow\\[n7-big-A\\]", "skipped", "not enough RAM"]
    assert "No configuration met all SLOs." in md


def test_memory_only_pick_breaks_ties_on_free_memory_under_the_burst() -> None:
    """Headroom is judged on the burst minimum, so the tie between equal N×ctx configs is broken on it too:
    the config with more idle memory but less under its burst is not the pick."""
    from pytest_gpucap.report.recommend import recommendations

    roomy_idle = ceiling(3, 65536, 20000.0, 3000.0, 10.0, mmproj=True)
    roomy_burst = ceiling(3, 65536, 20500.0, 2500.0, 10.0, mmproj=False)
    recs = [replace(roomy_idle, memory=replace(roomy_idle.memory, free_idle_mib=3000.0, free_under_burst_mib=1800.0)),
            replace(roomy_burst, memory=replace(roomy_burst.memory, free_idle_mib=2500.0, free_under_burst_mib=2200.0))]
    [memory_only] = [r for r in recommendations(recs) if r.label == "memory ceiling only"]
    assert memory_only.tiebreak_name == "Free under burst (MiB)"
    assert memory_only.pick is not None and memory_only.pick.config_id == roomy_burst.config_id
    assert memory_only.pick.tiebreak == 2200.0
