// Run page: draws the curves of metrics.jsonl as SVG and, while the run is running, asks for the
// lines written since the last request every few seconds. Everything is built with DOM calls
// (no HTML strings), so the page's CSP can allow this file alone.
(function () {
  "use strict";
  const box = document.getElementById("charts");
  if (!box) return;
  const NS = "http://www.w3.org/2000/svg";
  const W = 420, H = 240, M = { l: 56, r: 14, t: 10, b: 30 };
  const charts = Array.from(box.querySelectorAll(".chart"));
  const pollMs = Number(box.dataset.pollMs) || 2000;
  let points = {};  // metrics.jsonl key -> [[step, value], ...]
  let next = 0;     // lines of metrics.jsonl already drawn

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    parent.appendChild(node);
    return node;
  }

  function text(x, y, value, anchor, parent) {
    el("text", { x: x, y: y, "text-anchor": anchor }, parent).textContent = value;
  }

  function fmt(v) {
    const a = Math.abs(v);
    return a !== 0 && (a >= 1e5 || a < 1e-3) ? v.toExponential(2) : String(+v.toPrecision(4));
  }

  function add(records) {
    for (const r of records) {
      if (typeof r.step !== "number") continue;
      for (const chart of charts) {
        const v = r[chart.dataset.key];
        if (typeof v === "number" && isFinite(v)) (points[chart.dataset.key] ||= []).push([r.step, v]);
      }
    }
  }

  function range(values) {
    let lo = values.reduce((a, b) => Math.min(a, b)), hi = values.reduce((a, b) => Math.max(a, b));
    if (lo === hi) { const pad = Math.abs(lo) * 0.1 || 1; lo -= pad; hi += pad; }
    return [lo, hi];
  }

  function draw(chart) {
    const pts = points[chart.dataset.key] || [];
    chart.replaceChildren();
    if (!pts.length) return;
    const title = document.createElement("h3");
    title.textContent = chart.dataset.label;
    chart.appendChild(title);
    const svg = el("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
                            "aria-label": chart.dataset.label, "data-points": pts.length }, chart);
    const [x0, x1] = range(pts.map((p) => p[0])), [y0, y1] = range(pts.map((p) => p[1]));
    const sx = (x) => M.l + ((x - x0) / (x1 - x0)) * (W - M.l - M.r);
    const sy = (y) => H - M.b - ((y - y0) / (y1 - y0)) * (H - M.t - M.b);
    el("rect", { x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b, fill: "none", stroke: "#d1d9e0" }, svg);
    text(M.l - 4, M.t + 10, fmt(y1), "end", svg);
    text(M.l - 4, H - M.b, fmt(y0), "end", svg);
    text(M.l, H - 12, fmt(x0), "start", svg);
    text(W - M.r, H - 12, fmt(x1), "end", svg);
    text((M.l + W - M.r) / 2, H - 4, "step", "middle", svg);
    el("polyline", { points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "), fill: "none",
                     stroke: "#0969da", "stroke-width": 1.5 }, svg);
    if (chart.dataset.key.startsWith("eval_") || pts.length <= 60) {
      for (const [x, y] of pts) {
        const dot = el("circle", { cx: sx(x), cy: sy(y), r: 2.5, fill: "#0969da" }, svg);
        el("title", {}, dot).textContent = `step ${x}: ${fmt(y)}`;  // shown on hover
      }
    }
  }

  function showState(state, step) {
    const badge = document.getElementById("state");
    badge.textContent = state;
    badge.className = `state-${state}`;
    if (step !== null && step !== undefined) document.getElementById("step").textContent = String(step);
    if (state !== "running") document.getElementById("curves-note").textContent = "";
  }

  async function poll() {
    let state = box.dataset.state;
    try {
      const response = await fetch(`${box.dataset.src}?since=${next}`, { cache: "no-store" });
      if (response.ok) {
        const data = await response.json();
        if (data.next < next) { points = {}; next = 0; setTimeout(poll, 0); return; }  // rewritten (a resumed run)
        add(data.records);
        next = data.next;
        const last = data.records.filter((r) => typeof r.step === "number").pop();
        if (data.records.length) charts.forEach(draw);
        state = data.state;
        showState(state, last ? last.step : data.step);  // the newest line is fresher than the heartbeat
        box.dataset.state = state;
      }
    } catch (err) {
      // the board was stopped or restarted: keep trying while the run was running
    }
    if (state === "running") setTimeout(poll, pollMs);
  }

  poll();
})();
