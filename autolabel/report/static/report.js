// autolabel report, index page: the feature search and the feature map.
// Data comes from <script type="application/json"> blocks; every string goes into the page
// through textContent (or, for Plotly's hover text, entity-escaped first), never as HTML.
"use strict";

const MAX_RESULTS = 200;
const SVG_POINTS = 5000;  // up to this many points the map is SVG (crisp, works everywhere); above, WebGL

function readJson(id) {
  const node = document.getElementById(id);
  return node ? JSON.parse(node.textContent) : null;
}

function asObjects(table) {
  return table.rows.map((row) => Object.fromEntries(table.columns.map((name, i) => [name, row[i]])));
}

function pagePath(layer, feature) {
  return `features/${layer}-${feature}.html`;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function fillOptions(select, values) {
  for (const value of values) {
    const option = document.createElement("option");
    option.value = option.textContent = value;
    select.append(option);
  }
}

function setupSearch(features) {
  const query = document.getElementById("q");
  const layer = document.getElementById("f-layer");
  const group = document.getElementById("f-group");
  const labeled = document.getElementById("f-labeled");
  const body = document.querySelector("#results tbody");
  const count = document.getElementById("result-count");
  fillOptions(layer, [...new Set(features.map((f) => f.layer))].sort((a, b) => a - b));
  fillOptions(group, [...new Set(features.flatMap((f) => f.groups))].sort());
  for (const f of features) f.haystack = [f.label, f.cluster, ...f.groups, `L${f.layer}/${f.feature}`].join(" ").toLowerCase();

  function render() {
    const words = query.value.toLowerCase().split(/\s+/).filter(Boolean);
    const matches = features.filter((f) =>
      (!layer.value || String(f.layer) === layer.value) &&
      (!group.value || f.groups.includes(group.value)) &&
      (!labeled.checked || f.label) &&
      words.every((w) => f.haystack.includes(w)));
    body.replaceChildren();
    for (const f of matches.slice(0, MAX_RESULTS)) {
      const row = body.insertRow();
      const link = document.createElement("a");
      link.href = pagePath(f.layer, f.feature);
      link.textContent = `L${f.layer}/${f.feature}`;
      cell(row, "").append(link);
      cell(row, f.label || "–", f.label ? "" : "muted");
      cell(row, f.score == null ? "–" : f.score.toFixed(2) + (f.unreliable ? " ⚠" : ""), f.unreliable ? "num score unreliable" : "num");
      cell(row, f.density == null ? "–" : (100 * f.density).toPrecision(2) + "%", "num");
      cell(row, f.status || "");
      cell(row, f.groups.join(", "));
      cell(row, f.cluster);
    }
    count.textContent = matches.length > MAX_RESULTS
      ? `${matches.length} features, first ${MAX_RESULTS} shown: refine the search`
      : `${matches.length} features`;
  }
  for (const input of [query, layer, group, labeled]) input.addEventListener("input", render);
  render();
}

// Plotly reads a small HTML subset in hover text; entities make labels plain text.
function plotlyText(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function webglAvailable() {
  try { return !!document.createElement("canvas").getContext("webgl"); } catch (e) { return false; }
}

function setupMap(points, clusterNames, features) {
  const node = document.getElementById("feature-map");
  const byKey = new Map(features.map((f) => [`${f.layer}-${f.feature}`, f]));
  const type = points.length > SVG_POINTS && webglAvailable() ? "scattergl" : "scatter";

  function category(p, colourBy) {
    const f = byKey.get(`${p.layer}-${p.feature}`) || { groups: [] };
    if (colourBy === "layer") return `layer ${p.layer}`;
    if (colourBy === "group") return f.groups[0] || "no group";
    if (p.cluster == null) return "unclustered";
    return clusterNames[p.cluster] ? `${p.cluster}: ${clusterNames[p.cluster]}` : `cluster ${p.cluster}`;
  }

  function draw(colourBy) {
    const traces = new Map();
    for (const p of points) {
      const name = category(p, colourBy);
      if (!traces.has(name)) traces.set(name, { type, mode: "markers", name: plotlyText(name), x: [], y: [], text: [], customdata: [],
                                                hovertemplate: "%{text}<extra></extra>", marker: { size: 6, opacity: 0.8 } });
      const t = traces.get(name);
      const f = byKey.get(`${p.layer}-${p.feature}`);
      t.x.push(p.x); t.y.push(p.y);
      t.text.push(plotlyText(`L${p.layer}/${p.feature} ${f && f.label ? f.label : "(unlabeled)"}`));
      t.customdata.push(pagePath(p.layer, p.feature));
    }
    const layout = { margin: { l: 30, r: 10, t: 10, b: 30 }, hovermode: "closest", legend: { font: { size: 11 } },
                     xaxis: { zeroline: false }, yaxis: { zeroline: false } };
    const sorted = [...traces.values()].sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }));
    Plotly.react(node, sorted, layout, { displaylogo: false, responsive: true });
  }

  draw("cluster");
  node.on("plotly_click", (event) => {
    const point = event.points && event.points[0];
    if (point && point.customdata) window.location.href = point.customdata;
  });
  document.getElementById("map-colour").addEventListener("change", (e) => draw(e.target.value));
}

document.addEventListener("DOMContentLoaded", () => {
  const search = readJson("search-data");
  const features = search ? asObjects(search) : [];
  if (search) setupSearch(features);
  const map = readJson("map-data");
  if (map && map.rows.length && window.Plotly) setupMap(asObjects(map), map.clusters, features);
});
