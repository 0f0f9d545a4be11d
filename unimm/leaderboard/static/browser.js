// unimm results browser: one evaluation's queries with their top-k (mode "run"), or the queries two runs
// disagree on (mode "compare": B right and A wrong, or the reverse, at the chosen cutoff). Data from #data.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("data").textContent);
  var PAGE = 50;
  var el = function (id) { return document.getElementById(id); };
  var cmp = data.mode === "compare";
  var hitOf = function (q) { return cmp ? q.b.hit : q.hit; };
  var cuts = Object.keys(hitOf(data.queries[0] || { hit: { "1": true }, b: { hit: { "1": true } } }) || {})
    .sort(function (a, b) { return a - b; });
  var state = { task: "", mod: "", cut: cuts[0] || "1", hit: "", side: "b_not_a", text: "", page: 0 };

  function esc(s) { return String(s === null || s === undefined ? "" : s).replace(/[&<>"]/g, function (ch) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;" }[ch]; }); }
  function fill(select, values) {
    values.forEach(function (v) { var o = document.createElement("option"); o.value = v; o.textContent = v; select.appendChild(o); });
  }
  function uniq(list) { return list.filter(function (v, i) { return v && list.indexOf(v) === i; }).sort(); }
  fill(el("f-task"), uniq(data.queries.map(function (q) { return q.task; })));
  fill(el("f-mod"), uniq(data.queries.map(function (q) { return q.mod; })));
  cuts.forEach(function (c) { var o = document.createElement("option"); o.value = c; o.textContent = "@" + c; el("f-cut").appendChild(o); });
  if (cmp) { el("l-hit").hidden = true; el("l-side").hidden = false; }
  el("title").textContent = data.title;

  function matches(q) {
    if (state.task && q.task !== state.task) return false;
    if (state.mod && q.mod !== state.mod) return false;
    if (state.text) {
      var t = state.text.toLowerCase();
      if (String(q.qid).toLowerCase().indexOf(t) < 0 && String(q.t || "").toLowerCase().indexOf(t) < 0) return false;
    }
    if (cmp) {
      var a = !!q.a.hit[state.cut], b = !!q.b.hit[state.cut];
      return state.side === "b_not_a" ? (b && !a) : (a && !b);
    }
    if (state.hit === "hit" && !q.hit[state.cut]) return false;
    if (state.hit === "miss" && q.hit[state.cut]) return false;
    return true;
  }
  function itemHtml(it) {
    var out = "";
    if (it.i) out += "<img loading=\"lazy\" src=\"" + esc(it.i) + "\" alt=\"\">";
    if (it.t) out += "<div class=\"text\">" + esc(it.t) + "</div>";
    return out;
  }
  function candsHtml(r) {
    var out = "<div class=\"cands\">";
    r.ranked.forEach(function (id, i) {
      var it = data.items[id] || { t: id };
      var hit = r.positives.indexOf(id) >= 0;
      out += "<div class=\"cand" + (hit ? " hit" : "") + "\" data-id=\"" + esc(id) + "\" title=\"" + esc(id) + "\">"
        + "<span class=\"rank\">" + (i + 1) + "</span> <span class=\"score\">" + r.scores[i].toFixed(3) + "</span>"
        + itemHtml(it) + "</div>";
    });
    return out + "</div>";
  }
  function badge(hit) { return "<span class=\"badge " + (hit ? "hit" : "miss") + "\">" + (hit ? "hit" : "miss") + "@" + state.cut + "</span>"; }
  function queryHtml(q) {
    var side = "<div class=\"qside\"><div class=\"qid\">" + esc(q.qid) + "</div>" + itemHtml(q)
      + (q.ins ? "<div class=\"note\">" + esc(q.ins) + "</div>" : "")
      + "<div class=\"note\">" + esc(q.task || "") + " " + esc(q.mod || "") + "</div>";
    if (!cmp) return "<div class=\"query\" data-qid=\"" + esc(q.qid) + "\">" + side + badge(q.hit[state.cut]) + "</div>" + candsHtml(q) + "</div>";
    return "<div class=\"query\" data-qid=\"" + esc(q.qid) + "\">" + side + "</div><div class=\"cmp-cols\">"
      + "<div><div class=\"run-label\">A: " + esc(data.names[0]) + " " + badge(q.a.hit[state.cut]) + "</div>" + candsHtml(q.a) + "</div>"
      + "<div><div class=\"run-label\">B: " + esc(data.names[1]) + " " + badge(q.b.hit[state.cut]) + "</div>" + candsHtml(q.b) + "</div></div></div>";
  }
  function render() {
    var shown = data.queries.filter(matches);
    var pages = Math.max(1, Math.ceil(shown.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    el("queries").innerHTML = shown.slice(state.page * PAGE, (state.page + 1) * PAGE).map(queryHtml).join("");
    el("pager").innerHTML = "<button id=\"prev\"" + (state.page ? "" : " disabled") + ">previous</button> page "
      + (state.page + 1) + " of " + pages + " <button id=\"next\"" + (state.page + 1 < pages ? "" : " disabled") + ">next</button>"
      + " <span id=\"count\" data-count=\"" + shown.length + "\">" + shown.length + " queries</span>";
    el("prev").onclick = function () { state.page--; render(); };
    el("next").onclick = function () { state.page++; render(); };
    var num = function (v) { return typeof v === "number" ? String(+v.toFixed(2)) : String(v); };
    var metric = data.metric ? data.metric + " = " + (cmp ? data.values.map(num).join(" (A) vs ") + " (B)" : num(data.value)) + "; " : "";
    el("summary").textContent = (data.benchmark || "") + " \u00b7 " + metric + data.queries.length
      + (cmp ? " queries differ of " + data.n_common + " in common" : " queries") + "; top " + data.k + " shown";
  }
  function on(id, key) { el(id).addEventListener(id === "f-text" ? "input" : "change", function (e) { state[key] = e.target.value; state.page = 0; render(); }); }
  on("f-task", "task"); on("f-mod", "mod"); on("f-cut", "cut"); on("f-hit", "hit"); on("f-side", "side"); on("f-text", "text");
  render();
})();
