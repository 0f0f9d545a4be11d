// unimm leaderboard page: renders #data (rows x columns), sort by header click, filter by family / benchmark /
// pool, show or hide the reported rows. Measured rows always come before reported ones (never interleaved).
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("data").textContent);
  var state = { sort: null, dir: -1, family: "", benchmark: "", pool: "", reported: true };
  var el = function (id) { return document.getElementById(id); };

  function fill(select, values, labels) {
    values.forEach(function (v) {
      var o = document.createElement("option");
      o.value = v; o.textContent = labels ? labels[v] || v : v; select.appendChild(o);
    });
  }
  function uniq(list) { return list.filter(function (v, i) { return v !== null && list.indexOf(v) === i; }).sort(); }
  var famLabels = {};
  data.rows.forEach(function (r) { famLabels[r.family] = r.family_label; });
  fill(el("f-family"), uniq(data.rows.map(function (r) { return r.family; })), famLabels);
  fill(el("f-benchmark"), uniq(data.columns.map(function (c) { return c.benchmark; })));
  fill(el("f-pool"), uniq(data.columns.map(function (c) { return c.pool; })));

  function visibleColumns() {
    return data.columns.filter(function (c) {
      return (!state.benchmark || c.benchmark === state.benchmark) && (!state.pool || c.pool === state.pool);
    });
  }
  function fmt(v) { return v === undefined || v === null ? "\u2013" : v.toFixed(1); }
  function cmp(a, b, key) {
    var x, y;
    if (key === "name" || key === "family") { x = a[key === "name" ? "name" : "family_label"]; y = b[key === "name" ? "name" : "family_label"]; }
    else { x = a.cells[key]; y = b.cells[key]; }
    if (x === undefined || x === null) return 1;   // missing values last in either direction
    if (y === undefined || y === null) return -1;
    return (x < y ? -1 : x > y ? 1 : 0) * state.dir;
  }

  function render() {
    var cols = visibleColumns();
    var thead = document.querySelector("#board thead"), tbody = document.querySelector("#board tbody");
    var head = "<tr><th data-key=\"name\">model</th><th data-key=\"family\">family</th>";
    cols.forEach(function (c) { head += "<th data-key=\"" + c.key + "\" title=\"" + esc(c.settings ? "evaluation settings " + c.settings_hash + ": " + c.settings : c.key) + "\">" + esc(c.label) + "</th>"; });
    thead.innerHTML = head + "</tr>";
    Array.prototype.forEach.call(thead.querySelectorAll("th"), function (th) {
      if (th.dataset.key === state.sort) th.className = state.dir > 0 ? "sorted-asc" : "sorted-desc";
      th.addEventListener("click", function () {
        var key = th.dataset.key;
        if (state.sort === key) state.dir = -state.dir;
        else { state.sort = key; state.dir = (key === "name" || key === "family") ? 1 : -1; }
        render();
      });
    });
    var filtering = state.benchmark || state.pool;
    var rows = data.rows.filter(function (r) {
      if (state.family && r.family !== state.family) return false;
      if (!state.reported && r.kind === "reported") return false;
      if (filtering && !cols.some(function (c) { return r.cells[c.key] !== undefined; })) return false;
      return true;
    });
    var groups = [rows.filter(function (r) { return r.kind === "measured"; }),
                  rows.filter(function (r) { return r.kind === "reported"; })];
    if (state.sort) groups.forEach(function (g) { g.sort(function (a, b) { return cmp(a, b, state.sort); }); });
    var out = "";
    groups.forEach(function (g, i) {
      if (i === 1 && g.length) out += "<tr class=\"divider\"><td colspan=\"" + (cols.length + 2) + "\">reported (published numbers)</td></tr>";
      g.forEach(function (r) {
        var title = r.kind === "reported" ? r.sources.join("; ") : (r.checkpoint || "") + (r.released_from ? " | from " + r.released_from : "");
        var name = esc(r.name);
        if (r.browser && r.browser.length) name = "<a href=\"" + esc(r.browser[0]) + "\">" + name + "</a>";
        if (r.kind === "reported") name += " <span class=\"reported-tag\">reported</span>";
        out += "<tr class=\"" + r.kind + "\" data-name=\"" + esc(r.name) + "\" data-family=\"" + esc(r.family) + "\" title=\"" + esc(title) + "\">"
          + "<td>" + name + "</td><td>" + esc(r.family_label) + "</td>";
        cols.forEach(function (c) {
          var v = r.cells[c.key];
          var best = r.kind === "measured" && v !== undefined && v === data.best[c.key];
          out += "<td class=\"num" + (best ? " best" : "") + "\" data-col=\"" + esc(c.key) + "\"" + (v === undefined ? "" : " data-value=\"" + v + "\"") + ">" + fmt(v) + "</td>";
        });
        out += "</tr>";
      });
    });
    tbody.innerHTML = out;
    var measured = data.rows.filter(function (r) { return r.kind === "measured"; }).length;
    el("summary").textContent = measured + " measured runs from " + data.n_files + " results files, "
      + (data.rows.length - measured) + " reported rows; " + cols.length + " of " + data.columns.length + " columns shown; built " + data.built;
  }
  function esc(s) { return String(s === null || s === undefined ? "" : s).replace(/[&<>"]/g, function (ch) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;" }[ch]; }); }

  el("f-family").addEventListener("change", function (e) { state.family = e.target.value; render(); });
  el("f-benchmark").addEventListener("change", function (e) { state.benchmark = e.target.value; render(); });
  el("f-pool").addEventListener("change", function (e) { state.pool = e.target.value; render(); });
  el("f-reported").addEventListener("change", function (e) { state.reported = e.target.checked; render(); });
  render();
})();
