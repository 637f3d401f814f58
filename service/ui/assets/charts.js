// Small SVG charts for the dashboard: line charts, grouped bars, reliability diagrams and class-count bars.
// Each function returns a <figure> holding an <svg> (role="img" with a text label) and its legend; text is
// always set with textContent, never parsed as HTML.
"use strict";

const Charts = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const W = 560, H = 260, M = { top: 26, right: 14, bottom: 38, left: 52 };
  const COLORS = { overall: "#3a3f4b", many: "#2f6db5", medium: "#e08a1e", few: "#c23b3b" };
  const GAP = "#14171f";  // the reliability gap: dark on every group's colour
  const PALETTE = ["#2457c5", "#c23b3b", "#24864a", "#e08a1e", "#7b4bb7", "#1a9aa0", "#8a6d3b", "#d6589b"];

  function el(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceTicks(lo, hi, count = 5) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toFixed(10));
    return ticks;
  }

  function frame(label, title) {
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": label });
    if (title) svg.appendChild(el("text", { x: M.left, y: 16, class: "title" }, title));
    return svg;
  }

  function axes(svg, x, y, xTicks, yTicks, xFormat, yFormat, xLabel, yLabel) {
    const g = el("g", { class: "axes" });
    for (const t of yTicks) {
      const py = y(t);
      g.appendChild(el("line", { x1: M.left, x2: W - M.right, y1: py, y2: py, stroke: "#e6e8ec" }));
      g.appendChild(el("text", { x: M.left - 6, y: py + 4, "text-anchor": "end" }, yFormat(t)));
    }
    for (const t of xTicks) {
      g.appendChild(el("text", { x: x(t), y: H - M.bottom + 15, "text-anchor": "middle" }, xFormat(t)));
    }
    g.appendChild(el("line", { x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom, stroke: "#9aa1ae" }));
    if (xLabel) g.appendChild(el("text", { x: (M.left + W - M.right) / 2, y: H - 6, "text-anchor": "middle" }, xLabel));
    if (yLabel) {
      g.appendChild(el("text", { x: 12, y: (M.top + H - M.bottom) / 2, "text-anchor": "middle",
        transform: `rotate(-90 12 ${(M.top + H - M.bottom) / 2})` }, yLabel));
    }
    svg.appendChild(g);
  }

  function legend(items) {
    const box = document.createElement("div");
    box.className = "legend";
    for (const { name, color } of items) {
      const item = document.createElement("span");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = color;
      item.append(swatch, name);
      box.appendChild(item);
    }
    return box;
  }

  function figure(svg, items) {
    const fig = document.createElement("figure");
    fig.className = "panel";
    fig.style.margin = "0";
    fig.appendChild(svg);
    if (items && items.length) fig.appendChild(legend(items));
    return fig;
  }

  const percent = (v) => `${(100 * v).toFixed(0)}%`;

  // series: [{name, color?, points: [[x, y], ...]}]; y may be null (a gap). markers: [{x, label}] (dashed lines).
  // integerX: ticks on whole numbers only (epochs); xMin: the axis never starts below it (rho >= 0)
  function line({ title, label, series, xLabel, yLabel, yFormat = (v) => `${+v.toPrecision(3)}`,
                  xFormat = (v) => `${v}`, markers = [], yMin, yMax, xMin, integerX = false, key,
                  empty = "no data yet" }) {
    const svg = frame(label || title, title);
    if (key) svg.setAttribute("data-chart", key);
    const all = series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
    if (!all.length) {
      svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, empty));
      return figure(svg, []);
    }
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    let x0 = Math.min(...xs), x1 = Math.max(...xs);
    if (x0 === x1) {  // one x: a little room either side, in the scale of the value
      const room = integerX ? 1 : Math.abs(x0) * 0.5 || 0.5;
      x0 -= room;
      x1 += room;
    }
    if (xMin !== undefined) x0 = Math.max(x0, xMin);
    let y0 = yMin !== undefined ? yMin : Math.min(...ys), y1 = yMax !== undefined ? yMax : Math.max(...ys);
    if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 0.1; y1 += Math.abs(y1) * 0.1 || 0.1; }
    const pad = (y1 - y0) * 0.06;
    if (yMin === undefined) y0 -= pad;
    if (yMax === undefined) y1 += pad;
    const x = (v) => M.left + (v - x0) / (x1 - x0) * (W - M.left - M.right);
    const y = (v) => H - M.bottom - (v - y0) / (y1 - y0) * (H - M.top - M.bottom);
    const xTicks = niceTicks(x0, x1, 6).filter((t) => !integerX || Number.isInteger(t));
    axes(svg, x, y, xTicks, niceTicks(y0, y1), xFormat, yFormat, xLabel, yLabel);
    for (const m of markers) {
      svg.appendChild(el("line", { x1: x(m.x), x2: x(m.x), y1: M.top, y2: H - M.bottom, stroke: "#9aa1ae",
        "stroke-dasharray": "4 3" }));
      svg.appendChild(el("text", { x: x(m.x) + 4, y: M.top + 10 }, m.label));
    }
    const items = [];
    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      items.push({ name: s.name, color });
      const g = el("g", { "data-series": s.name });
      let d = "", pen = false;
      for (const [px, py] of s.points) {
        if (py === null || py === undefined) { pen = false; continue; }
        d += `${pen ? "L" : "M"}${x(px).toFixed(1)},${y(py).toFixed(1)}`;
        pen = true;
      }
      g.appendChild(el("path", { d, fill: "none", stroke: color, "stroke-width": 2 }));
      for (const [px, py] of s.points) {
        if (py === null || py === undefined) continue;
        const dot = el("circle", { cx: x(px).toFixed(1), cy: y(py).toFixed(1), r: 2.6, fill: color });
        dot.appendChild(el("title", {}, `${s.name}: ${xFormat(px)} → ${yFormat(py)}`));
        g.appendChild(dot);
      }
      svg.appendChild(g);
    });
    return figure(svg, items);
  }

  // categories: ["many", ...]; series: [{name, color?, values: [v per category]}] (null: no bar)
  function bars({ title, label, categories, series, yFormat = percent, yMax, key }) {
    const svg = frame(label || title, title);
    if (key) svg.setAttribute("data-chart", key);
    const values = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined);
    const top = yMax !== undefined ? yMax : Math.max(0.01, ...values) * 1.08;
    const y = (v) => H - M.bottom - v / top * (H - M.top - M.bottom);
    const band = (W - M.left - M.right) / Math.max(1, categories.length);
    const inner = band * 0.8 / Math.max(1, series.length);
    axes(svg, () => 0, y, [], niceTicks(0, top), () => "", yFormat);
    categories.forEach((c, ci) => {
      svg.appendChild(el("text", { x: M.left + band * (ci + 0.5), y: H - M.bottom + 15, "text-anchor": "middle" }, c));
    });
    const items = [];
    series.forEach((s, si) => {
      const color = s.color || PALETTE[si % PALETTE.length];
      items.push({ name: s.name, color });
      const g = el("g", { "data-series": s.name });
      s.values.forEach((v, ci) => {
        if (v === null || v === undefined) return;
        const bx = M.left + band * ci + band * 0.1 + inner * si;
        const bar = el("rect", { x: bx.toFixed(1), y: y(v).toFixed(1), width: Math.max(1, inner - 2).toFixed(1),
          height: Math.max(0, H - M.bottom - y(v)).toFixed(1), fill: color });
        bar.appendChild(el("title", {}, `${s.name}, ${categories[ci]}: ${yFormat(v)}`));
        g.appendChild(bar);
      });
      svg.appendChild(g);
    });
    return figure(svg, items);
  }

  // bins: [{lower, upper, count, accuracy, confidence}] of one group; the diagonal is perfect calibration
  function reliability({ title, bins, color = COLORS.overall, key }) {
    const svg = frame(`reliability diagram: ${title}`, title);
    if (key) svg.setAttribute("data-chart", key);
    const x = (v) => M.left + v * (W - M.left - M.right);
    const y = (v) => H - M.bottom - v * (H - M.top - M.bottom);
    const ticks = [0, 0.2, 0.4, 0.6, 0.8, 1];
    axes(svg, x, y, ticks, ticks, (v) => v.toFixed(1), (v) => v.toFixed(1), "confidence", "accuracy");
    const g = el("g", { "data-series": "bins" });
    if (!bins.some((b) => b.count)) {
      svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no test images in this group"));
    }
    for (const b of bins) {
      if (!b.count) continue;
      const bx = x(b.lower) + 1, bw = x(b.upper) - x(b.lower) - 2;
      const bar = el("rect", { x: bx.toFixed(1), y: y(b.accuracy).toFixed(1), width: bw.toFixed(1),
        height: (y(0) - y(b.accuracy)).toFixed(1), fill: color, "fill-opacity": 0.85 });
      bar.appendChild(el("title", {}, `confidence ${b.lower.toFixed(2)}–${b.upper.toFixed(2)}: ${b.count} images, ` +
        `accuracy ${percent(b.accuracy)}, mean confidence ${percent(b.confidence)}`));
      g.appendChild(bar);
      const gap = el("line", { x1: bx + bw / 2, x2: bx + bw / 2, y1: y(b.accuracy), y2: y(b.confidence),
        stroke: GAP, "stroke-width": 2 });
      g.appendChild(gap);
    }
    svg.appendChild(g);
    svg.appendChild(el("line", { x1: x(0), y1: y(0), x2: x(1), y2: y(1), stroke: "#9aa1ae", "stroke-dasharray": "4 3" }));
    return figure(svg, [{ name: "accuracy per bin", color }, { name: "gap to the bin's mean confidence", color: GAP }]);
  }

  // one bar per class in label order, coloured by its group: the long tail at a glance
  function classCounts({ title, counts, groups, names, key }) {
    const svg = frame(title, title);
    if (key) svg.setAttribute("data-chart", key);
    const top = Math.max(1, ...counts) * 1.05;
    const y = (v) => H - M.bottom - v / top * (H - M.top - M.bottom);
    const band = (W - M.left - M.right) / Math.max(1, counts.length);
    axes(svg, () => 0, y, [], niceTicks(0, top), () => "", (v) => `${v}`, `${counts.length} classes, in label order`,
      "training images");
    const g = el("g", { "data-series": "classes" });
    counts.forEach((n, i) => {
      const bar = el("rect", { x: (M.left + band * i).toFixed(2), y: y(n).toFixed(1),
        width: Math.max(0.6, band - (band > 4 ? 1 : 0)).toFixed(2), height: (H - M.bottom - y(n)).toFixed(1),
        fill: COLORS[groups[i]] || COLORS.overall, "data-group": groups[i] });
      bar.appendChild(el("title", {}, `${names[i]}: ${n} training images (${groups[i]})`));
      g.appendChild(bar);
    });
    svg.appendChild(g);
    return figure(svg, ["many", "medium", "few"].map((name) => ({ name, color: COLORS[name] })));
  }

  return { line, bars, reliability, classCounts, COLORS, PALETTE, percent };
})();
