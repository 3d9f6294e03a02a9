"""The report page's inline CSS and JavaScript (no CDN: the page opens offline).

The script sorts any ``table.sortable`` by a header click (``data-sort="num"``
columns numerically, blanks last; ties keep the default order, ``data-i``),
filters the scan table by text, status and dataset/site, fills the metric
column from each row's ``data-m`` (``value`` plus ``!`` failed or ``~`` outlier,
comma-separated in the metric picker's order), and highlights a scan's dot in
every plot when its row is hovered or clicked (a click pins it; clicking a dot
pins and shows its row). It holds no user data: rows and plots carry theirs as
escaped attributes.
"""

from __future__ import annotations

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222;
font-size:14px}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;
border-bottom:1px solid #ccc}
.counts span{display:inline-block;margin-right:1.2em;padding:.3em .7em;border-radius:4px;
background:#eef}
.counts .bad{background:#fdd}.counts .ok{background:#dfd}.counts .outl{background:#ffe9c4}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
th.sortable{cursor:pointer;user-select:none}th.sortable:hover{background:#e4e9f2}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
#scans thead th{position:sticky;top:0;z-index:3}
tr.failed td{background:#fff3f3}tr.outlier td{background:#fff8e8}
tr.scan:hover td{background:#eef4ff}tr.pinned td{background:#fff9b0}
.ok{color:#176917}.bad{color:#b00;font-weight:bold}.outl{color:#a65f00;font-weight:bold}
.qc span{display:block;white-space:nowrap;font-size:12px}
.qc span.bad{background:#fdd}.qc span.outl{background:#ffe9c4}.qc span.info{color:#555}
td.mv.bad{background:#fdd}td.mv.outl{background:#ffe9c4}
.warn{background:#fff5d6}
img.thumb{max-width:170px;height:auto;transition:transform .1s;transform-origin:right center}
img.thumb:hover{transform:scale(2.2);position:relative;z-index:2;box-shadow:0 0 8px #000}
table.nothumbs .th{display:none}
.missing{color:#888;font-style:italic}
pre{background:#f7f7f7;padding:4px 6px;white-space:pre-wrap;word-break:break-all;
font-size:12px;margin:.2em 0}
details{margin:.3em 0;border:1px solid #ddd;padding:.2em .5em;border-radius:4px}
summary{cursor:pointer}
.sha{font-family:monospace;font-size:11px}
p.methods,p.note{max-width:60em;line-height:1.45}
.controls{display:flex;flex-wrap:wrap;gap:.4em 1.2em;align-items:center;margin:.5em 0;
padding:.4em .6em;background:#f6f7fa;border:1px solid #dde;border-radius:4px}
.controls[hidden]{display:none}.controls input[type=search]{width:22em}
.scroll{overflow-x:auto;max-width:100%}
#plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(580px,1fr));gap:.6em}
figure.plot{margin:0;border:1px solid #ddd;border-radius:4px;padding:.3em .4em}
figure.plot figcaption{font-size:12px}
svg.strip{display:block;max-width:100%;height:auto}
svg.strip text{font-size:10px;fill:#444}
svg.strip line.axis{stroke:#888}svg.strip line.thr{stroke:#b00;stroke-width:1.5}
svg.strip text.thr{fill:#b00}svg.strip line.med{stroke:#444;stroke-dasharray:4 3}
svg.strip line.fence{stroke:#e08a00;stroke-dasharray:2 3}
svg.strip circle{fill:#4a78b5;fill-opacity:.5;cursor:pointer}
svg.strip circle.o{fill:#f08c00;fill-opacity:1}svg.strip circle.f{fill:#d00;fill-opacity:1}
svg.strip circle.hl{fill:#ff0;fill-opacity:1;stroke:#000;stroke-width:2;r:6px}
.legend i{display:inline-block;width:.8em;height:.8em;border-radius:50%;margin:0 .2em 0 .8em;
vertical-align:middle}
"""

# The per-scan detail pages (in the report's folder): the same look, less of it.
DETAILS_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222;
font-size:14px}
h1{font-size:1.3em}h4{margin:1em 0 .2em}
table{border-collapse:collapse;margin:.3em 0}
th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right}
.ok{color:#176917}.bad{color:#b00;font-weight:bold}
pre{background:#f7f7f7;padding:4px 6px;white-space:pre-wrap;word-break:break-all;
font-size:12px;margin:.2em 0}
.sha{font-family:monospace;font-size:11px}
"""

JS = r"""
(function () {
  "use strict";
  function toNum(v) {
    if (v === null || v === "") return null;
    var x = parseFloat(v);
    return isNaN(x) ? null : x;
  }
  function cellKey(cell, numeric) {
    var v = cell ? cell.getAttribute("data-v") : null;
    if (v === null) v = cell ? cell.textContent : "";
    return numeric ? toNum(v) : v.toLowerCase();
  }
  function sortable(table) {
    var body = table.tBodies[0];
    if (!body || !table.tHead) return;
    var heads = table.tHead.rows[0].cells, state = {col: -1, dir: 1};
    Array.prototype.forEach.call(heads, function (th, col) {
      var type = th.getAttribute("data-sort");
      if (!type) return;
      th.tabIndex = 0;
      th.classList.add("sortable");
      th.title = "click to sort";
      function go() {
        var dir = state.col === col ? -state.dir : 1, numeric = type === "num";
        state = {col: col, dir: dir};
        var keyed = Array.prototype.map.call(body.rows, function (r) {
          return [cellKey(r.cells[col], numeric), +r.getAttribute("data-i"), r];
        });
        keyed.sort(function (a, b) {
          if (a[0] === null || b[0] === null) {
            if (a[0] === b[0]) return a[1] - b[1];
            return a[0] === null ? 1 : -1;
          }
          if (a[0] < b[0]) return -dir;
          if (a[0] > b[0]) return dir;
          return a[1] - b[1];
        });
        var frag = document.createDocumentFragment();
        keyed.forEach(function (k) { frag.appendChild(k[2]); });
        body.appendChild(frag);
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      }
      th.addEventListener("click", go);
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); go(); }
      });
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), sortable);

  var table = document.getElementById("scans");
  if (table) {
    Array.prototype.forEach.call(document.querySelectorAll(".controls"), function (c) {
      c.hidden = false;
    });
    var rows = Array.prototype.slice.call(table.tBodies[0].rows), texts = null;
    var q = document.getElementById("filter"), st = document.getElementById("status-filter");
    var site = document.getElementById("site-filter"), shown = document.getElementById("shown");
    var apply = function () {
      if (!texts) texts = rows.map(function (r) { return r.textContent.toLowerCase(); });
      var text = q.value.trim().toLowerCase(), s = st.value, g = site.value, n = 0;
      rows.forEach(function (r, k) {
        var ok = (!text || texts[k].indexOf(text) >= 0) &&
          (s === "all" || r.getAttribute("data-status") === s) &&
          (!g || r.getAttribute("data-site") === g || r.getAttribute("data-ds") === g);
        r.hidden = !ok;
        if (ok) n++;
      });
      shown.textContent = n + " of " + rows.length + " scans shown";
    };
    q.addEventListener("input", apply);
    st.addEventListener("change", apply);
    site.addEventListener("change", apply);

    var pick = document.getElementById("metric-pick");
    var head = document.getElementById("metric-head");
    if (pick && head) {
      pick.addEventListener("change", function () {
        var k = +pick.value, col = head.cellIndex;
        rows.forEach(function (r) {
          var raw = (r.getAttribute("data-m") || "").split(",")[k] || "", flag = raw.slice(-1);
          var v = flag === "!" || flag === "~" ? raw.slice(0, -1) : raw, cell = r.cells[col];
          cell.textContent = v === "" ? "\u2014" : v;
          cell.setAttribute("data-v", v);
          cell.className = "num mv" + (flag === "!" ? " bad" : flag === "~" ? " outl" : "");
        });
        head.textContent = pick.options[pick.selectedIndex].text;
        head.removeAttribute("aria-sort");
        texts = null;
      });
    }
    var thumbs = document.getElementById("show-thumbs");
    if (thumbs) thumbs.addEventListener("change", function () {
      table.classList.toggle("nothumbs", !thumbs.checked);
    });

    var lit = [], pinned = null;
    var light = function (i) {
      lit.forEach(function (c) { c.classList.remove("hl"); });
      lit = [];
      if (i === null) return;
      var dots = document.querySelectorAll('#plots circle[data-i="' + i + '"]');
      Array.prototype.forEach.call(dots, function (c) {
        c.classList.add("hl");
        c.parentNode.appendChild(c);
        lit.push(c);
      });
    };
    var pin = function (row) {
      var old = pinned === null ? null : document.getElementById("row-" + pinned);
      if (old) old.classList.remove("pinned");
      pinned = row ? row.getAttribute("data-i") : null;
      if (row) row.classList.add("pinned");
      light(pinned);
    };
    table.tBodies[0].addEventListener("mouseover", function (e) {
      var r = e.target.closest("tr.scan");
      if (r && pinned === null) light(r.getAttribute("data-i"));
    });
    table.tBodies[0].addEventListener("mouseleave", function () { light(pinned); });
    table.tBodies[0].addEventListener("click", function (e) {
      if (e.target.closest("a")) return;
      var r = e.target.closest("tr.scan");
      if (r) pin(r.getAttribute("data-i") === pinned ? null : r);
    });
    var plots = document.getElementById("plots");
    if (plots) plots.addEventListener("click", function (e) {
      var c = e.target.closest("circle[data-i]");
      if (!c) return;
      var r = document.getElementById("row-" + c.getAttribute("data-i"));
      if (!r) return;
      pin(r);
      if (r.hidden) { q.value = ""; st.value = "all"; site.value = ""; apply(); }
      r.scrollIntoView({block: "center"});
    });
  }
  var openHash = function () {
    var el = location.hash.length > 1 ? document.getElementById(location.hash.slice(1)) : null;
    if (el && el.tagName === "DETAILS") el.open = true;
  };
  window.addEventListener("hashchange", openHash);
  openHash();
  if (window.performance && performance.mark) performance.mark("medtx-report-ready");
})();
"""
