// gaikan inspection dashboard: plain JS, no build step, no chart library (the charts are SVG drawn
// here). Talks to the JSON API with the X-API-Key header (kept in localStorage); images are fetched
// with the header too and shown through blob: URLs. Sections: key figures + drift flag, yield / NG
// rate over time, score histogram against the threshold, the review queue, the inspection grid.
"use strict";
const PAGE = 48;
let offset = 0;
let total = 0;
let authRequired = true;
const blobUrls = new Map();  // api path -> object URL (images never change: cache for the session)

const $ = (id) => document.getElementById(id);

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!res.ok) {
    let detail = res.statusText;
    try {
      const body = await res.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch (e) { /* not JSON */ }
    throw new Error(`${res.status}: ${detail}`);
  }
  return res;
}

async function imageUrl(path) {
  if (!path) return "";
  if (!blobUrls.has(path)) {
    const res = await api(path);
    blobUrls.set(path, URL.createObjectURL(await res.blob()));
  }
  return blobUrls.get(path);
}

function setImage(img, path) {
  img.removeAttribute("src");
  if (!path) { img.alt = "(none)"; return; }
  imageUrl(path).then((url) => { img.src = url; }).catch((e) => showError(e.message));
}

function fmt(x, digits = 4) {
  return x === null || x === undefined ? "–" : Number(x).toPrecision(digits);
}

function card(item) {
  const div = document.createElement("div");
  div.className = `card ${item.verdict}`;
  div.dataset.id = item.id;
  div.dataset.verdict = item.verdict;
  div.innerHTML = `
    <div class="pics"><img class="thumb" alt="image"><img class="heatmap" alt="heat map"></div>
    <div class="line"><span class="verdict ${item.verdict}"></span><span class="score"></span></div>
    <div class="line muted"><span class="part"></span><span class="time"></span></div>`;
  div.querySelector(".verdict").textContent = item.verdict;
  div.querySelector(".score").textContent = `score ${fmt(item.score)} / ${fmt(item.threshold)}`
    + (item.p_value !== null ? `, p ${fmt(item.p_value, 2)}` : "");
  div.querySelector(".part").textContent = item.part_id ? `part ${item.part_id}` : `#${item.id}`;
  div.querySelector(".time").textContent = item.created_utc.replace("T", " ").slice(0, 19);
  setImage(div.querySelector(".thumb"), item.links.thumb);
  setImage(div.querySelector(".heatmap"), item.links.heatmap);
  div.addEventListener("click", () => showDetail(item.id));
  return div;
}

async function refresh() {
  const filter = $("filter").value;
  const params = new URLSearchParams({ limit: PAGE, offset });
  if (filter === "NG" || filter === "OK") params.set("verdict", filter);
  params.set("order", filter === "" ? "ng_first" : "newest");
  try {
    const data = await (await api(`/v1/inspections?${params}`)).json();
    total = data.total;
    const grid = $("grid");
    grid.replaceChildren(...data.items.map(card));
    $("count").textContent = `${data.total} inspection${data.total === 1 ? "" : "s"}`
      + (data.total > PAGE ? ` (showing ${offset + 1}–${offset + data.items.length})` : "");
    $("prev").disabled = offset === 0;
    $("next").disabled = offset + PAGE >= total;
    showError("");
  } catch (e) {
    showError(e.message.startsWith("401") ? `${e.message} — enter the API key above` : e.message);
  }
}

async function showDetail(id) {
  try {
    const item = await (await api(`/v1/inspections/${id}`)).json();
    $("detail-title").textContent = `#${item.id} ${item.verdict}` + (item.part_id ? ` — part ${item.part_id}` : "");
    setImage($("detail-image"), item.links.image);
    setImage($("detail-heatmap"), item.links.heatmap);
    setImage($("detail-overlay"), item.links.overlay);
    const rows = [
      ["verdict", item.verdict], ["score", fmt(item.score, 6)], ["threshold", `${fmt(item.threshold, 6)} (${item.threshold_method})`],
      ["p-value", fmt(item.p_value, 3)], ["time (UTC)", item.created_utc], ["part id", item.part_id || "–"],
      ["image", `${item.image_width}×${item.image_height}, sha256 ${item.image_sha256.slice(0, 16)}…`],
      ["model", `${item.model_id} (sha256 ${item.model_checksum.slice(0, 16)}…)`], ["time taken", `${Math.round(item.timing_ms)} ms`],
    ];
    const table = $("detail-table");
    table.replaceChildren(...rows.map(([k, v]) => {
      const tr = document.createElement("tr");
      const a = document.createElement("td"); a.textContent = k;
      const b = document.createElement("td"); b.textContent = v;
      tr.append(a, b);
      return tr;
    }));
    $("detail").showModal();
  } catch (e) { showError(e.message); }
}

async function upload(event) {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  const part = $("part-id").value.trim();
  if (part) form.append("part_id", part);
  $("upload-status").textContent = "inspecting…";
  $("upload-button").disabled = true;
  try {
    const result = await (await api("/v1/inspect", { method: "POST", body: form })).json();
    $("upload-status").textContent = `#${result.id}: ${result.verdict} (score ${fmt(result.score)}, `
      + `p ${fmt(result.p_value, 2)}, ${Math.round(result.timing.total_ms)} ms)`;
    offset = 0;
    await refreshAll();
    showError("");
  } catch (e) {
    $("upload-status").textContent = "";
    showError(e.message);
  } finally {
    $("upload-button").disabled = false;
  }
}

async function init() {
  $("api-key").value = localStorage.getItem("gaikan-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("gaikan-api-key", $("api-key").value.trim());
    refreshAll();
  });
  $("window").addEventListener("change", refreshDashboard);
  $("filter").addEventListener("change", () => { offset = 0; refresh(); });
  $("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); refresh(); });
  $("next").addEventListener("click", () => { offset += PAGE; refresh(); });
  $("upload-form").addEventListener("submit", upload);
  try {
    const health = await (await fetch("/healthz")).json();
    authRequired = health.auth;
    $("model").textContent = `model ${health.model_id}, threshold ${fmt(health.threshold)} (${health.threshold_method})`;
    $("key-label").hidden = !authRequired;
  } catch (e) { showError(`service unreachable: ${e.message}`); }
  await refreshAll();
  setInterval(() => { if (!document.hidden && !$("detail").open && !reviewing) refreshAll(); }, 5000);
}

// ---- dashboard ---------------------------------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";
const C = { ok: "#2e7d32", ng: "#c62828", line: "#1f3b73", thr: "#111", grid: "#e3e6ea", text: "#555" };
let reviewing = false;  // a review POST in flight: no background refresh that could redraw the queue

function pct(x, digits = 1) {
  return x === null || x === undefined ? "–" : `${(100 * x).toFixed(digits)}%`;
}

function el(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// a round tick step giving at most 5 ticks up to x (integers only for counts), and the axis top
function niceScale(x, integer = false) {
  if (!(x > 0)) x = integer ? 1 : 0.01;
  const raw = x / 4, p = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 2.5, 5, 10].map((m) => m * p).find((v) => v >= raw);
  if (integer) step = Math.max(1, Math.round(step));
  return { step, max: step * Math.ceil(x / step - 1e-9) };
}

function timeLabel(t, bucketS) {
  const d = new Date(t * 1000);
  const hm = d.toISOString().slice(11, 16);
  return bucketS >= 86400 ? d.toISOString().slice(5, 10) : hm;
}

function axes(svg, box, scale, yFmt, side = "left") {
  const n = Math.round(scale.max / scale.step);
  for (let i = 0; i <= n; i++) {
    const y = box.y + box.h - (i / n) * box.h;
    if (side === "left") svg.append(el("line", { x1: box.x, x2: box.x + box.w, y1: y, y2: y, stroke: C.grid }));
    const x = side === "left" ? box.x - 6 : box.x + box.w + 6;
    svg.append(el("text", { x, y: y + 4, "text-anchor": side === "left" ? "end" : "start", "font-size": 11,
      fill: side === "left" ? C.text : C.line }, yFmt(i * scale.step)));
  }
}

function emptyChart(svg, message) {
  svg.append(el("text", { x: 320, y: 115, "text-anchor": "middle", fill: C.text, "font-size": 14 }, message));
}

function drawSeries(stats) {
  const svg = $("chart-series");
  svg.replaceChildren();
  const series = stats.series, w = stats.window;
  $("series-note").textContent = `(${Math.round(w.bucket_s / 60)} min buckets, UTC)`;
  if (!stats.totals.n) { emptyChart(svg, "no inspections in this window"); return; }
  const box = { x: 44, y: 12, w: 548, h: 170 };
  const nScale = niceScale(Math.max(...series.map((b) => b.n)), true), nMax = nScale.max;
  const rates = series.filter((b) => b.n).map((b) => b.ng_rate);
  const rScale = niceScale(Math.max(0.05, ...rates)), rMax = rScale.max;
  axes(svg, box, nScale, (v) => `${Math.round(v)}`);
  axes(svg, box, rScale, (v) => `${Math.round(1000 * v) / 10}%`, "right");
  const bw = box.w / series.length;
  const pts = [];
  series.forEach((b, i) => {
    const x = box.x + i * bw;
    const hOk = (b.ok / nMax) * box.h, hNg = (b.ng / nMax) * box.h;
    const g = el("g", { class: "bucket" });
    g.append(el("title", {}, `${timeLabel(b.start, 60)} UTC: ${b.n} parts, yield ${pct(b.yield)}, NG rate ${pct(b.ng_rate)}`
      + (b.false_alarms ? `, ${b.false_alarms} false alarm${b.false_alarms > 1 ? "s" : ""}` : "")));
    g.append(el("rect", { x: x + bw * 0.12, width: bw * 0.76, y: box.y + box.h - hOk, height: hOk, fill: C.ok, opacity: 0.75 }));
    g.append(el("rect", { x: x + bw * 0.12, width: bw * 0.76, y: box.y + box.h - hOk - hNg, height: hNg, fill: C.ng, opacity: 0.85 }));
    svg.append(g);
    if (b.n) pts.push([x + bw / 2, box.y + box.h - (b.ng_rate / rMax) * box.h]);
    const every = Math.ceil(series.length / 8);
    if (i % every === 0) {
      svg.append(el("text", { x: x + bw / 2, y: box.y + box.h + 16, "text-anchor": "middle", "font-size": 11, fill: C.text },
        timeLabel(b.start, w.bucket_s)));
    }
  });
  if (pts.length) {
    svg.append(el("polyline", { points: pts.map((p) => p.join(",")).join(" "), fill: "none", stroke: C.line,
      "stroke-width": 2, "stroke-linejoin": "round" }));
    for (const [x, y] of pts) svg.append(el("circle", { cx: x, cy: y, r: 2.5, fill: C.line }));
  }
  svg.append(el("line", { x1: box.x, x2: box.x + box.w, y1: box.y + box.h, y2: box.y + box.h, stroke: "#999" }));
}

function drawHistogram(stats) {
  const svg = $("chart-hist");
  svg.replaceChildren();
  const h = stats.histogram;
  if (!h.edges.length) { emptyChart(svg, "no scores in this window"); return; }
  const box = { x: 44, y: 12, w: 570, h: 170 };
  const lo = h.edges[0], hi = h.edges[h.edges.length - 1];
  const sx = (v) => box.x + ((v - lo) / (hi - lo)) * box.w;
  const cScale = niceScale(Math.max(...h.ok.map((c, i) => c + h.ng[i])), true), cMax = cScale.max;
  axes(svg, box, cScale, (v) => `${Math.round(v)}`);
  h.ok.forEach((okCount, i) => {
    const x0 = sx(h.edges[i]), x1 = sx(h.edges[i + 1]);
    const hOk = (okCount / cMax) * box.h, hNg = (h.ng[i] / cMax) * box.h;
    const g = el("g");
    g.append(el("title", {}, `score ${fmt(h.edges[i], 3)}–${fmt(h.edges[i + 1], 3)}: ${okCount} OK, ${h.ng[i]} NG`));
    g.append(el("rect", { x: x0 + 0.5, width: Math.max(0.5, x1 - x0 - 1), y: box.y + box.h - hOk, height: hOk, fill: C.ok, opacity: 0.75 }));
    g.append(el("rect", { x: x0 + 0.5, width: Math.max(0.5, x1 - x0 - 1), y: box.y + box.h - hOk - hNg, height: hNg, fill: C.ng, opacity: 0.85 }));
    svg.append(g);
  });
  for (let i = 0; i <= 5; i++) {
    const v = lo + (i / 5) * (hi - lo);
    svg.append(el("text", { x: sx(v), y: box.y + box.h + 16, "text-anchor": "middle", "font-size": 11, fill: C.text }, fmt(v, 3)));
  }
  svg.append(el("line", { x1: box.x, x2: box.x + box.w, y1: box.y + box.h, y2: box.y + box.h, stroke: "#999" }));
  if (h.threshold !== null) {
    const x = sx(h.threshold);
    svg.append(el("line", { id: "threshold-line", x1: x, x2: x, y1: box.y - 4, y2: box.y + box.h, stroke: C.thr,
      "stroke-width": 2, "stroke-dasharray": "5 3" }));
    const right = x > box.x + box.w * 0.7;
    svg.append(el("text", { x: right ? x - 6 : x + 6, y: box.y + 10, "text-anchor": right ? "end" : "start",
      "font-size": 12, fill: C.thr }, `threshold ${fmt(h.threshold, 4)} → NG`));
  }
}

function drawKpis(stats) {
  const t = stats.totals;
  $("kpi-n").textContent = t.n;
  $("kpi-n-sub").textContent = $("window").selectedOptions[0].textContent;
  $("kpi-yield").textContent = pct(t.yield);
  $("kpi-yield-sub").textContent = t.false_alarms ? `${pct(t.yield_after_review)} after review` : `${t.ok} OK`;
  $("kpi-ng").textContent = pct(t.ng_rate);
  $("kpi-ng-sub").textContent = `${t.ng} NG: ${t.defects} defect${t.defects === 1 ? "" : "s"}, `
    + `${t.false_alarms} false alarm${t.false_alarms === 1 ? "" : "s"}`;
  $("kpi-queue").textContent = t.review_queue;
  const types = Object.entries(t.defect_types).slice(0, 2).map(([k, v]) => `${k} ${v}`).join(", ");
  $("kpi-queue-sub").textContent = types ? `defects: ${types}` : "to review";
  const d = stats.drift;
  const box = $("drift");
  box.dataset.status = d.status;
  box.title = `${d.message}\n${d.method}` + (d.test_p_value !== null ? `\ntest p = ${d.test_p_value.toExponential(2)}` : "");
  $("drift-value").textContent = { ok: "no drift", drift: "DRIFT", too_few: "too few",
    unmonitored: "not monitored" }[d.status] || d.status;
  $("drift-sub").textContent = d.test_p_value === null ? d.message
    : `${d.message}; test p = ${d.test_p_value.toPrecision(2)}`;
}

function reviewText(r) {
  return r.label === "false_alarm" ? "false alarm" : `defect: ${r.defect_type}`;
}

function queueCard(item) {
  const div = document.createElement("div");
  div.className = "qcard";
  div.dataset.id = item.id;
  div.innerHTML = `
    <div class="pics"><img class="thumb" alt="image"><img class="heatmap" alt="heat map"></div>
    <div class="line"><span class="verdict NG">NG</span><span class="score"></span></div>
    <div class="line muted"><span class="part"></span><span class="time"></span></div>
    <div class="actions">
      <button type="button" class="fa">false alarm</button>
      <form class="defect-form"><input class="defect-type" list="defect-types" placeholder="defect type" maxlength="60"
        required aria-label="defect type"><button class="defect">defect</button></form>
    </div>`;
  div.querySelector(".score").textContent = `score ${fmt(item.score)}, p ${fmt(item.p_value, 2)}`;
  div.querySelector(".part").textContent = item.part_id ? `part ${item.part_id}` : `#${item.id}`;
  div.querySelector(".time").textContent = item.created_utc.slice(11, 19);
  setImage(div.querySelector(".thumb"), item.links.thumb);
  setImage(div.querySelector(".heatmap"), item.links.heatmap);
  div.querySelector(".pics").addEventListener("click", () => showDetail(item.id));
  div.querySelector(".fa").addEventListener("click", () => review(div, item.id, { label: "false_alarm" }));
  div.querySelector(".defect-form").addEventListener("submit", (e) => {
    e.preventDefault();
    review(div, item.id, { label: "defect", defect_type: div.querySelector(".defect-type").value.trim() });
  });
  return div;
}

async function review(div, id, body) {
  reviewing = true;
  div.classList.add("busy");
  for (const b of div.querySelectorAll("button")) b.disabled = true;
  try {
    await api(`/v1/inspections/${id}/review`, { method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json" } });
    div.remove();
    showError("");
  } catch (e) {
    showError(e.message);
    for (const b of div.querySelectorAll("button")) b.disabled = false;
  } finally {
    div.classList.remove("busy");
    reviewing = false;
  }
  await refreshDashboard();
}

async function drawQueue() {
  const data = await (await api("/v1/review-queue?limit=12")).json();
  $("queue-count").textContent = data.total;
  $("queue-count").dataset.total = data.total;
  const queue = $("queue");
  // keep cards whose buttons the operator may be using; add new ones in order
  const have = new Map([...queue.children].map((c) => [Number(c.dataset.id), c]));
  const wanted = data.items.map((item) => have.get(item.id) || queueCard(item));
  queue.replaceChildren(...wanted);
  if (!data.items.length) {
    const p = document.createElement("p");
    p.className = "muted empty";
    p.textContent = "Nothing to review.";
    queue.append(p);
  }
}

async function drawReviews() {
  const data = await (await api("/v1/reviews?limit=8")).json();
  const rows = data.items.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.id = r.inspection_id;
    const item = r.inspection;
    const part = `#${r.inspection_id}` + (item && item.part_id ? ` ${item.part_id}` : "");
    const heat = item ? item.links.overlay || item.links.heatmap : null;
    const img = document.createElement("img");
    img.className = "mini";
    img.alt = "overlay";
    if (heat) setImage(img, heat);
    const cells = [img, part, reviewText(r), r.reviewer, r.created_utc.replace("T", " ").slice(0, 19)];
    for (const c of cells) {
      const td = document.createElement("td");
      if (c instanceof Node) td.append(c); else td.textContent = c;
      tr.append(td);
    }
    tr.children[2].className = r.label;
    tr.addEventListener("click", () => showDetail(r.inspection_id));
    return tr;
  });
  $("reviews").tBodies[0].replaceChildren(...rows);
  $("reviews").hidden = !rows.length;
}

let dashboardSeq = 0;

async function refreshDashboard() {
  const seq = ++dashboardSeq;
  try {
    const stats = await (await api(`/v1/stats?window_s=${$("window").value}`)).json();
    if (seq !== dashboardSeq) return;  // a newer refresh (e.g. another window) is under way
    drawKpis(stats);
    drawSeries(stats);
    drawHistogram(stats);
    $("defect-types").replaceChildren(...Object.keys(stats.totals.defect_types).map((t) => {
      const o = document.createElement("option"); o.value = t; return o;
    }));
    if (!reviewing) await drawQueue();
    await drawReviews();
  } catch (e) {
    showError(e.message.startsWith("401") ? `${e.message} — enter the API key above` : e.message);
  }
}

async function refreshAll() {
  await Promise.all([refreshDashboard(), refresh()]);
}

init();
