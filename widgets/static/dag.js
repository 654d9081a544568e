// The DAG widget's front end: draws the `graph` trait (laid out in Python) as SVG, sends a
// click as `selected`, and shows the `detail` trait of the selected request. No imports:
// nothing is fetched from anywhere when a notebook opens.

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function html(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function pathD(points) {
  if (points.length >= 4 && (points.length - 1) % 3 === 0) {
    const rest = points.slice(1).map((p) => `${p[0].toFixed(1)},${p[1].toFixed(1)}`).join(" ");
    return `M${points[0][0].toFixed(1)},${points[0][1].toFixed(1)} C${rest}`;
  }
  return "M" + points.map((p) => `${p[0].toFixed(1)},${p[1].toFixed(1)}`).join(" L");
}

function short(text, limit = 22) {
  return text.length <= limit ? text : text.slice(0, limit - 1) + "…";
}

function seconds(s) {
  return s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`;
}

function drawGraph(model, box, legend, status) {
  const graph = model.get("graph") || {};
  const colors = graph.colors || {};
  const selected = model.get("selected");
  legend.replaceChildren();
  for (const [state, color] of Object.entries(colors)) {
    const item = html("span", "parrot-dag-legend-item");
    const swatch = html("span", "parrot-dag-swatch");
    swatch.style.background = color;
    item.append(swatch, document.createTextNode(state));
    legend.append(item);
  }
  const counts = graph.counts || {};
  const parts = Object.entries(counts).map(([state, n]) => `${n} ${state}`);
  status.textContent = `${graph.requests || 0} requests` + (parts.length ? `: ${parts.join(", ")}` : "") +
    (graph.collapsed ? ` · ${graph.collapsed} task group(s) collapsed (click to expand)` : "") +
    (graph.layout ? ` · layout: ${graph.layout}` : "");
  const width = Math.max(graph.width || 0, 200) + 10;
  const height = Math.max(graph.height || 0, 40) + 10;
  const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "parrot-dag-svg" });
  const defs = el("defs");
  const marker = el("marker", {
    id: "parrot-dag-arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7,
    orient: "auto-start-reverse",
  });
  marker.append(el("path", { d: "M0,0 L10,5 L0,10 z", fill: "#555" }));
  defs.append(marker);
  svg.append(defs);
  const g = el("g", { transform: "translate(5,5)" });
  for (const edge of graph.edges || []) {
    g.append(el("path", {
      d: pathD(edge.points), fill: "none", stroke: "#555", "marker-end": "url(#parrot-dag-arrow)",
      "data-source": edge.source, "data-target": edge.target, class: "parrot-dag-edge",
    }));
  }
  for (const node of graph.nodes || []) {
    const item = el("g", {
      class: `parrot-dag-node parrot-dag-${node.kind}` + (node.id === selected ? " parrot-dag-selected" : ""),
      "data-node-id": node.id, "data-state": node.state, "data-kind": node.kind, "data-label": node.label,
    });
    const fill = colors[node.state] || "#fff";
    const dash = node.state === "cancelled" ? { "stroke-dasharray": "4 2" } : {};
    if (node.kind === "variable") {
      item.append(el("ellipse", { cx: node.x, cy: node.y, rx: node.w / 2, ry: node.h / 2, fill, stroke: "#444", ...dash }));
    } else {
      item.append(el("rect", {
        x: node.x - node.w / 2, y: node.y - node.h / 2, width: node.w, height: node.h, rx: 5, fill,
        stroke: "#444", "stroke-width": node.kind === "group" ? 2.5 : 1, ...dash,
      }));
    }
    const lines = node.sub ? [node.label, node.sub] : [node.label];
    lines.forEach((line, i) => {
      const dy = (i - (lines.length - 1) / 2) * 13 + 4;
      const text = el("text", {
        x: node.x, y: node.y + dy, "text-anchor": "middle", "font-size": 11, "font-family": "sans-serif",
        "font-weight": i === 0 && node.kind !== "variable" ? "bold" : "normal",
      }, short(line));
      item.append(text);
    });
    item.append(el("title", {}, `${node.label}\n${node.sub || node.state}`));
    // A message, not a trait: a second click on the same node (a group's, to fold it back) must reach Python too.
    item.addEventListener("click", () => model.send({ event: "click", node: node.id }));
    g.append(item);
  }
  svg.append(g);
  box.replaceChildren(svg);
}

function drawDetail(model, panel) {
  const d = model.get("detail") || {};
  panel.replaceChildren();
  if (!d.request_id) {
    panel.append(html("div", "parrot-dag-hint", "Click a request or a variable to see its prompt, output and timings."));
    return;
  }
  panel.append(html("div", "parrot-dag-detail-title", `${d.function || "request"} · ${d.state || ""}`));
  const facts = [];
  if (d.engine_id !== undefined && d.engine_id >= 0) facts.push(`engine ${d.engine_id}`);
  if (d.perf) facts.push(`${d.perf}-critical`);
  if (d.queue_s) facts.push(`queued ${seconds(d.queue_s)}`);
  if (d.prefill_s) facts.push(`prefill ${seconds(d.prefill_s)}`);
  if (d.decode_s) facts.push(`decode ${seconds(d.decode_s)}`);
  if (d.ttft_s) facts.push(`first token ${seconds(d.ttft_s)}`);
  if (d.exec_s) facts.push(`ran ${seconds(d.exec_s)}`);
  if (d.prompt_tokens) facts.push(`${d.cached_tokens || 0}/${d.prompt_tokens} prompt tokens cached`);
  if (d.output_tokens) facts.push(`${d.output_tokens} output tokens`);
  panel.append(html("div", "parrot-dag-facts", facts.join(" · ")));
  if (d.loading) panel.append(html("div", "parrot-dag-hint", "loading…"));
  if (d.error) panel.append(html("div", "parrot-dag-error", d.error));
  for (const [name, text] of Object.entries(d.outputs || {})) {
    panel.append(html("div", "parrot-dag-label", `output ${name}`));
    const pre = html("pre", "parrot-dag-output", text);
    pre.dataset.output = name;
    panel.append(pre);
  }
  if (d.prompt) {
    const more = html("details", "parrot-dag-prompt");
    more.append(html("summary", "", "filled prompt"), html("pre", "", d.prompt));
    panel.append(more);
  }
}

export default {
  render({ model, el: root }) {
    root.classList.add("parrot-dag");
    const title = html("div", "parrot-dag-title");
    const note = html("div", "parrot-dag-note");
    const legend = html("div", "parrot-dag-legend");
    const status = html("div", "parrot-dag-status");
    const body = html("div", "parrot-dag-body");
    const box = html("div", "parrot-dag-graph");
    const panel = html("div", "parrot-dag-detail");
    body.append(box, panel);
    root.append(title, note, legend, status, body);
    const redraw = () => {
      title.textContent = model.get("title");
      note.textContent = model.get("note");
      note.style.display = model.get("note") ? "" : "none";
      drawGraph(model, box, legend, status);
    };
    redraw();
    drawDetail(model, panel);
    model.on("change:graph", redraw);
    model.on("change:note", redraw);
    model.on("change:selected", redraw);
    model.on("change:detail", () => drawDetail(model, panel));
  },
};
