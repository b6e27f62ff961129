"""capacity.html driven in the system Chromium (Debian's ``chromium``) through Playwright: sort a table and
check the order, filter it, open a collapsed section, pick a host; no request leaves the page and the page
logs no console error. A screenshot is saved under the test's tmp dir.

CI sets GPUCAP_REQUIRE_BROWSER=1 so a missing Chromium or Playwright fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from test_report import HOST_4090, ceiling, study_records, write_results

from pytest_gpucap.report import render_report


def _need(what: str, hint: str) -> None:
    if os.environ.get("GPUCAP_REQUIRE_BROWSER"):
        pytest.fail(f"{what} required (GPUCAP_REQUIRE_BROWSER=1): {hint}")
    pytest.skip(f"{what} not installed ({hint})")


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    """A fresh page whose every request, console message and page error is recorded; anything that is not
    the file itself is refused, so a page that tried to fetch would also show broken."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        _need("chromium", "apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright", "pip install 'playwright>=1.40'; it drives the system Chromium, no download")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu"], timeout=60_000)
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 1800})
            pg.requests, pg.errors = [], []
            pg.on("request", lambda r: pg.requests.append(r.url))
            pg.on("console", lambda m: pg.errors.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
                  else None)
            pg.on("pageerror", lambda e: pg.errors.append(f"page error: {e}"))
            pg.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                     else route.abort())
            yield pg
        finally:
            browser.close()


def _column(pg: Any, table: str, header: str) -> list[str]:
    return pg.eval_on_selector(table, """(t, h) => {
        const i = [...t.tHead.rows[0].cells].findIndex(c => c.textContent.trim() === h);
        return [...t.tBodies[0].rows].filter(r => !r.hidden).map(r => r.cells[i].textContent.trim());
    }""", header)


def _mib(values: list[str]) -> list[float]:
    return [float(v.replace(",", "")) for v in values]


def test_sort_filter_expand_and_nothing_leaves_the_page(tmp_path: Path, page: Any) -> None:
    report = tmp_path / "report"
    report.mkdir()
    write_results(report, study_records())
    render_report(report)
    url = (report / "capacity.html").as_uri()
    page.goto(url)

    # The answer is on screen; the detail sections start closed.
    assert page.is_visible("#verdicts") and "is the pick" in page.inner_text("#verdicts")
    assert page.is_visible("table.capmap") and page.locator("td.map.knee").count() == 2
    assert not page.is_visible("#ceiling-table")
    page.click("#ceiling > summary")
    assert page.eval_on_selector("#ceiling", "d => d.open") and page.is_visible("#ceiling-table")

    # Sort by free memory: ascending, then descending; the Config column moves with it.
    free = page.locator("#ceiling-table th", has_text="Free at idle (MiB)")
    assert "memory.free_mib" in free.get_attribute("title")  # the tooltip names the field
    recorded = _mib(_column(page, "#ceiling-table", "Free at idle (MiB)"))
    free.click()
    assert _mib(_column(page, "#ceiling-table", "Free at idle (MiB)")) == sorted(recorded)
    assert _column(page, "#ceiling-table", "Config")[0] == "4090-n5-ctx64k-mmproj-q8"  # 1,044.0 MiB, the least
    assert free.get_attribute("aria-sort") == "ascending"
    free.click()
    assert _mib(_column(page, "#ceiling-table", "Free at idle (MiB)")) == sorted(recorded, reverse=True)
    page.locator("#ceiling-table th", has_text="Config").click()
    configs = _column(page, "#ceiling-table", "Config")
    assert configs == sorted(configs)

    # Filter rows by text.
    page.locator("#ceiling .table-wrap input.filter").first.fill("ctx64k")
    assert _column(page, "#ceiling-table", "Config") == ["4090-n3-ctx64k-mmproj-q8", "4090-n5-ctx64k-mmproj-q8"]

    # A link to a section inside a closed one opens it.
    page.goto(url + "#ramp")
    assert page.eval_on_selector("#ramp", "d => d.open")

    page.screenshot(path=str(tmp_path / "capacity.png"), full_page=True)
    assert (tmp_path / "capacity.png").stat().st_size > 20_000
    assert page.errors == []
    assert page.requests and [u for u in page.requests if u.split("#")[0] != url] == []


def test_request_and_console_checks_catch_a_page_that_fetches(tmp_path: Path, page: Any) -> None:
    """Guard for the checks above: an external image and a console error are both seen."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="https://example.test/x.png">'
                   "<script>console.error('gpucap-probe')</script></body></html>")
    page.goto(bad.as_uri())
    assert "https://example.test/x.png" in page.requests
    assert any("gpucap-probe" in e for e in page.errors)


def test_host_filter_when_records_come_from_two_hosts(tmp_path: Path, page: Any) -> None:
    other = {**HOST_4090, "gpu": "NVIDIA RTX A5000", "hostname": "lab-2"}
    recs = [ceiling(3, 65536, 21110.0, 2972.0, 10.0), replace(ceiling(5, 32768, 20928.0, 3154.0, 10.0), host=other)]
    write_results(tmp_path, recs)
    render_report(tmp_path)
    page.goto((tmp_path / "capacity.html").as_uri())
    page.click("#ceiling > summary")
    assert len(_column(page, "#ceiling-table", "Config")) == 2
    maps = "#answer h2[id^=capacity-map]"
    assert page.locator(maps).count() == 2  # one map per host
    page.select_option("#host-filter", label="lab-2 · NVIDIA RTX A5000")
    assert _column(page, "#ceiling-table", "Config") == ["4090-n5-ctx32k-mmproj-q8"]
    assert page.locator(maps + ":visible").all_inner_texts() == [
        "Capacity map — profile 4090, KV q8_0, with mmproj (vision) — lab-2 · NVIDIA RTX A5000"]
    page.select_option("#host-filter", label="all hosts")
    assert len(_column(page, "#ceiling-table", "Config")) == 2 and page.locator(maps + ":visible").count() == 2
    assert page.errors == []
