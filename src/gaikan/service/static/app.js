// gaikan inspection page: plain JS, no build step. Talks to the JSON API with the X-API-Key header
// (kept in localStorage); images are fetched with the header too and shown through blob: URLs.
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
    await refresh();
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
    refresh();
  });
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
  await refresh();
  setInterval(() => { if (!document.hidden && !$("detail").open) refresh(); }, 5000);
}

init();
