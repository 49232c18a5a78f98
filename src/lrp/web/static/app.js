// lrp serve: the page. Plain JavaScript, no build step, no network but this server.
"use strict";

const $ = (selector) => document.querySelector(selector);
const THROTTLE_MS = 120;   // while drawing, at most one request per this many milliseconds

const app = {
  models: [],
  limits: null,
  drawModel: null,
};

// ------------------------------------------------------------------ helpers

async function api(path, options) {
  const response = await fetch(path, options);
  let body;
  try {
    body = await response.json();
  } catch (e) {
    body = { error: `HTTP ${response.status}` };
  }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

function option(value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  return o;
}

function percent(p) {
  return p >= 0.001 ? `${(p * 100).toFixed(1)}%` : "<0.1%";
}

function fillComposites(select, model) {
  const keep = select.value;
  select.replaceChildren(...model.composites.map((name) => option(name, name)));
  select.value = model.composites.includes(keep) ? keep : model.default_composite;
}

// Probability bars; a click explains that class (the predicted one again: back to the prediction).
function renderBars(container, res, onPick, limit) {
  let order = res.probabilities.map((p, i) => i);
  if (limit && order.length > limit) {
    order.sort((a, b) => res.probabilities[b] - res.probabilities[a]);
    order = order.slice(0, limit);
    if (!order.includes(res.target)) order.push(res.target);
  }
  const label = (i) => classLabel(res.model, i);
  container.replaceChildren(...order.map((i) => {
    const row = document.createElement("button");
    row.type = "button";
    row.className = "bar" + (i === res.prediction ? " predicted" : "") + (i === res.target ? " target" : "");
    row.dataset.cls = String(i);
    row.title = i === res.target ? "explained now" : `why ${label(i)}?`;
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = label(i);
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(0, Math.min(1, res.probabilities[i])) * 100}%`;
    fill.style.display = "block";
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(res.probabilities[i]);
    row.append(name, track, value);
    row.addEventListener("click", () => onPick(i === res.prediction ? null : i));
    return row;
  }));
}

function classLabel(modelName, i) {
  const model = app.models.find((m) => m.name === modelName);
  return model && model.classes && i < model.classes.length ? model.classes[i] : String(i);
}

function runnerUp(res) {
  let best = -1;
  res.probabilities.forEach((p, i) => {
    if (i !== res.prediction && (best < 0 || p > res.probabilities[best])) best = i;
  });
  return best;
}

function stats(res) {
  return `relevance sum ${res.relevance_sum.toFixed(3)} of score ${res.score.toFixed(3)} · ` +
    `${res.composite} · ${res.elapsed_ms.toFixed(1)} ms on the server`;
}

// ------------------------------------------------------------------ drawing

const draw = {
  pad: null, ctx: null, heat: null, heatCtx: null,
  drawing: false, last: null, hasInk: false, sample: null,
  target: null, busy: false, pending: false, lastSent: 0, seq: 0, result: null,
};

function clearPad() {
  draw.ctx.fillStyle = "#000";
  draw.ctx.fillRect(0, 0, draw.pad.width, draw.pad.height);
  draw.heatCtx.clearRect(0, 0, draw.heat.width, draw.heat.height);
  draw.hasInk = false;
  draw.sample = null;
  draw.target = null;
  draw.result = null;
  draw.seq += 1;  // answers still on their way are for the old drawing
  $("#pad-hint").hidden = false;
  $("#draw-pred").textContent = "–";
  $("#draw-pred-text").textContent = "draw something";
  $("#draw-explaining").textContent = "";
  $("#draw-bars").replaceChildren();
  $("#draw-runner-up").textContent = "";
  $("#draw-stats").textContent = "";
  $("#draw-input").removeAttribute("src");
  $("#draw-heatmap").removeAttribute("src");
}

function padPoint(event) {
  const rect = draw.pad.getBoundingClientRect();
  return [(event.clientX - rect.left) * draw.pad.width / rect.width,
          (event.clientY - rect.top) * draw.pad.height / rect.height];
}

function strokeTo(point) {
  const ctx = draw.ctx;
  ctx.strokeStyle = "#fff";
  ctx.fillStyle = "#fff";
  ctx.lineWidth = 22;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  if (draw.last) {
    ctx.moveTo(draw.last[0], draw.last[1]);
    ctx.lineTo(point[0], point[1]);
    ctx.stroke();
  } else {
    ctx.arc(point[0], point[1], ctx.lineWidth / 2, 0, 2 * Math.PI);
    ctx.fill();
  }
  draw.last = point;
}

function setupPad() {
  draw.pad = $("#pad");
  draw.ctx = draw.pad.getContext("2d");
  draw.heat = $("#pad-heat");
  draw.heatCtx = draw.heat.getContext("2d");
  clearPad();
  draw.pad.addEventListener("pointerdown", (event) => {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    event.preventDefault();
    draw.pad.setPointerCapture(event.pointerId);
    draw.drawing = true;
    draw.last = null;
    draw.sample = null;  // the drawing is no longer exactly the sample
    draw.hasInk = true;
    $("#pad-hint").hidden = true;
    strokeTo(padPoint(event));
  });
  draw.pad.addEventListener("pointermove", (event) => {
    if (!draw.drawing) return;
    for (const e of event.getCoalescedEvents ? event.getCoalescedEvents() : [event]) strokeTo(padPoint(e));
    if (performance.now() - draw.lastSent > THROTTLE_MS) explainDrawing();
  });
  const end = () => {
    if (!draw.drawing) return;
    draw.drawing = false;
    draw.last = null;
    explainDrawing();
  };
  draw.pad.addEventListener("pointerup", end);
  draw.pad.addEventListener("pointercancel", end);
  $("#clear").addEventListener("click", clearPad);
  $("#show-heat").addEventListener("change", () => { draw.heat.hidden = !$("#show-heat").checked; });
  $("#draw-composite").addEventListener("change", explainDrawing);
}

function loadSample(sample) {
  clearPad();
  const small = document.createElement("canvas");
  small.width = 28;
  small.height = 28;
  const pixels = small.getContext("2d").createImageData(28, 28);
  sample.array.forEach((row, y) => row.forEach((v, x) => {
    const k = 4 * (y * 28 + x);
    pixels.data[k] = pixels.data[k + 1] = pixels.data[k + 2] = Math.round(v * 255);
    pixels.data[k + 3] = 255;
  }));
  small.getContext("2d").putImageData(pixels, 0, 0);
  draw.ctx.imageSmoothingEnabled = true;
  draw.ctx.drawImage(small, 0, 0, draw.pad.width, draw.pad.height);
  draw.sample = sample;
  draw.hasInk = true;
  $("#pad-hint").hidden = true;
  explainDrawing();
}

async function drawingRequest() {
  const model = app.drawModel.name;
  const composite = $("#draw-composite").value;
  if (draw.sample) {  // a held-out digit as it is: the exact 28x28 values
    return api("/api/explain", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ array: draw.sample.array, model, composite, target: draw.target, raw: true }),
    });
  }
  const blob = await new Promise((resolve) => draw.pad.toBlob(resolve, "image/png"));
  const form = new FormData();
  form.append("image", blob, "drawing.png");
  form.append("model", model);
  form.append("composite", composite);
  form.append("preprocess", "digit");
  form.append("invert", "false");
  form.append("raw", "true");
  if (draw.target !== null) form.append("target", String(draw.target));
  return api("/api/explain", { method: "POST", body: form });
}

// One request at a time; whatever happened meanwhile is sent right after (the latest state wins).
async function explainDrawing() {
  if (!draw.hasInk || !app.drawModel) return;
  if (draw.busy) {
    draw.pending = true;
    return;
  }
  draw.busy = true;
  draw.pending = false;
  draw.lastSent = performance.now();
  const seq = ++draw.seq;
  try {
    const res = await drawingRequest();
    if (seq === draw.seq) {
      showError("");
      renderDrawing(res);
    }
  } catch (err) {
    showError(err.message);
  } finally {
    draw.busy = false;
    if (draw.pending) explainDrawing();
  }
}

// The relevance as translucent red (for) and blue (against) over the drawing, where the model input lies.
function paintHeat(res) {
  const ctx = draw.heatCtx;
  ctx.clearRect(0, 0, draw.heat.width, draw.heat.height);
  if (!res.relevance) return;
  const r = res.relevance[0];
  const h = r.length, w = r[0].length;
  let vmax = 0;
  r.forEach((row) => row.forEach((v) => { vmax = Math.max(vmax, Math.abs(v)); }));
  if (vmax === 0) return;
  const small = document.createElement("canvas");
  small.width = w;
  small.height = h;
  const pixels = small.getContext("2d").createImageData(w, h);
  r.forEach((row, y) => row.forEach((v, x) => {
    const s = v / vmax, k = 4 * (y * w + x);
    pixels.data[k] = s > 0 ? 255 : 0;
    pixels.data[k + 1] = 0;
    pixels.data[k + 2] = s > 0 ? 0 : 255;
    pixels.data[k + 3] = Math.round(Math.min(1, Math.abs(s)) * 235);
  }));
  small.getContext("2d").putImageData(pixels, 0, 0);
  const f = res.frame || { x: 0, y: 0, width: draw.heat.width, height: draw.heat.height };
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, f.x, f.y, f.width, f.height);
}

function renderDrawing(res) {
  draw.result = res;
  const pred = res.prediction_label;
  $("#draw-pred").textContent = pred;
  $("#draw-pred-text").textContent = `predicted with ${percent(res.probabilities[res.prediction])}`;
  const explaining = $("#draw-explaining");
  explaining.replaceChildren();
  explaining.append("explaining: ");
  const b = document.createElement("b");
  b.id = "draw-target";
  b.textContent = res.target === res.prediction ? `${res.target_label} (the prediction)` : res.target_label;
  explaining.append(b);
  if (res.target !== res.prediction) {
    const back = document.createElement("button");
    back.className = "link";
    back.textContent = "back to the prediction";
    back.addEventListener("click", () => { draw.target = null; explainDrawing(); });
    explaining.append(" · ", back);
  }
  renderBars($("#draw-bars"), res, (i) => { draw.target = i; explainDrawing(); });
  const second = runnerUp(res);
  $("#draw-runner-up").textContent = second >= 0
    ? `Runner-up: ${classLabel(res.model, second)} (${percent(res.probabilities[second])}). ` +
      "Click any class to see why the model could take the drawing for it."
    : "";
  $("#draw-input").src = res.input_image;
  $("#draw-heatmap").src = res.heatmap;
  $("#draw-heatmap").dataset.target = String(res.target);
  $("#draw-heatmap-caption").textContent = `relevance for ${res.target_label}`;
  $("#draw-stats").textContent = stats(res);
  paintHeat(res);
}

async function setupSamples() {
  const samples = await api("/api/samples");
  $("#samples").replaceChildren(...samples.map((sample) => {
    const button = document.createElement("button");
    button.type = "button";
    button.title = `a held-out ${sample.label}`;
    button.dataset.label = String(sample.label);
    const img = document.createElement("img");
    img.src = sample.image;
    img.alt = `digit ${sample.label}`;
    button.append(img);
    button.addEventListener("click", () => loadSample(sample));
    return button;
  }));
}

// ------------------------------------------------------------------ upload

const upload = { file: null, target: null, seq: 0 };

function currentUploadModel() {
  return app.models.find((m) => m.name === $("#up-model").value) || app.models[0];
}

function fillUploadControls() {
  const model = currentUploadModel();
  fillComposites($("#up-composite"), model);
  const target = $("#up-target");
  const choices = [option("", "the predicted class")];
  const names = model.classes || (model.num_classes ? [...Array(model.num_classes).keys()].map(String) : []);
  names.forEach((name, i) => choices.push(option(String(i), name === String(i) ? name : `${i}: ${name}`)));
  target.replaceChildren(...choices);
  upload.target = null;
  $("#up-preprocess-field").hidden = !model.drawable;
  $("#up-preprocess").value = "model";
  $("#up-invert").checked = model.preprocessing.invert;
}

async function explainUpload() {
  if (!upload.file) return;
  if (app.limits && upload.file.size > app.limits.max_bytes) {
    showError(`${upload.file.name} is too large: at most ${app.limits.max_bytes / 1048576} MB`);
    return;
  }
  const model = currentUploadModel();
  const form = new FormData();
  form.append("image", upload.file, upload.file.name);
  form.append("model", model.name);
  form.append("composite", $("#up-composite").value);
  if (upload.target !== null) form.append("target", String(upload.target));
  form.append("preprocess", model.drawable ? $("#up-preprocess").value : "model");
  form.append("invert", $("#up-invert").checked ? "true" : "false");
  const seq = ++upload.seq;
  $("#upload").classList.add("busy");
  try {
    const res = await api("/api/explain", { method: "POST", body: form });
    if (seq === upload.seq) {
      showError("");
      renderUpload(res);
    }
  } catch (err) {
    if (seq === upload.seq) showError(`${upload.file.name}: ${err.message}`);
  } finally {
    if (seq === upload.seq) $("#upload").classList.remove("busy");
  }
}

function renderUpload(res) {
  const pred = $("#up-pred");
  pred.classList.remove("muted");
  pred.textContent = `Predicted: ${res.prediction_label} (${percent(res.probabilities[res.prediction])})`;
  $("#up-explaining").textContent = `explaining: ${res.target_label}` +
    (res.target === res.prediction ? " (the prediction)" : "");
  renderBars($("#up-bars"), res, (i) => {
    upload.target = i;
    $("#up-target").value = i === null ? "" : String(i);
    explainUpload();
  }, 5);
  $("#up-input").src = res.input_image || "";
  $("#up-heatmap").src = res.heatmap || "";
  if (res.overlay) $("#up-overlay").src = res.overlay; else $("#up-overlay").removeAttribute("src");
  $("#up-stats").textContent = stats(res);
  const stem = (upload.file.name.replace(/\.[^.]+$/, "") || "image") + `_${res.target_label}`.replace(/[^\w.-]+/g, "_");
  const link = $("#up-download");
  link.href = res.heatmap;
  link.download = `${stem}_heatmap.png`;
  link.hidden = !res.heatmap;
  const overlayLink = $("#up-download-overlay");
  overlayLink.href = res.overlay || "";
  overlayLink.download = `${stem}_overlay.png`;
  overlayLink.hidden = !res.overlay;
}

function setupUpload() {
  const models = $("#up-model");
  models.replaceChildren(...app.models.map((m) => option(m.name, m.name)));
  fillUploadControls();
  models.addEventListener("change", () => { fillUploadControls(); explainUpload(); });
  $("#up-composite").addEventListener("change", explainUpload);
  $("#up-preprocess").addEventListener("change", explainUpload);
  $("#up-invert").addEventListener("change", explainUpload);
  $("#up-target").addEventListener("change", () => {
    const v = $("#up-target").value;
    upload.target = v === "" ? null : Number(v);
    explainUpload();
  });
  const choose = (file) => {
    if (!file) return;
    upload.file = file;
    upload.target = null;
    $("#up-target").value = "";
    $("#drop-text").textContent = `${file.name} · choose another or drop it here`;
    explainUpload();
  };
  $("#up-file").addEventListener("change", () => choose($("#up-file").files[0]));
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    choose(e.dataTransfer.files[0]);
  });
  const limits = app.limits;
  $("#up-limits").textContent = `Images up to ${limits.max_bytes / 1048576} MB and ` +
    `${limits.max_side}×${limits.max_side} pixels: PNG, JPEG, GIF, BMP, WebP, TIFF.`;
}

// ------------------------------------------------------------------ tabs and start

function showTab(name) {
  for (const tab of ["draw", "upload"]) {
    $(`#tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`#${tab}`).hidden = tab !== name;
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

async function start() {
  $("#tab-draw").addEventListener("click", () => showTab("draw"));
  $("#tab-upload").addEventListener("click", () => showTab("upload"));
  try {
    const info = await api("/api/models");
    app.models = info.models;
    app.limits = info.limits;
  } catch (err) {
    showError(`cannot reach the server: ${err.message}`);
    return;
  }
  app.drawModel = app.models.find((m) => m.drawable) || null;
  if (app.drawModel) {
    fillComposites($("#draw-composite"), app.drawModel);
    setupPad();
    setupSamples().catch((err) => showError(err.message));
  } else {
    $("#draw-grid").hidden = true;
    $("#draw-unavailable").hidden = false;
  }
  setupUpload();
  showTab(location.hash === "#upload" || !app.drawModel ? "upload" : "draw");
  document.body.dataset.ready = "true";
}

start();
