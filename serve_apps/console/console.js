// The IMoE-Ray console: plain browser JavaScript over the server's own HTTP API, no build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("imoe-api-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("imoe-api-key", keyInput.value.trim());
  loadExperts();
  loadJobs();
});

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = keyInput.value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((body.error && body.error.message) || `${response.status} ${response.statusText}`);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

// Server-sent events read from a fetch body (EventSource cannot send the Authorization header).
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// ---- chat ----
$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  $("send").disabled = true;
  $("question").value = "";
  $("messages").append(el("div", { class: "message user" }, question));
  const previous = $("answer-latest");
  if (previous) previous.removeAttribute("id");
  const answer = el("div", { class: "message assistant", id: "answer-latest" });
  const text = el("span", { class: "text" });
  answer.append(text);
  $("messages").append(answer);
  const body = { model: "imoe", stream: true, messages: [{ role: "user", content: question }],
                 temperature: Number($("temperature").value) || 0 };
  if (Number($("max-tokens").value) > 0) body.max_tokens = Number($("max-tokens").value);
  if ($("mode").value) body.imoe = { mode: $("mode").value };
  const started = performance.now();
  let first = null;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || `${response.status}`);
    }
    let imoe = null;
    for await (const chunk of sse(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.imoe) imoe = chunk.imoe;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        first = first || performance.now();
        text.textContent += delta.content;
      }
    }
    const total = performance.now() - started;
    answer.append(el("span", { class: "meta" },
      `${total.toFixed(0)} ms` + (first ? `, first token after ${(first - started).toFixed(0)} ms` : "")));
    if (imoe) showRouting(imoe);
    answer.dataset.done = "true";
  } catch (error) {
    answer.className = "message error";
    text.textContent = String(error.message || error);
    answer.dataset.done = "true";
  } finally {
    $("send").disabled = false;
  }
});

function bar(p) {
  return el("span", { class: "bar", style: `width:${Math.max(2, Math.round(p * 80))}px` });
}

function showRouting(imoe) {
  $("route-empty").hidden = true;
  $("route-table").hidden = false;
  const categories = $("route-categories");
  categories.replaceChildren();
  (imoe.categories || []).forEach((c, i) => {
    const p = (imoe.probabilities || [])[i] || 0;
    categories.append(el("div", {}, bar(p), `${c} ${p.toFixed(2)}`));
  });
  if (!categories.childNodes.length) categories.append(imoe.fallback ? `none (fallback: ${imoe.fallback})` : "none");
  const experts = $("route-experts");
  experts.replaceChildren();
  for (const [name, weight] of Object.entries(imoe.weights || {})) experts.append(el("div", {}, bar(weight), `${name} ${weight.toFixed(2)}`));
  $("route-fusion").textContent = imoe.fusion || "single expert";
  $("route-exit").textContent = imoe.exit_layer == null ? "–" : String(imoe.exit_layer);
  $("route-tc").textContent = imoe.t_c == null ? "–" : Number(imoe.t_c).toFixed(3);
  $("route-timings").textContent = Object.entries(imoe.timings_ms || {})
    .filter(([, ms]) => ms > 0).map(([k, ms]) => `${k} ${ms.toFixed(1)} ms`).join(", ") || "–";
  const citations = $("citations");
  citations.replaceChildren();
  for (const c of imoe.citations || []) {
    const snippet = (c.text || "").replace(/\s+/g, " ");
    citations.append(el("li", {}, `${c.table} · ${c.chunk_id} · score ${Number(c.score).toFixed(3)}`,
      el("span", { class: "text" }, snippet.length > 300 ? snippet.slice(0, 299) + "…" : snippet)));
  }
  if (!citations.childNodes.length) citations.append(el("li", { class: "dim" }, "none (mode optimized retrieves)"));
}

// ---- experts ----
async function loadExperts() {
  const list = $("experts-list");
  try {
    const experts = await api("/v1/experts");
    list.replaceChildren();
    for (const e of experts.data) {
      const training = e.training || {}, adapter = e.adapter || {};
      const details = [`${(e.categories || []).join(", ")}`, e.rows ? `${e.rows} rows` : "",
                       adapter.type ? `${adapter.type} r=${adapter.r ?? "?"}` : "",
                       training.loss != null ? `loss ${Number(training.loss).toFixed(2)}` : ""].filter(Boolean).join(" · ");
      list.append(el("li", { class: "expert", "data-name": e.name }, el("strong", {}, e.name), " ",
        el("span", { class: "dim" }, details),
        (e.keywords || []).length ? el("div", { class: "dim" }, `keywords: ${e.keywords.slice(0, 8).join(", ")}`) : ""));
    }
    if (!experts.data.length) list.append(el("li", { class: "dim" }, "no experts"));
  } catch (error) {
    list.replaceChildren(el("li", { class: "dim" }, String(error.message)));
  }
}
$("refresh-experts").addEventListener("click", loadExperts);

// ---- jobs ----
async function loadJobs() {
  const rows = $("jobs-table").querySelector("tbody");
  try {
    const jobs = await api("/v1/jobs");
    rows.replaceChildren(...jobs.data.slice(-20).reverse().map(jobRow));
  } catch (error) {
    rows.replaceChildren(el("tr", {}, el("td", { colspan: "6", class: "dim" }, String(error.message))));
  }
}

function jobRow(job) {
  return el("tr", { id: `job-${job.id}` }, el("td", {}, el("code", {}, job.id)), el("td", {}, job.agent),
    el("td", {}, String(job.priority)), el("td", { class: "state" }, job.state), el("td", { class: "tokens" }, String(job.tokens ?? "")),
    el("td", { class: "output" }, job.output || job.error || ""));
}

async function follow(jobId) {
  const response = await fetch(`/v1/jobs/${jobId}/events`, { headers: headers(false) });
  if (!response.ok) return;
  for await (const view of sse(response)) {
    const row = $(`job-${jobId}`);
    if (row) row.replaceWith(jobRow(view));
  }
}

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const job = await api("/v1/jobs", { method: "POST", body: JSON.stringify({
      prompt: $("job-prompt").value, priority: Number($("job-priority").value) || 0, max_tokens: 32 }) });
    await loadJobs();
    follow(job.id);
  } catch (error) {
    alert(error.message);
  }
});
$("refresh-jobs").addEventListener("click", loadJobs);

fetch("/healthz").then((r) => r.json()).then((h) => {
  $("health").textContent = `${h.experts} experts · mode ${h.mode}`;
}).catch(() => { $("health").textContent = "server unreachable"; });
loadExperts();
loadJobs();
