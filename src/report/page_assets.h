// The report page's style sheet and script, inlined into every page (no network, opens from disk). The script reads
// the data block (#report-data) and builds the photo grids with textContent: names are never parsed as HTML.
#pragma once

namespace loratune::report_assets {

inline constexpr const char* kStyle = R"CSS(
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans KR", "Noto Sans CJK KR", "NanumGothic",
       "Malgun Gothic", sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 16px 32px; color: #222; }
h1 { margin-bottom: 0; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
.muted { color: #666; } footer { margin-top: 32px; font-size: 0.9em; }
table { border-collapse: collapse; } th, td { padding: 3px 8px; text-align: right; } th { text-align: left; }
table.summary td, table.settings td { text-align: left; } table.settings tr.differs { background: #fff3cd; }
table.settings { table-layout: fixed; width: 100%; } table.settings td, table.settings th { overflow-wrap: anywhere; }
table.per-class tbody tr:nth-child(odd), table.summary tbody tr:nth-child(odd) { background: #f6f6f6; }
table.numbers td { text-align: center; padding: 6px 18px; } .value { font-size: 1.6em; font-weight: 600; }
.label { color: #666; font-size: 0.85em; }
.columns { display: flex; flex-wrap: wrap; gap: 32px; } .charts { display: flex; flex-wrap: wrap; gap: 12px; }
.scroll { overflow-x: auto; }
table.confusion td.cell { cursor: pointer; min-width: 2.2em; text-align: center; border: 1px solid #e4e4e4; }
table.confusion td.dark { color: #fff; } table.confusion td.diagonal { font-weight: 600; }
table.confusion td.selected { outline: 3px solid #d62728; } table.confusion th.predicted { writing-mode: vertical-rl; }
.better { color: #2ca02c; } .worse { color: #d62728; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; }
figure.tile { margin: 0; width: 136px; font-size: 0.78em; border: 1px solid #ddd; border-radius: 4px; padding: 4px; }
figure.tile img, .no-thumb { width: 128px; height: 128px; object-fit: contain; background: #f0f0f0; display: block; }
.no-thumb { display: flex; align-items: center; justify-content: center; color: #888; }
figcaption div { overflow-wrap: anywhere; } figcaption .name { color: #555; } figcaption .right { color: #2a7d2a; } figcaption .wrong { color: #b22; }
svg.chart { font-size: 11px; } svg .title { font-size: 13px; font-weight: 600; } svg .grid { stroke: #e6e6e6; }
svg .frame { fill: none; stroke: #999; } svg .bar { fill: #1f77b4; } svg .gap { fill: rgba(214, 39, 40, 0.35); }
svg .diagonal { stroke: #444; stroke-dasharray: 4 3; } svg .muted { fill: #888; }
)CSS";

inline constexpr const char* kScript = R"JS(
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("report-data").textContent);
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function pct(v) { return (100 * v).toFixed(1) + "%"; }
  function tile(ev, i, lines) {
    const p = ev.photos[i], f = el("figure", "tile");
    if (p[4] >= 0) {
      const img = el("img");
      img.src = data.thumbs[p[4]];
      img.alt = "";
      f.appendChild(img);
    } else {
      f.appendChild(el("div", "no-thumb", "no thumbnail"));
    }
    const c = el("figcaption");
    c.appendChild(el("div", "name", p[0]));
    for (const [cls, text] of lines) c.appendChild(el("div", cls, text));
    f.appendChild(c);
    return f;
  }
  function verdict(p) { return p[1] === p[2] ? "right" : "wrong"; }
  function photoTile(ev, i) {
    const p = ev.photos[i];
    return tile(ev, i, [["truth", "true: " + ev.classes[p[1]]],
                        [verdict(p), "predicted: " + ev.classes[p[2]] + " (" + pct(p[3]) + ")"]]);
  }
  function grid(container, items, make) {
    container.textContent = "";
    const shown = items.slice(0, data.maxTiles);
    for (const item of shown) container.appendChild(make(item));
    if (items.length > shown.length)
      container.appendChild(el("p", "more muted", "and " + (items.length - shown.length) + " more (predictions.csv lists every photo)"));
    if (!items.length) container.appendChild(el("p", "more muted", "none"));
  }
  function byConfidence(ev) { return (a, b) => ev.photos[b][3] - ev.photos[a][3]; }
  data.evals.forEach((ev, k) => {
    if (!ev.classes.length) return;  // retrieval alone: no photos to show
    const errors = [];
    ev.photos.forEach((p, i) => { if (p[1] !== p[2]) errors.push(i); });
    grid(document.getElementById("errors-" + k), errors.sort(byConfidence(ev)), (i) => photoTile(ev, i));
    const panel = document.getElementById("cell-photos-" + k), title = document.getElementById("cell-title-" + k);
    const cells = document.querySelectorAll("#confusion-" + k + " td.cell");
    function show(td) {
      cells.forEach((c) => c.classList.remove("selected"));
      td.classList.add("selected");
      const t = Number(td.dataset.true), q = Number(td.dataset.pred), items = [];
      ev.photos.forEach((p, i) => { if (p[1] === t && p[2] === q) items.push(i); });
      title.textContent = "true " + ev.classes[t] + ", predicted " + ev.classes[q] + ": " + items.length +
                          (items.length === 1 ? " photo" : " photos");
      grid(panel, items.sort(byConfidence(ev)), (i) => photoTile(ev, i));
    }
    cells.forEach((td) => {
      td.addEventListener("click", () => show(td));
      td.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") show(td); });
    });
  });
  const c = data.comparison;
  if (c) {
    const A = data.evals[c.a], B = data.evals[c.b];
    const make = ([i, j]) => {
      const pa = A.photos[i], pb = B.photos[j];
      return tile(A, i, [["truth", "true: " + A.classes[pa[1]]],
                         [verdict(pa), c.names[0] + ": " + A.classes[pa[2]] + " (" + pct(pa[3]) + ")"],
                         [verdict(pb), c.names[1] + ": " + B.classes[pb[2]] + " (" + pct(pb[3]) + ")"]]);
    };
    grid(document.getElementById("a-only"), c.a_only, make);
    grid(document.getElementById("b-only"), c.b_only, make);
  }
  document.body.dataset.ready = "1";
})();
)JS";

}  // namespace loratune::report_assets
