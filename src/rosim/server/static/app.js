// rosim demo page: plain JS, no build step. Talks to the same server's JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
const EXAMPLES = ["今天天气不错", "广州和深圳哪个好？", "给我推荐一款红色的车", "我喜欢北京"];
const state = { hasIndex: false, authRequired: false, busy: false };

function setStatus(kind, text) {
  $("status").dataset.state = kind;
  $("status-text").textContent = text;
}

function showError(message) {
  const box = $("error");
  box.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = "出错了 / Error:";
  box.append(strong, document.createTextNode(message));
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function post(path, body) {
  let response;
  try {
    response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  } catch (err) {
    throw new Error("the server could not be reached (" + err.message + ")");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    /* not JSON */
  }
  if (!response.ok) {
    const msg = data && data.error ? data.error.message : response.status + " " + response.statusText;
    throw new Error(msg + " [HTTP " + response.status + "]");
  }
  return data;
}

function skeleton(list, rows) {
  list.classList.add("skeleton");
  list.replaceChildren();
  for (let i = 0; i < rows; i++) {
    const li = document.createElement("li");
    const t = document.createElement("div");
    t.className = "text";
    t.style.width = 55 + ((i * 37) % 40) + "%";
    const s = document.createElement("div");
    s.className = "score";
    li.append(t, s);
    list.append(li);
  }
}

function render(list, items, emptyText) {
  list.classList.remove("skeleton");
  list.replaceChildren();
  if (!items.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = emptyText;
    list.append(li);
    return;
  }
  for (const item of items) {
    const li = document.createElement("li");
    li.className = "result";
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = item.text;
    const score = document.createElement("div");
    score.className = "score";
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = Math.max(0, Math.min(1, item.score)) * 100 + "%";
    bar.append(fill);
    const num = document.createElement("span");
    num.className = "num";
    num.textContent = item.score.toFixed(3);
    score.append(bar, num);
    li.append(text, score);
    list.append(li);
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("submit").disabled = busy;
  $("submit").classList.toggle("busy", busy);
  $("query-form").setAttribute("aria-busy", String(busy));
}

function intField(id, fallback) {
  const v = parseInt($(id).value, 10);
  return Number.isFinite(v) ? v : fallback;
}

async function submit(event) {
  if (event) event.preventDefault();
  if (state.busy) return;
  const text = $("text").value.trim();
  if (!text) {
    showError("请输入一个句子 / type a sentence first");
    return;
  }
  clearError();
  const n = intField("n", 20);
  const k = Math.min(intField("k", 10), n);
  const body = { texts: text, n: n, k: k, top_p: parseFloat($("top_p").value) || 0.95 };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);

  setBusy(true);
  $("results").hidden = false;
  $("results").classList.toggle("two", state.hasIndex);
  $("search-panel").hidden = !state.hasIndex;
  $("similar-meta").textContent = "generating…";
  skeleton($("similar-list"), Math.min(k, 5));
  if (state.hasIndex) {
    $("search-meta").textContent = "searching…";
    skeleton($("search-list"), Math.min(k, 5));
  }
  const t0 = performance.now();
  // the search is sent first: it is quick, and the server runs model calls one at a time
  const searching = state.hasIndex
    ? post("search", { texts: text, k: k }).then((data) => {
        render($("search-list"), data.results[0].neighbors, "索引为空 / the index is empty");
        $("search-meta").textContent = `k=${k} · ${Math.round(performance.now() - t0)} ms`;
      })
    : Promise.resolve();
  const generating = post("similar", body).then((data) => {
    render($("similar-list"), data.results[0].similar, "没有生成新的句子 / no distinct candidates");
    $("similar-meta").textContent = `${data.results[0].similar.length} of n=${n} · ${Math.round(performance.now() - t0)} ms`;
  });
  const [gen, found] = await Promise.allSettled([generating, searching]);
  const messages = [];
  if (gen.status === "rejected") {
    messages.push(gen.reason.message);
    render($("similar-list"), [], "—");
    $("similar-meta").textContent = "failed";
  }
  if (found.status === "rejected") {
    messages.push(found.reason.message);
    render($("search-list"), [], "—");
    $("search-meta").textContent = "failed";
  }
  if (messages.length) showError([...new Set(messages)].join("\n"));
  setBusy(false);
}

async function loadHealth() {
  try {
    const response = await fetch("health");
    const h = await response.json();
    state.hasIndex = Boolean(h.index);
    state.authRequired = Boolean(h.auth_required);
    $("key-field").hidden = !state.authRequired;
    if (state.authRequired) {
      document.querySelector(".options").open = true;
      $("api_key").value = localStorage.getItem("rosim-api-key") || "";
    }
    const idx = h.index ? ` · index ${h.index.size ?? ""}`.trimEnd() : "";
    setStatus("ok", `ready · ${h.model.dim}-d${idx}`);
    $("model-name").textContent = " · model " + h.model.name + " (" + h.model.fingerprint + ")";
    const lim = h.limits;
    $("n").max = lim.max_n;
    $("k").max = lim.max_n;
    $("text").maxLength = lim.max_text_chars;
  } catch (err) {
    setStatus("bad", "server unreachable");
  }
}

function init() {
  for (const ex of EXAMPLES) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.textContent = ex;
    chip.addEventListener("click", () => {
      $("text").value = ex;
      submit();
    });
    $("examples").append(chip);
  }
  $("query-form").addEventListener("submit", submit);
  $("text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) submit(e);
  });
  $("api_key").addEventListener("change", () => localStorage.setItem("rosim-api-key", $("api_key").value.trim()));
  loadHealth();
  $("text").focus();
}

document.addEventListener("DOMContentLoaded", init);
