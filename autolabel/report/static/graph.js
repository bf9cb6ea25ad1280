// autolabel report, graph page: the kept nodes of an attribution graph by layer and position, as SVG, or
// (the supernode view) each cluster's features as one node at its members' mean place. Data comes from the <script type="application/json" id="graph-data"> block; every string reaches the page
// through textContent, never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLUMN = 110, ROW = 56, RADIUS = 7, MARGIN = 40;
const PALETTE = ["#0969da", "#1a7f37", "#8250df", "#bc4c00", "#bf3989", "#0a7ea4", "#9a6700", "#cf222e", "#57606a", "#4d2d00"];

function readJson(id) {
  const node = document.getElementById(id);
  return node ? JSON.parse(node.textContent) : null;
}

function svgElement(name, attributes, parent) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (parent) parent.append(element);
  return element;
}

// Row 0: token embeddings; rows 1..n_layers: layers (feature and error nodes); row n_layers + 1: target logits.
function rowOf(node, nLayers) {
  if (node.kind === "embedding") return 0;
  if (node.kind === "logit") return nLayers + 1;
  return node.layer + 1;
}

function colourKey(node, by) {
  if (node.kind !== "feature") return node.kind;
  if (by === "layer") return `layer ${node.layer}`;
  if (by === "group") return node.groups[0] || "no group";
  return node.cluster || "no cluster";
}

function layout(data) {
  const cells = new Map();
  for (const node of data.nodes) {
    const key = `${rowOf(node, data.n_layers)}:${node.pos}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(node);
  }
  const rows = data.n_layers + 2;
  for (const members of cells.values()) {
    members.sort((a, b) => b.influence - a.influence);
    const step = Math.min(2.4 * RADIUS, (COLUMN - 2 * RADIUS) / Math.max(members.length, 1));
    members.forEach((node, i) => {
      node.x = MARGIN + node.pos * COLUMN + COLUMN / 2 + (i - (members.length - 1) / 2) * step;
      node.y = MARGIN + (rows - 1 - rowOf(node, data.n_layers)) * ROW + ROW / 2;
    });
  }
  const byId = new Map(data.nodes.map((n) => [n.id, n]));
  for (const group of data.supernodes) {
    const members = group.members.map((id) => byId.get(id));
    group.x = members.reduce((sum, n) => sum + n.x, 0) / members.length;
    group.y = members.reduce((sum, n) => sum + n.y, 0) / members.length;
  }
  return { width: 2 * MARGIN + data.tokens.length * COLUMN, height: 2 * MARGIN + rows * ROW };
}

// What a view draws: every node and edge, or supernodes, the nodes outside any cluster and the summed edges.
function shown(data, view) {
  if (view !== "supernodes") return { nodes: data.nodes, edges: data.edges };
  const grouped = new Set(data.supernodes.flatMap((group) => group.members));
  return { nodes: [...data.nodes.filter((n) => !grouped.has(n.id)), ...data.supernodes], edges: data.super_edges };
}

function nodeName(n) {
  if (n.kind === "supernode") return `[${n.name}]`;
  if (n.kind === "feature") return `L${n.layer}/${n.feature}@${n.pos}`;
  if (n.kind === "error") return `error L${n.layer}@${n.pos}`;
  return n.kind === "logit" ? `logit ${JSON.stringify(n.token)}` : `${JSON.stringify(n.token)}@${n.pos}`;
}

// The info panel on a click of a supernode: its features, each a link to its page.
function listMembers(group, byId, info) {
  const head = document.createElement("div");
  head.textContent = `${group.name}: ${group.count} feature${group.count === 1 ? "" : "s"}`;
  const list = document.createElement("ul");
  list.className = "graph-members";
  for (const id of group.members) {
    const member = byId.get(id);
    const link = document.createElement("a");
    link.href = member.href;
    link.textContent = `${nodeName(member)} ${member.label || "(unlabeled)"}`;
    const item = document.createElement("li");
    item.append(link);
    list.append(item);
  }
  info.replaceChildren(head, list);
}

function describe(node, byId, edges) {
  const lines = [];
  if (node.kind === "feature") {
    lines.push(`L${node.layer}/${node.feature} at position ${node.pos}: ${node.label || "(unlabeled)"}`);
    const score = node.score == null ? "no score" : `score ${node.score.toFixed(2)}${node.unreliable ? " (unreliable)" : ""}`;
    lines.push(`${score}; activation ${node.activation.toPrecision(3)}; influence ${node.influence.toPrecision(3)}`);
    if (node.cluster || node.groups.length) lines.push([node.cluster, ...node.groups].filter(Boolean).join(", "));
  } else if (node.kind === "supernode") {
    lines.push(`${node.name}: ${node.count} feature${node.count === 1 ? "" : "s"} (click to list them)`);
    lines.push(`summed edge weight in ${node.weight_in.toFixed(3)}, out ${node.weight_out.toFixed(3)}`);
  } else if (node.kind === "error") {
    lines.push(`error node, layer ${node.layer}, position ${node.pos}: what the transcoder misses`);
  } else if (node.kind === "embedding") {
    lines.push(`token ${JSON.stringify(node.token)} at position ${node.pos}`);
  } else {
    lines.push(`target logit ${JSON.stringify(node.token)}, p = ${node.probability.toFixed(3)}`);
  }
  const name = (id) => nodeName(byId.get(id));
  const strongest = (list) => list.sort((a, b) => Math.abs(b[2]) - Math.abs(a[2])).slice(0, 6);
  const incoming = strongest(edges.filter((e) => e[1] === node.id)).map((e) => `${name(e[0])} ${e[2].toFixed(3)}`);
  const outgoing = strongest(edges.filter((e) => e[0] === node.id)).map((e) => `${name(e[1])} ${e[2].toFixed(3)}`);
  if (incoming.length) lines.push(`from: ${incoming.join(", ")}`);
  if (outgoing.length) lines.push(`to: ${outgoing.join(", ")}`);
  return lines;
}

function draw(data, colourBy, view) {
  const container = document.getElementById("graph");
  const info = document.getElementById("graph-info");
  const size = layout(data);
  const byId = new Map([...data.nodes, ...data.supernodes].map((n) => [n.id, n]));
  const { nodes, edges } = shown(data, view);
  const svg = svgElement("svg", { width: size.width, height: size.height, viewBox: `0 0 ${size.width} ${size.height}`,
                                  role: "img", "aria-label": "attribution graph" });
  data.tokens.forEach((token, pos) => {
    const label = svgElement("text", { x: MARGIN + pos * COLUMN + COLUMN / 2, y: size.height - 8, "text-anchor": "middle",
                                       class: "graph-token" }, svg);
    label.textContent = token;
  });
  const maxWeight = Math.max(1e-12, ...edges.map((e) => Math.abs(e[2])));
  const lines = new Map();
  const edgeLayer = svgElement("g", { class: "graph-edges" }, svg);
  for (const [source, target, weight] of edges) {
    const a = byId.get(source), b = byId.get(target);
    if (!a || !b) continue;
    const line = svgElement("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, class: weight >= 0 ? "pos" : "neg",
                                      "stroke-width": (0.5 + 4 * Math.abs(weight) / maxWeight).toFixed(2) }, edgeLayer);
    for (const id of [source, target]) {
      if (!lines.has(id)) lines.set(id, []);
      lines.get(id).push(line);
    }
  }
  // Colours follow the nodes' order in either view; supernodes take their cluster's colour.
  const by = view === "supernodes" ? "cluster" : colourBy;
  const colours = new Map();
  for (const node of data.nodes) {
    const key = colourKey(node, by);
    if (!colours.has(key)) colours.set(key, PALETTE[colours.size % PALETTE.length]);
  }
  const nodeLayer = svgElement("g", { class: "graph-nodes" }, svg);
  for (const node of nodes) {
    const radius = node.kind === "supernode" ? RADIUS + 3 * Math.sqrt(node.count) : RADIUS;
    const shape = node.kind === "feature" || node.kind === "supernode"
      ? svgElement("circle", { cx: node.x, cy: node.y, r: radius }, nodeLayer)
      : svgElement("rect", { x: node.x - RADIUS, y: node.y - RADIUS, width: 2 * RADIUS, height: 2 * RADIUS }, nodeLayer);
    shape.setAttribute("class", `node ${node.kind}${node.unreliable ? " unreliable" : ""}`);
    shape.setAttribute("data-id", node.id);
    if (node.kind === "feature") shape.setAttribute("fill", colours.get(colourKey(node, by)));
    if (node.kind === "supernode") {
      shape.setAttribute("fill", colours.get(node.name));
      const count = svgElement("text", { x: node.x, y: node.y + 4, "text-anchor": "middle", class: "graph-count" }, nodeLayer);
      count.textContent = String(node.count);
    }
    const title = svgElement("title", {}, shape);
    title.textContent = node.kind === "feature" ? `L${node.layer}/${node.feature} ${node.label || "(unlabeled)"}`
      : node.kind === "supernode" ? `${node.name} (${node.count})` : node.id;
    shape.addEventListener("mouseenter", () => {
      info.replaceChildren(...describe(node, byId, edges).map((text) => {
        const line = document.createElement("div");
        line.textContent = text;
        return line;
      }));
      for (const line of lines.get(node.id) || []) line.classList.add("hot");
    });
    shape.addEventListener("mouseleave", () => {
      for (const line of lines.get(node.id) || []) line.classList.remove("hot");
    });
    if (node.href) shape.addEventListener("click", () => { window.location.href = node.href; });
    if (node.kind === "supernode") shape.addEventListener("click", () => listMembers(node, byId, info));
  }
  container.replaceChildren(svg);
}

document.addEventListener("DOMContentLoaded", () => {
  const data = readJson("graph-data");
  if (!data) return;
  const colour = document.getElementById("graph-colour"), view = document.getElementById("graph-view");
  const redraw = () => draw(data, colour.value, view.value);
  redraw();
  colour.addEventListener("change", redraw);
  view.addEventListener("change", redraw);
});
