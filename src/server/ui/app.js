// The demo page: images to POST /classify, one request per image, results with the
// server's per-stage timings. No framework, no network beyond this server. The API key, if
// one is typed, lives in this page's memory only.
"use strict";

const $ = (id) => document.getElementById(id);
let classes = 1000;

function authHeaders() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function describeModel() {
  try {
    const response = await fetch("../v1/models", { headers: authHeaders() });
    const body = await response.json();
    if (!response.ok) {
      $("model").textContent = body.error ? body.error.message : `HTTP ${response.status}`;
      return;
    }
    const m = body.models[0];
    classes = m.num_classes;
    $("topk").max = String(classes);
    $("topk").value = String(Math.min(Number($("topk").value) || 5, classes));
    const variant = m.variant ? `FasterNet-${m.variant.toUpperCase()}` : m.architecture;
    $("model").textContent = `${m.name}: ${variant}, ${m.num_classes} classes, input ${m.input_size[0]}×${m.input_size[1]}, server ${m.version}`;
  } catch (e) {
    $("model").textContent = `Cannot reach the server: ${e.message}`;
  }
}

function milliseconds(response, header) {
  const value = response.headers.get(header);
  return value === null ? "?" : `${Number(value).toFixed(1)} ms`;
}

async function classify(file) {
  const item = $("result").content.firstElementChild.cloneNode(true);
  const preview = URL.createObjectURL(file);
  item.querySelector("img").src = preview;
  item.querySelector("img").alt = `Preview of ${file.name || "the pasted image"}`;
  item.querySelector(".name").textContent = file.name || "pasted image";
  $("results").prepend(item);
  const k = Math.max(1, Math.min(classes, Number($("topk").value) || 5));
  try {
    const response = await fetch(`../classify?top_k=${k}`, {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream", ...authHeaders() },
      body: file,
    });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const error = item.querySelector(".error");
      error.textContent = body && body.error ? body.error.message : `HTTP ${response.status}`;
      error.hidden = false;
      item.classList.add("failed");
      return;
    }
    const labels = item.querySelector(".labels");
    for (const p of body.results[0].predictions) {
      const row = document.createElement("li");
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = p.label;
      const bar = document.createElement("meter");
      bar.min = 0;
      bar.max = 1;
      bar.value = p.score;
      bar.setAttribute("aria-label", `${p.label} score`);
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = `${(100 * p.score).toFixed(1)}%`;
      row.append(name, bar, score);
      row.dataset.classIndex = String(p.class_index);
      labels.append(row);
    }
    item.querySelector(".timings").textContent =
      `decode ${milliseconds(response, "x-preprocess-time")} · queue ${milliseconds(response, "x-queue-time")} · ` +
      `forward ${milliseconds(response, "x-inference-time")} · total ${milliseconds(response, "x-total-time")}`;
  } catch (e) {
    const error = item.querySelector(".error");
    error.textContent = `Request failed: ${e.message}`;
    error.hidden = false;
    item.classList.add("failed");
  }
}

async function classifyAll(files) {
  const images = [...files];
  if (images.length === 0) return;
  $("status").textContent = `Classifying ${images.length} image${images.length > 1 ? "s" : ""}…`;
  await Promise.all(images.map(classify));
  $("status").textContent = `Done: ${images.length} image${images.length > 1 ? "s" : ""}.`;
}

$("files").addEventListener("change", (e) => {
  classifyAll(e.target.files);
  e.target.value = "";
});
$("key").addEventListener("change", describeModel);

const drop = $("drop");
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  classifyAll(e.dataTransfer.files);
});
document.addEventListener("paste", (e) => {
  const files = [...e.clipboardData.items].filter((i) => i.kind === "file").map((i) => i.getAsFile());
  classifyAll(files);
});

describeModel();
