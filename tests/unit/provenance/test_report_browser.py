"""The report in a real browser: headless Chromium loads the page, sorts, filters.

No browser driver is needed: a copy of the page beside it gets a probe script
after the page's own, which clicks and types through the page's controls and
writes what it saw into the DOM as JSON; ``chromium --dump-dom`` prints that
DOM. Skips when Chromium is not installed (``apt-get install chromium``).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from medtx.provenance.report import build_report
from tests.unit.provenance.test_report import (
    SETTINGS,
    SYNTH_DATASETS,
    SYNTH_SITES,
    synthetic_cohort,
    synthetic_values,
)


def chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


CHROMIUM = chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

PROBE = r"""
<script>
(function () {
  function shown() {
    return Array.prototype.filter.call(document.querySelectorAll("#scans tbody tr"),
      function (r) { return !r.hidden; });
  }
  function ids(rows) { return rows.map(function (r) { return +r.getAttribute("data-i"); }); }
  function col(name) {
    var ths = document.querySelectorAll("#scans thead th");
    for (var k = 0; k < ths.length; k++) if (ths[k].textContent === name) return k;
    return -1;
  }
  function set(id, value, event) {
    var el = document.getElementById(id);
    el.value = value;
    el.dispatchEvent(new Event(event));
  }
  var out = {ready: performance.getEntriesByName("medtx-report-ready").length};
  out.rows = shown().length;
  out.initial = ids(shown());
  var total = col("total (s)"), th = document.querySelectorAll("#scans thead th")[total];
  th.click();
  out.ascending = shown().map(function (r) { return r.cells[total].textContent; });
  th.click();
  out.descending = shown().map(function (r) { return r.cells[total].textContent; });
  out.ariaSort = th.getAttribute("aria-sort");
  set("filter", "siteb", "input");
  out.textFilter = ids(shown());
  out.shown = document.getElementById("shown").textContent;
  set("filter", "", "input");
  set("status-filter", "failed", "change");
  out.failed = ids(shown());
  set("status-filter", "outlier", "change");
  out.outliers = ids(shown());
  set("status-filter", "all", "change");
  var site = document.getElementById("site-filter"), opts = site.options, pick = null;
  for (var k = 0; k < opts.length; k++) if (opts[k].text === "dsA / siteC") pick = opts[k].value;
  set("site-filter", pick, "change");
  out.siteFilter = ids(shown());
  set("site-filter", "", "change");
  var metric = document.getElementById("metric-pick");
  for (var m = 0; m < metric.options.length; m++)
    if (metric.options[m].text === "ncc_template (flirt)") metric.value = metric.options[m].value;
  metric.dispatchEvent(new Event("change"));
  var mv = document.getElementById("metric-head").cellIndex;
  var row = document.querySelector('#scans tr[data-status="outlier"]');
  out.metricCell = [row.cells[mv].textContent, row.cells[mv].className];
  row.cells[0].dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
  out.lit = Array.prototype.map.call(document.querySelectorAll("#plots circle.hl"),
    function (c) { return +c.getAttribute("data-i"); });
  out.plots = document.querySelectorAll("#plots svg").length;
  window.addEventListener("load", function () {  // --dump-dom waits for it
    out.thumbs = Array.prototype.map.call(document.querySelectorAll("img.thumb"),
      function (img) { return img.naturalWidth; });
    document.body.insertAdjacentHTML("beforeend", '<pre id="probe-' + 'result">' +
      JSON.stringify(out).replace(/</g, "\\u003c") + "</pre>");
  });
})();
</script>
"""


def run_chromium(*args: str, profile: Path, timeout: float = 120) -> str:
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish in {timeout} s: {' '.join(cmd)}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def probe(page: Path, profile: Path) -> dict:
    """Load a copy of ``page`` (beside it, so its relative links hold) with PROBE."""
    text = page.read_text()
    copy = page.with_name(f"probe-{page.name}")
    copy.write_text(text.replace("</body>", PROBE + "</body>", 1))
    dom = run_chromium("--dump-dom", copy.as_uri(), profile=profile)
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, flags=re.S)
    assert found, "the probe script did not run:\n" + dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


def test_the_report_sorts_and_filters_in_chromium(tmp_path):
    n, fail, outlier = 30, {4, 13, 21}, {7, 12}
    records, sites = synthetic_cohort(tmp_path, n, fail=fail, outlier=outlier)
    page = tmp_path / "out" / "provenance #1.html"  # its folder's URL needs quoting
    out = build_report(records, [], SETTINGS, page, base_dir=tmp_path, sites=sites)
    seen = probe(out, tmp_path / "profile")

    assert seen["ready"] == 1 and seen["rows"] == n and seen["plots"] == 4
    assert seen["thumbs"] == [90] * n  # every thumbnail found in the page's folder
    scan_of = {}  # data-i -> cohort index k, from the page
    for m in re.finditer(r'data-i="(\d+)"[^>]*>.*?>(\d{3})</a>', out.read_text()):
        scan_of[int(m.group(1))] = int(m.group(2))
    assert sorted(scan_of.values()) == list(range(n))
    assert [scan_of[i] in fail for i in seen["initial"]] == [True] * 3 + [False] * (n - 3)

    ascending = [float(v) for v in seen["ascending"]]
    assert ascending == sorted(ascending) and len(ascending) == n
    assert ascending[0] < ascending[-1]
    descending = [float(v) for v in seen["descending"]]
    assert descending == sorted(ascending, reverse=True)
    assert seen["ariaSort"] == "descending"

    def site(k):
        return SYNTH_SITES[k % 3] if k % 10 != 9 else "unknown"

    site_b = {k for k in range(n) if site(k) == "siteB"}
    assert {scan_of[i] for i in seen["textFilter"]} == site_b
    assert seen["shown"] == f"{len(site_b)} of {n} scans shown"
    assert {scan_of[i] for i in seen["failed"]} == fail
    assert {scan_of[i] for i in seen["outliers"]} == outlier
    a_c = {k for k in range(n) if SYNTH_DATASETS[k % 2] == "dsA" and site(k) == "siteC"}
    assert {scan_of[i] for i in seen["siteFilter"]} == a_c
    assert seen["metricCell"] == ["0.5", "num mv outl"]
    assert len(seen["lit"]) == 4 and len(set(seen["lit"])) == 1  # one scan, every plot
    assert synthetic_values(0, n)["ncc_template"] != 0.5

    shot = tmp_path / "report.png"
    run_chromium(
        "--window-size=1400,1800", f"--screenshot={shot}", out.as_uri(), profile=tmp_path / "p2"
    )
    assert shot.stat().st_size > 10_000
