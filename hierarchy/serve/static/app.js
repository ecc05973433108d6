// The upload page of `hierarchy serve`: plain JS, no build step. Everything shown comes from
// /v1/pipeline and /v1/classify and is inserted as text, never as HTML.
"use strict";

const ERROR_WORDS = {
  truncated: "the file is incomplete (it was cut off)",
  undecodable: "the file is damaged or not an image",
  unsupported_format: "this kind of file is not supported; use a JPEG or PNG photo",
  too_large: "the file is too large",
  empty: "the file is empty",
  stage_failed: "the model failed on this image",
};

const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem("hierarchy-api-key") || "";
let pipeline = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const pct = (x) => `${Math.round(x * 100)}%`;

async function api(path, options = {}) {
  const headers = apiKey ? { "X-API-Key": apiKey } : {};
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("key-box").hidden = false;
    throw new Error("an API key is needed (enter it above)");
  }
  return response;
}

async function loadPipeline() {
  for (;;) {
    try {
      const response = await api("/v1/pipeline");
      if (response.ok) {
        pipeline = await response.json();
        showPipeline(pipeline);
        return;
      }
      if (response.status !== 503) throw new Error(`HTTP ${response.status}`);
      $("progress").textContent = "The model is starting…";
    } catch (err) {
      $("progress").textContent = `Cannot reach the service: ${err.message}`;
      if (!$("key-box").hidden) return;
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function showPipeline(p) {
  $("title").textContent = p.name;
  $("intended").textContent = p.intended_use ? `Intended use: ${p.intended_use}` : "";
  $("disclaimer").textContent = p.disclaimer;
  $("route-summary").textContent = "Steps: " + p.stages.map((s) => `${s.id} (${s.labels.join(" / ")})`).join(" → ");
  $("progress").textContent = "";
}

function stageThreshold(id) {
  const stage = pipeline && pipeline.stages.find((s) => s.id === id);
  return stage ? stage.threshold : null;
}

// The answer in words: what a clinician should read first.
function verdict(rec) {
  const last = rec.trace.length ? rec.trace[rec.trace.length - 1] : null;
  switch (rec.status) {
    case "ok":
      return ["Result: " + rec.label, "Confident enough at every step of the route."];
    case "abstained": {
      const need = last.threshold ?? stageThreshold(last.stage);
      return ["Not sure: a person should look at this image",
        `At step "${last.stage}" the model was ${pct(last.confidence)} sure it is "${last.label}"` +
        (need != null ? `, below the ${pct(need)} it needs to answer.` : ".") +
        (rec.label ? ` Last confident answer: ${rec.label}.` : "")];
    }
    case "rejected":
      return ["Not recognised: not classified",
        `At step "${last.stage}" this image looked unlike the images the model was trained on, so it gave no answer.`];
    default: {
      const e = rec.error || {};
      return ["Could not use this file", `${ERROR_WORDS[e.type] || e.type}. (${e.message})`];
    }
  }
}

function stepView(step, index, explanation) {
  const decision = { accepted: "answered", abstained: "not sure", rejected: "not recognised" }[step.decision] || "";
  const bar = el("span", { class: "bar" }, el("span", { class: "fill", style: `width:${pct(step.confidence)}` }));
  const row = el("div", { class: "step-head" },
    el("span", { class: "step-name" }, `${index + 1}. ${step.stage}`),
    el("span", { class: "step-label" }, step.label),
    bar,
    el("span", { class: "step-conf" }, pct(step.confidence)),
    el("span", { class: `decision ${step.decision}` }, decision));
  const li = el("li", { class: "step" }, row);
  if (explanation && explanation.available) {
    const img = el("img", { class: "overlay", src: explanation.image,
      alt: `where step ${step.stage} looked for "${step.label}"` });
    const caption = `Where "${step.stage}" looked to answer "${step.label}" (red = most important)` +
      (explanation.note ? `. Note: ${explanation.note}` : "");
    li.append(el("figure", {}, img, el("figcaption", { class: "muted" }, caption)));
  } else if (explanation) {
    li.append(el("p", { class: "muted" }, explanation.note));
  }
  return li;
}

function card(rec, file) {
  const [headline, detail] = verdict(rec);
  const thumb = rec.status === "error" ? el("div", { class: "thumb none" }, "no preview")
    : el("img", { class: "thumb", alt: rec.path, src: URL.createObjectURL(file) });
  const steps = el("ol", { class: "steps" });
  const maps = rec.explanations || [];
  rec.trace.forEach((step, i) => steps.append(stepView(step, i, maps[i])));
  return el("article", { class: `card ${rec.status}`, "data-status": rec.status },
    el("div", { class: "card-top" }, thumb,
      el("div", {}, el("h2", { class: "headline" }, headline), el("p", { class: "detail" }, detail),
        el("p", { class: "muted filename" }, rec.path))),
    steps);
}

async function classify(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const explain = $("explain").checked;
  $("progress").textContent = `Classifying ${files.length} image(s)…`;
  try {
    const response = await api(`/v1/classify?explain=${explain}`, { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
    body.forEach((rec, i) => $("results").prepend(card(rec, files[i])));
    $("progress").textContent = "";
  } catch (err) {
    $("progress").textContent = `Failed: ${err.message}`;
  }
}

function setUp() {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => { classify([...e.target.files]); e.target.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    classify([...e.dataTransfer.files]);
  });
  $("key-save").addEventListener("click", () => {
    apiKey = $("api-key").value;
    sessionStorage.setItem("hierarchy-api-key", apiKey);
    $("key-box").hidden = true;
    loadPipeline();
  });
  loadPipeline();
}

setUp();
