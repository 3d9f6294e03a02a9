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
