// lrp serve: the page. Plain JavaScript, no build step, no network but this server.
"use strict";

const $ = (selector) => document.querySelector(selector);
const THROTTLE_MS = 120;   // while drawing, at most one request per this many milliseconds
const DEBOUNCE_MS = 250;   // while typing, a text is explained once the keys rest this long

const app = {
  models: [],
  imageModels: [],
  textModels: [],
  vqaModels: [],
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

// "explaining: <class>" with a way back to the prediction when another class is explained.
// Left as it is when nothing changed: the camera calls this on every frame, and a button rebuilt that
// often cannot be clicked.
function showExplaining(element, id, label, isPrediction, back, event = "click") {
  const shown = JSON.stringify([label, isPrediction]);
  if (element.dataset.shown === shown) return;
  element.dataset.shown = shown;
  element.replaceChildren("explaining: ");
  const b = document.createElement("b");
  b.id = id;
  b.textContent = isPrediction ? `${label} (the prediction)` : label;
  element.append(b);
  if (!isPrediction) {
    const button = document.createElement("button");
    button.className = "link";
    button.textContent = "back to the prediction";
    button.addEventListener(event, back);
    element.append(" · ", button);
  }
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
  showExplaining($("#draw-explaining"), "draw-target", res.target_label, res.target === res.prediction,
                 () => { draw.target = null; explainDrawing(); });
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
  return app.imageModels.find((m) => m.name === $("#up-model").value) || app.imageModels[0];
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
  models.replaceChildren(...app.imageModels.map((m) => option(m.name, m.name)));
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

// ------------------------------------------------------------------ text

const text = {
  target: null,     // the class to explain; null: the prediction
  timer: null,      // the debounce timer while typing
  busy: false,      // a request is on its way
  pending: false,   // the text or the options changed meanwhile: explain again when it is back
  seq: 0,           // number of the latest request (or reset): older answers are not shown
  result: null,     // the answer shown
  sent: "",         // the text of the answer shown
  examples: [],
};

function currentTextModel() {
  return app.textModels.find((m) => m.name === $("#text-model").value) || app.textModels[0];
}

function updateCount() {
  const n = characters($("#text-input").value);
  const limit = app.limits && app.limits.max_text_chars;
  const count = $("#text-count");
  count.textContent = limit ? `${n.toLocaleString("en")} / ${limit.toLocaleString("en")} characters`
    : `${n.toLocaleString("en")} characters`;
  count.classList.toggle("over", Boolean(limit && n > limit));
}

function resetText() {
  clearTimeout(text.timer);
  text.seq += 1;  // answers still on their way are for an older text
  text.result = null;
  text.sent = "";
  $("#text-pred").textContent = "–";
  $("#text-pred-text").textContent = "type something";
  $("#text-explaining").textContent = "";
  $("#text-bars").replaceChildren();
  $("#text-other").textContent = "";
  $("#text-stats").textContent = "";
  $("#text-heat-title").textContent = "Why";
  const heat = $("#text-heat");
  heat.replaceChildren(Object.assign(document.createElement("span"), {
    className: "muted", textContent: "the heatmap of the text appears here" }));
  delete heat.dataset.target;
  delete heat.dataset.sent;
  $("#text-hover").textContent = "hover over a word to see its relevance";
}

function scheduleText() {
  clearTimeout(text.timer);
  updateCount();
  if (!$("#text-input").value.trim()) {
    resetText();
    return;
  }
  text.timer = setTimeout(explainText, DEBOUNCE_MS);
}

// Characters as the server counts them (code points, not UTF-16 units: an emoji is one).
function characters(value) {
  return Array.from(value).length;
}

// One request at a time; whatever changed meanwhile is sent right after. An answer is shown only if no newer
// request (or reset) came after it and nothing changed while it was on its way (then the next request is
// pending), so the page never shows the heatmap of a text that is no longer in the box.
async function explainText() {
  clearTimeout(text.timer);
  const value = $("#text-input").value;
  if (!value.trim()) return;
  const limit = app.limits && app.limits.max_text_chars;
  if (limit && characters(value) > limit) {
    text.seq += 1;
    showError(`The text has ${characters(value).toLocaleString("en")} characters: at most ` +
      `${limit.toLocaleString("en")} are taken. Shorten it (the model reads only its start).`);
    return;
  }
  if (text.busy) {
    text.pending = true;
    return;
  }
  text.busy = true;
  text.pending = false;
  const seq = ++text.seq;
  $("#text").classList.add("working");
  try {
    const res = await api("/api/explain", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: currentTextModel().name, text: value, target: text.target,
                             composite: $("#text-composite").value, words: true }),
    });
    if (seq === text.seq && !text.pending) {
      showError("");
      text.sent = value;
      renderText(res);
    }
  } catch (err) {
    if (seq === text.seq && !text.pending) showError(err.message);
  } finally {
    text.busy = false;
    $("#text").classList.remove("working");
    if (text.pending) explainText();
  }
}

function signed(v) {
  return `${v >= 0 ? "+" : "−"}${Math.abs(v).toPrecision(3)}`;
}

// bwr, as lrp's token heatmaps: blue (-1), white (0), red (+1)
function heatColour(s) {
  const t = Math.max(-1, Math.min(1, s));
  const fade = Math.round(255 * (1 - Math.abs(t)));
  return t >= 0 ? [255, fade, fade] : [fade, fade, 255];
}

// A word or token coloured by its relevance (bwr, scaled by vmax), dark ones in white; the value in data-relevance.
function paintRelevance(el, value, vmax) {
  const [r, g, b] = heatColour(vmax > 0 ? value / vmax : 0);
  el.style.backgroundColor = `rgb(${r}, ${g}, ${b})`;
  if (0.299 * r + 0.587 * g + 0.114 * b < 110) el.style.color = "#fff";
  el.dataset.relevance = value.toPrecision(9);
}

// A token as text when the tokenizer gives no character offsets: its marks for spaces and line breaks undone.
function tokenText(token) {
  return token.replace(/^##/, "").replace(/[Ġ▁]/g, " ").replace(/Ċ/g, "\n");
}

// What the heatmap shows: one unit per word (merge) or per token, each with its token positions and relevance.
function textUnits(res, merge) {
  const wordOf = new Map();
  if (merge && res.words) res.words.forEach((w, k) => w.tokens.forEach((p) => wordOf.set(p, k)));
  const units = [];
  const seen = new Set();
  res.tokens.forEach((token, p) => {
    if (wordOf.has(p)) {
      const k = wordOf.get(p);
      if (seen.has(k)) return;
      seen.add(k);
      const w = res.words[k];
      units.push({ positions: w.tokens, value: w.relevance, label: w.word, kind: "word" });
      return;
    }
    const span = res.spans[p];
    const piece = span ? res.text.slice(span[0], span[1]) : tokenText(token);
    let kind = "token";
    if (res.special[p]) kind = "special";
    else if (!piece.trim()) kind = merge ? "plain" : "space";
    units.push({ positions: [p], value: res.relevance[p], label: res.special[p] ? token : piece, kind });
  });
  return units;
}

function renderHeat(res) {
  const merge = $("#text-words").checked;
  const units = textUnits(res, merge);
  const coloured = units.filter((u) => u.kind !== "plain");
  const vmax = coloured.reduce((m, u) => Math.max(m, Math.abs(u.value)), 0);
  const heat = $("#text-heat");
  const parts = [];
  let cursor = 0;
  units.forEach((unit, k) => {
    const spans = unit.positions.map((p) => res.spans[p]).filter(Boolean);
    let shown;
    let lead = "";
    if (spans.length) {
      const start = Math.max(cursor, Math.min(...spans.map((sp) => sp[0])));
      const end = Math.max(start, ...spans.map((sp) => sp[1]));
      lead = res.text.slice(cursor, start);
      shown = res.text.slice(start, end);
      cursor = end;
    } else if (unit.kind === "word" || unit.kind === "token") {  // a tokenizer without offsets
      shown = unit.label.trimStart();
      lead = k > 0 && (unit.kind === "word" || shown !== unit.label) ? " " : "";
    } else {  // special tokens
      shown = unit.label;
    }
    if (lead) parts.push(document.createTextNode(lead));
    if (unit.kind === "plain") {
      parts.push(document.createTextNode(shown));
      return;
    }
    const el = document.createElement("span");
    el.className = "tok" + (unit.kind === "special" ? " special" : "") + (unit.kind === "space" ? " space" : "");
    // a token of white space shows as ␣ and ↵ (its line breaks kept after it)
    el.textContent = unit.kind === "space" ? [...shown].map((c) => (c === "\n" ? "↵" : "␣")).join("") || "␣" : shown;
    paintRelevance(el, unit.value, vmax);
    el.dataset.tokens = unit.positions.join(" ");
    const name = unit.kind === "word" || (unit.kind === "token" && spans.length) ? shown : res.tokens[unit.positions[0]];
    el.title = `${name}: ${signed(unit.value)}`;
    parts.push(el);
    const breaks = unit.kind === "space" ? shown.split("\n").length - 1 : 0;
    if (breaks) parts.push(document.createTextNode("\n".repeat(breaks)));
  });
  const rest = res.text.slice(cursor);
  if (res.truncated && rest.trim()) {
    const cut = document.createElement("span");
    cut.className = "cut";
    cut.textContent = rest.slice(0, 2000) + (rest.length > 2000 ? " …" : "");
    cut.title = `not read: the model reads the first ${res.tokens.length} tokens`;
    parts.push(cut);
  } else if (rest) {
    parts.push(document.createTextNode(rest));
  }
  heat.replaceChildren(...parts);
  heat.dataset.target = String(res.target);
  heat.dataset.merge = String(merge);
  heat.dataset.sent = String(text.sent.length);
}

function hoverText(event) {
  const el = event.target.closest && event.target.closest("#text-heat .tok");
  const res = text.result;
  const line = $("#text-hover");
  if (!el || !res) {
    line.textContent = `hover over a ${$("#text-words").checked ? "word" : "token"} to see its relevance`;
    return;
  }
  const positions = el.dataset.tokens.split(" ").map(Number);
  const value = Number(el.dataset.relevance);
  line.replaceChildren();
  const b = document.createElement("b");
  b.textContent = el.title.slice(0, el.title.lastIndexOf(": "));
  line.append(b, ` ${signed(value)} for ${res.target_label}`);
  if (positions.length > 1) {
    line.append(" · its tokens: " + positions.map((p) => `${piece(res, p)} ${signed(res.relevance[p])}`).join(", "));
  } else {
    line.append(` · token ${positions[0]}: ${res.tokens[positions[0]]}`);
  }
}

// A token as the characters it was read from, quoted (the vocabulary piece when there are none).
function piece(res, p) {
  const span = res.spans[p];
  return span && span[1] > span[0] ? JSON.stringify(res.text.slice(span[0], span[1])) : res.tokens[p];
}

function renderText(res) {
  text.result = res;
  $("#text-pred").textContent = res.prediction_label;
  $("#text-pred-text").textContent = `predicted with ${percent(res.probabilities[res.prediction])}`;
  showExplaining($("#text-explaining"), "text-target", res.target_label, res.target === res.prediction,
                 () => { text.target = null; explainText(); });
  renderBars($("#text-bars"), res, (i) => { text.target = i; explainText(); }, 10);
  const others = res.probabilities.map((p, i) => i).filter((i) => i !== res.target);
  $("#text-other").textContent = res.opposite_label
    ? `Click ${res.opposite_label} to see what speaks for it: its relevance is exactly minus that for ` +
      `${res.target_label}, so red and blue swap.`
    : (others.length ? "Click another class to see what speaks for it." : "");
  $("#text-heat-title").textContent = `Why ${res.target_label}?`;
  $("#text-legend-for").textContent = `for ${res.target_label}`;
  $("#text-legend-against").textContent = res.opposite_label ? `for ${res.opposite_label}` : "against";
  renderHeat(res);
  const share = res.score ? ` (${(100 * res.relevance_sum / res.score).toFixed(1)}% of the score ${res.score.toFixed(3)})` : "";
  const read = res.truncated ? `the first ${res.tokens.length} tokens (the rest was cut off)` : `${res.tokens.length} tokens`;
  const mail = text.sent && res.text !== text.sent && !text.sent.startsWith(res.text)
    ? " · read as an e-mail: its subject and body" : "";
  $("#text-stats").textContent = `${read}${mail} · relevance sum ${res.relevance_sum.toFixed(3)}${share} · ` +
    `${res.composite} · ${res.elapsed_ms.toFixed(1)} ms on the server`;
}

async function loadExamples() {
  const model = currentTextModel();
  const select = $("#text-example");
  select.replaceChildren(option("", "choose a mail…"));
  try {
    text.examples = await api(`/api/examples?model=${encodeURIComponent(model.name)}`);
  } catch (err) {
    text.examples = [];
    showError(err.message);
  }
  text.examples.forEach((ex, k) => {
    const subject = ex.subject.length > 70 ? ex.subject.slice(0, 69) + "…" : ex.subject;
    select.append(option(String(k), `${ex.label_name} · ${subject || "(no subject)"}`));
  });
  $("#text-examples-field").hidden = text.examples.length === 0;
}

function describeTextModel() {
  const model = currentTextModel();
  const parts = [`${model.name}: a text classifier (${(model.classes || []).join(", ")})`];
  if (model.accuracy !== null && model.accuracy !== undefined) {
    parts.push(`held-out accuracy ${(100 * model.accuracy).toFixed(1)}%`);
  }
  if (model.max_tokens) {
    parts.push(model.truncates ? `reads the first ${model.max_tokens} tokens of a text`
      : `reads texts of up to ${model.max_tokens} tokens`);
  }
  $("#text-about").textContent = parts.join("; ") + ".";
}

function setupText() {
  const models = $("#text-model");
  models.replaceChildren(...app.textModels.map((m) => option(m.name, m.name)));
  $("#text-model-field").hidden = app.textModels.length < 2;
  const changed = () => {
    fillComposites($("#text-composite"), currentTextModel());
    describeTextModel();
    text.target = null;
    loadExamples();
  };
  changed();
  models.addEventListener("change", () => { changed(); explainText(); });
  $("#text-composite").addEventListener("change", explainText);
  $("#text-input").addEventListener("input", () => {
    $("#text-example").value = "";
    scheduleText();
  });
  $("#text-clear").addEventListener("click", () => {
    $("#text-input").value = "";
    $("#text-example").value = "";
    text.target = null;
    updateCount();
    resetText();
    showError("");
  });
  $("#text-example").addEventListener("change", () => {
    const ex = text.examples[Number($("#text-example").value)];
    if (!ex || $("#text-example").value === "") return;
    $("#text-input").value = ex.text;
    text.target = null;
    updateCount();
    explainText();
  });
  $("#text-words").addEventListener("change", () => {
    if (text.result) renderHeat(text.result);
    hoverText({ target: document.body });
  });
  const heat = $("#text-heat");
  heat.addEventListener("mouseover", hoverText);
  heat.addEventListener("mouseleave", hoverText);
  updateCount();
}

// ------------------------------------------------------------------ vqa

const vqa = {
  seed: null,       // the scene shown
  target: null,     // the answer to explain; null: the model's answer
  seq: 0,           // number of the latest question (or scene): older answers are not shown
  sceneSeq: 0,      // number of the latest scene request
  result: null,     // the answer shown
  suggestions: [],  // the generated questions about the scene
};

function currentVQAModel() {
  return app.vqaModels.find((m) => m.name === $("#vqa-model").value) || app.vqaModels[0];
}

// The server's message next to the question field (it names the words the model knows).
function vqaError(message) {
  const box = $("#vqa-error");
  box.textContent = message;
  box.hidden = !message;
}

function resetVQA() {
  vqa.seq += 1;  // answers still on their way are for the old scene
  vqa.result = null;
  vqa.target = null;
  $("#vqa-answer").textContent = "–";
  $("#vqa-answer-text").textContent = "ask a question";
  $("#vqa-explaining").textContent = "";
  delete $("#vqa-explaining").dataset.shown;
  $("#vqa-asked").textContent = "";
  $("#vqa-bars").replaceChildren();
  $("#vqa-truth").textContent = "";
  $("#vqa-mask-figure").hidden = true;
  $("#vqa-input").removeAttribute("src");
  const heatmap = $("#vqa-heatmap");
  heatmap.removeAttribute("src");
  delete heatmap.dataset.target;
  $("#vqa-heatmap-caption").textContent = "relevance";
  $("#vqa-heat-title").textContent = "Why";
  $("#vqa-words").replaceChildren(Object.assign(document.createElement("span"), {
    className: "muted", textContent: "the question's words, coloured by their relevance, appear here" }));
  $("#vqa-hover").textContent = "hover over a word to see its relevance";
  $("#vqa-stats").textContent = "";
  $("#vqa").classList.remove("working");
}

async function newScene() {
  const seq = ++vqa.sceneSeq;
  $("#vqa-new").disabled = true;
  try {
    const scene = await api(`/api/vqa/scene?model=${encodeURIComponent(currentVQAModel().name)}`);
    if (seq !== vqa.sceneSeq) return;
    resetVQA();
    vqaError("");
    vqa.seed = scene.seed;
    const img = $("#vqa-scene");
    img.src = scene.scene;
    img.dataset.seed = String(scene.seed);
    $("#vqa-seed").textContent = `scene ${scene.seed}`;
    $("#vqa-seed").title = `${scene.objects.length} objects; GET /api/vqa/scene?seed=${scene.seed} gives it again`;
    vqa.suggestions = scene.questions;
    $("#vqa-suggest").replaceChildren(option("", "choose a question…"),
      ...scene.questions.map((q, k) => option(String(k), q.question)));
  } catch (err) {
    if (seq === vqa.sceneSeq) vqaError(err.message);
  } finally {
    if (seq === vqa.sceneSeq) $("#vqa-new").disabled = false;
  }
}

// Ask about the scene shown, explaining vqa.target; an answer is shown only if no newer question (or scene)
// came after it.
async function askVQA(question) {
  if (vqa.seed === null) return;
  const seq = ++vqa.seq;
  const seed = vqa.seed;
  $("#vqa").classList.add("working");
  try {
    const res = await api("/api/vqa/explain", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: currentVQAModel().name, seed, question, target: vqa.target,
                             composite: $("#vqa-composite").value }),
    });
    if (seq === vqa.seq && seed === vqa.seed) {
      vqaError("");
      renderVQA(res);
    }
  } catch (err) {
    if (seq === vqa.seq) vqaError(err.message);
  } finally {
    if (seq === vqa.seq) $("#vqa").classList.remove("working");
  }
}

function askTyped() {
  vqa.target = null;
  askVQA($("#vqa-question").value);
}

// Another answer of the question shown (null: the model's own answer).
function explainAnswer(i) {
  if (!vqa.result) return;
  vqa.target = i;
  askVQA(vqa.result.question);
}

function showVQAHeatmap() {
  const res = vqa.result;
  if (res) $("#vqa-heatmap").src = $("#vqa-overlay").checked ? res.overlay : res.heatmap;
}

function renderVQAWords(res) {
  const vmax = res.words.reduce((m, w) => Math.max(m, Math.abs(w.relevance)), 0);
  const parts = [];
  res.words.forEach((w, k) => {
    if (k) parts.push(document.createTextNode(" "));
    const el = document.createElement("span");
    el.className = "tok";
    el.textContent = w.word;
    paintRelevance(el, w.relevance, vmax);
    el.title = `${w.word}: ${signed(w.relevance)}`;
    parts.push(el);
  });
  const box = $("#vqa-words");
  box.replaceChildren(...parts);
  box.dataset.target = String(res.target);
}

function hoverVQA(event) {
  const el = event.target.closest && event.target.closest("#vqa-words .tok");
  const res = vqa.result;
  const line = $("#vqa-hover");
  if (!el || !res) {
    line.textContent = "hover over a word to see its relevance";
    return;
  }
  const b = document.createElement("b");
  b.textContent = el.textContent;
  line.replaceChildren(b, ` ${signed(Number(el.dataset.relevance))} for ${res.explained}`);
}

const VQA_TYPES = { exist: "is there…", query_colour: "what colour…", query_shape: "what shape…",
                    count: "how many…", relate: "left or right…" };

function describeTruth(res) {
  const truth = res.truth;
  const figure = $("#vqa-mask-figure");
  figure.hidden = !(truth && truth.mask_share > 0);
  if (!truth) {
    $("#vqa-truth").textContent = `No ground truth for this question: ${res.truth_note.replace(/\.?$/, ".")} ` +
      "The model answers anyway.";
    return;
  }
  $("#vqa-mask").src = truth.mask;
  let where;
  if (truth.mass_accuracy !== null) {
    where = ` ${percent(truth.mass_accuracy)} of the positive relevance on the scene lies on the objects the ` +
      `question refers to (they cover ${percent(truth.mask_share)} of it).`;
  } else if (truth.mask_share === 0) {
    where = " Nothing in the scene answers to the description: no pixels mark the evidence.";
  } else {
    where = " No pixel speaks for the explained answer.";
  }
  $("#vqa-truth").textContent = `Ground truth: ${truth.answer} (${VQA_TYPES[truth.type] || truth.type}); ` +
    `the model is ${truth.correct ? "right" : "wrong"}.${where}`;
}

function renderVQA(res) {
  vqa.result = res;
  $("#vqa-answer").textContent = res.answer;
  $("#vqa-answer-text").textContent = `answered with ${percent(res.probability)}`;
  showExplaining($("#vqa-explaining"), "vqa-target", res.explained, res.target === res.prediction,
                 () => explainAnswer(null));
  $("#vqa-asked").textContent = `“${res.question}”`;
  renderBars($("#vqa-bars"), res, explainAnswer);  // all 19, in the model's order: yes/no, colours, shapes, counts
  describeTruth(res);
  $("#vqa-input").src = res.scene;
  showVQAHeatmap();
  const heatmap = $("#vqa-heatmap");
  heatmap.dataset.target = String(res.target);
  heatmap.dataset.question = res.question;
  heatmap.dataset.seed = String(res.seed);
  $("#vqa-heatmap-caption").textContent = `relevance for ${res.explained}`;
  $("#vqa-heat-title").textContent = `Why ${res.explained}?`;
  $("#vqa-legend-for").textContent = `for ${res.explained}`;
  renderVQAWords(res);
  $("#vqa-stats").textContent = `relevance: pixels ${res.image_relevance_sum.toFixed(3)} + words ` +
    `${res.question_relevance_sum.toFixed(3)} = ${res.relevance_sum.toFixed(3)} of score ${res.score.toFixed(3)} · ` +
    `${res.composite} · ${res.elapsed_ms.toFixed(1)} ms on the server`;
}

function describeVQAModel() {
  const model = currentVQAModel();
  const parts = [`${model.name}: answers questions about scenes of coloured shapes with one of ` +
    `${model.classes.length} words`];
  if (model.accuracy !== null && model.accuracy !== undefined) {
    parts.push(`held-out accuracy ${(100 * model.accuracy).toFixed(1)}%`);
  }
  parts.push(`it knows ${model.vocabulary.length} words: ${model.vocabulary.join(", ")}`);
  $("#vqa-about").textContent = parts.join("; ") + ".";
}

function setupVQA() {
  const models = $("#vqa-model");
  models.replaceChildren(...app.vqaModels.map((m) => option(m.name, m.name)));
  $("#vqa-model-field").hidden = app.vqaModels.length < 2;
  fillComposites($("#vqa-composite"), currentVQAModel());
  describeVQAModel();
  models.addEventListener("change", () => {
    fillComposites($("#vqa-composite"), currentVQAModel());
    describeVQAModel();
    if (vqa.result) explainAnswer(null);
  });
  $("#vqa-composite").addEventListener("change", () => { if (vqa.result) explainAnswer(vqa.target); });
  $("#vqa-new").addEventListener("click", newScene);
  $("#vqa-ask").addEventListener("click", askTyped);
  $("#vqa-question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.isComposing) {
      event.preventDefault();
      askTyped();
    }
  });
  $("#vqa-suggest").addEventListener("change", () => {
    const q = vqa.suggestions[Number($("#vqa-suggest").value)];
    if (!q || $("#vqa-suggest").value === "") return;
    $("#vqa-question").value = q.question;
    askTyped();
  });
  $("#vqa-overlay").addEventListener("change", showVQAHeatmap);
  const words = $("#vqa-words");
  words.addEventListener("mouseover", hoverVQA);
  words.addEventListener("mouseleave", hoverVQA);
  resetVQA();
  newScene();
}

// ------------------------------------------------------------------ camera

const CAMERA_SQUARE = 0.75;  // digits: the centre square of this share of the frame's shorter side is sent...
const DIGIT_SIDE = 280;      // ...at most this many pixels a side (as the drawing pad)
const FRAME_SIDE = 640;      // other models: the whole frame, at most this many pixels on its longer side
const JPEG_QUALITY = 0.85;
const FPS_WINDOW_MS = 2000;  // frames/s: the answers of the last this many milliseconds
const ERROR_PAUSE_MS = 500;  // after a frame the server could not explain, wait this long before the next

const cam = {
  stream: null,   // the camera while it runs
  ws: null,       // the WebSocket to /api/camera
  busy: false,    // a frame is on its way: the next one is sent when its answer is back, so nothing piles up
  target: null,   // the class to explain; null: the prediction
  answers: [],    // when the recent answers came, for frames/s
  frames: 0,      // answers shown since the camera started
  result: null,   // the answer shown
  fresh: false,   // the camera has shown a frame that was not sent yet
  waiting: false, // an answer is back: send the camera's next frame as soon as it shows
  run: 0,         // which start of the camera this is (the frame watcher of an earlier one stops)
  canvas: document.createElement("canvas"),
};

function cameraMessage(message) {
  const box = $("#cam-message");
  box.textContent = message;
  box.hidden = !message;
}

function cameraModel() {
  return app.imageModels.find((m) => m.name === $("#cam-model").value) || app.imageModels[0];
}

function digitMode() {
  return cameraModel().drawable && $("#cam-preprocess").value === "digit";
}

function cameraOptions() {
  return { model: cameraModel().name, composite: $("#cam-composite").value, target: cam.target,
           preprocess: digitMode() ? "digit" : "model", invert: $("#cam-invert").checked };
}

function sendCameraOptions() {
  if (cam.ws && cam.ws.readyState === WebSocket.OPEN) cam.ws.send(JSON.stringify(cameraOptions()));
}

function describeCamera() {
  const digit = digitMode();
  $("#cam-hint").textContent = digit
    ? "Write a digit in thick dark strokes on white paper and hold it inside the square, the paper filling it. " +
      "The square is cropped, inverted and centred as a drawn digit is."
    : `The whole frame goes through ${cameraModel().name}'s preprocessing, as an upload does; what the model ` +
      "does not see is darkened.";
  $("#cam-input-caption").textContent = digit ? "model input (28×28)" : "model input";
  placeGuide();
}

function fillCameraControls() {
  const model = cameraModel();
  fillComposites($("#cam-composite"), model);
  $("#cam-preprocess-field").hidden = !model.drawable;
  $("#cam-preprocess").value = model.drawable ? "digit" : "model";
  $("#cam-invert").checked = model.drawable || Boolean(model.preprocessing && model.preprocessing.invert);
  cam.target = null;
  describeCamera();
}

// The square that is sent (digits), drawn over the video where the video shows.
function placeGuide() {
  const video = $("#cam-video");
  const guide = $("#cam-guide");
  const vw = video.videoWidth;
  const vh = video.videoHeight;
  guide.hidden = !(cam.stream && vw && vh && digitMode());
  if (guide.hidden) return;
  const cw = video.clientWidth;
  const ch = video.clientHeight;
  const scale = Math.min(cw / vw, ch / vh);
  const side = CAMERA_SQUARE * Math.min(vw, vh) * scale;
  Object.assign(guide.style, { width: `${side}px`, height: `${side}px`, left: `${(cw - side) / 2}px`,
                               top: `${(ch - side) / 2}px` });
}

// Where the frame sent comes from in the video, and its size.
function captureRegion(video) {
  const vw = video.videoWidth;
  const vh = video.videoHeight;
  if (digitMode()) {
    const side = Math.round(CAMERA_SQUARE * Math.min(vw, vh));
    const out = Math.min(DIGIT_SIDE, side);
    return { sx: (vw - side) / 2, sy: (vh - side) / 2, sw: side, sh: side, w: out, h: out };
  }
  const scale = Math.min(1, FRAME_SIDE / Math.max(vw, vh));
  return { sx: 0, sy: 0, sw: vw, sh: vh, w: Math.round(vw * scale), h: Math.round(vh * scale) };
}

function cameraFailure(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "PermissionDeniedError":
    case "SecurityError":
      return "The camera is blocked: this page was not allowed to use it. Allow the camera for this site (the " +
        "camera icon in the address bar, or the browser's site settings), then press Start camera.";
    case "NotFoundError":
    case "DevicesNotFoundError":
    case "OverconstrainedError":
      return "No camera found: connect a camera (or switch it on), then press Start camera. The Upload tab " +
        "explains photos too.";
    case "NotReadableError":
    case "TrackStartError":
    case "AbortError":
      return "The camera could not be started: another program may be using it. Close that program, then " +
        "press Start camera.";
    default:
      return `The camera could not be started: ${(err && err.message) || err}`;
  }
}

async function startCamera() {
  if (cam.stream) return;
  cameraMessage("");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    cameraMessage("This browser offers no camera here: browsers give the camera only to pages on https:// or " +
      "on this machine (http://localhost or http://127.0.0.1). Open the page that way, or use the Upload tab.");
    return;
  }
  $("#cam-start").disabled = true;
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
  } catch (err) {
    $("#cam-start").disabled = false;
    cameraMessage(cameraFailure(err));
    return;
  }
  if ($("#camera").hidden) {  // the tab was left meanwhile
    stream.getTracks().forEach((track) => track.stop());
    $("#cam-start").disabled = false;
    return;
  }
  cam.stream = stream;
  const video = $("#cam-video");
  video.srcObject = stream;
  video.onloadedmetadata = placeGuide;
  video.play().catch(() => {});
  watchFrames(video, ++cam.run);
  $("#cam-stop").disabled = false;
  $("#cam-idle").hidden = true;
  cam.answers = [];
  cam.frames = 0;
  openCameraSocket();
}

function stopCamera() {
  const ws = cam.ws;
  cam.ws = null;
  cam.busy = false;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "camera stopped");
  if (cam.stream) cam.stream.getTracks().forEach((track) => track.stop());
  cam.stream = null;
  $("#cam-video").srcObject = null;
  $("#cam-guide").hidden = true;
  $("#cam-idle").hidden = false;
  $("#cam-start").disabled = false;
  $("#cam-stop").disabled = true;
  cam.answers = [];
  $("#cam-fps").textContent = "– frames/s";
}

function openCameraSocket() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/api/camera`);
  cam.ws = ws;
  cam.busy = false;
  let opened = false;
  ws.onopen = () => {
    opened = true;
    ws.send(JSON.stringify(cameraOptions()));
    sendFrame();
  };
  ws.onmessage = (event) => {
    if (cam.ws === ws) cameraAnswer(JSON.parse(event.data));
  };
  ws.onclose = (event) => {
    if (cam.ws !== ws) return;  // closed by the page
    stopCamera();
    if (!opened) {
      cameraMessage("Could not connect to the server's camera socket (/api/camera): the server may have " +
        "stopped, or runs without WebSocket support (pip install 'lrp[web]' installs it).");
    } else if (event.code !== 1000) {
      const why = event.reason || `connection closed (code ${event.code})`;
      if ($("#cam-message").hidden) cameraMessage(`The camera stopped: ${why}. Press Start camera to go on.`);
    }
  };
}

// One frame at a time: the next one goes when the answer to this one is back.
function sendFrame() {
  const ws = cam.ws;
  const video = $("#cam-video");
  if (!ws || ws.readyState !== WebSocket.OPEN || cam.busy) return;
  if (!video.videoWidth) {
    setTimeout(sendFrame, 50);
    return;
  }
  const region = captureRegion(video);
  const canvas = cam.canvas;
  canvas.width = region.w;
  canvas.height = region.h;
  canvas.getContext("2d").drawImage(video, region.sx, region.sy, region.sw, region.sh, 0, 0, region.w, region.h);
  cam.busy = true;
  cam.fresh = false;
  cam.waiting = false;
  canvas.toBlob((blob) => {
    if (cam.ws !== ws || ws.readyState !== WebSocket.OPEN || !blob) {
      if (cam.ws === ws) cam.busy = false;
      return;
    }
    ws.send(blob);
  }, "image/jpeg", JPEG_QUALITY);
}

// Notes each new frame the camera shows, and sends it when an answer is waiting for one.
function watchFrames(video, run) {
  if (!video.requestVideoFrameCallback) return;
  const tick = () => {
    if (cam.run !== run || !cam.stream) return;
    cam.fresh = true;
    if (cam.waiting) {
      cam.waiting = false;
      sendFrame();
    }
    video.requestVideoFrameCallback(tick);
  };
  video.requestVideoFrameCallback(tick);
}

// After an answer: the camera's next frame, at once if it has one the server has not seen (or after a pause).
function nextFrame(pause) {
  const video = $("#cam-video");
  if (pause) {
    setTimeout(sendFrame, pause);
  } else if (!video.requestVideoFrameCallback) {
    setTimeout(sendFrame, 1000 / 30);
  } else if (cam.fresh) {
    sendFrame();
  } else {
    cam.waiting = true;
    setTimeout(sendFrame, 200);  // in case no new frame comes (a paused or frozen camera)
  }
}

function cameraAnswer(message) {
  if (message.type === "result") {
    cam.busy = false;
    if (cam.stream) renderCamera(message);
    nextFrame(0);
  } else if (message.type === "error") {
    cameraMessage(message.error);
    if (message.number !== undefined) {  // the answer to a frame: go on after a pause
      cam.busy = false;
      nextFrame(ERROR_PAUSE_MS);
    }
  }
}

function framesPerSecond() {
  const now = performance.now();
  cam.answers.push(now);
  while (cam.answers.length > 2 && now - cam.answers[0] > FPS_WINDOW_MS) cam.answers.shift();
  const span = (now - cam.answers[0]) / 1000;
  return cam.answers.length > 1 && span > 0 ? (cam.answers.length - 1) / span : 0;
}

// The bars, updated in place while the classes stay the same, so that a click is not lost to the next frame.
function updateCameraBars(res) {
  const container = $("#cam-bars");
  const pick = (i) => {
    cam.target = cam.result && i === cam.result.prediction ? null : i;
    sendCameraOptions();
  };
  if (res.probabilities.length > 10) {  // many classes: the top 5, which change from frame to frame
    renderBars(container, res, (i) => pick(i === null ? res.prediction : i), 5);
    container.dataset.model = "";
    return;
  }
  if (container.dataset.model !== res.model || container.children.length !== res.probabilities.length) {
    renderBars(container, res, () => {}, 0);
    container.dataset.model = res.model;
    for (const row of container.children) {
      const fresh = row.cloneNode(true);  // without renderBars's handler
      fresh.addEventListener("click", () => pick(Number(fresh.dataset.cls)));
      row.replaceWith(fresh);
    }
  }
  for (const row of container.children) {
    const i = Number(row.dataset.cls);
    row.className = "bar" + (i === res.prediction ? " predicted" : "") + (i === res.target ? " target" : "");
    row.title = i === res.target ? "explained now" : `why ${classLabel(res.model, i)}?`;
    row.querySelector(".fill").style.width = `${Math.max(0, Math.min(1, res.probabilities[i])) * 100}%`;
    row.querySelector(".value").textContent = percent(res.probabilities[i]);
  }
}

function renderCamera(res) {
  cam.result = res;
  cam.frames += 1;
  const fps = framesPerSecond();
  const view = $("#cam-view");
  view.src = res.view;
  view.dataset.frames = String(cam.frames);
  view.dataset.fps = fps.toFixed(2);
  $("#cam-view-empty").hidden = true;
  const fpsLine = $("#cam-fps");
  fpsLine.replaceChildren();
  const b = document.createElement("b");
  b.textContent = fps ? fps.toFixed(1) : "–";
  fpsLine.append(b, ` frames/s · ${res.elapsed_ms.toFixed(0)} ms on the server · ${res.width}×${res.height}` +
    (res.dropped ? ` · ${res.dropped} dropped` : ""));
  $("#cam-pred").textContent = res.note ? "–" : res.prediction_label;
  $("#cam-pred-text").textContent = res.note || `predicted with ${percent(res.probabilities[res.prediction])}`;
  // the camera's target is the class asked for (the prediction may come to equal it): back while one is asked
  showExplaining($("#cam-explaining"), "cam-target", res.target_label,
                 res.target === res.prediction && cam.target === null,
                 () => { cam.target = null; sendCameraOptions(); }, "pointerdown");
  updateCameraBars(res);
  $("#cam-input").src = res.input_image || "";
  $("#cam-heatmap").src = res.heatmap || "";
  $("#cam-heatmap-caption").textContent = `relevance for ${res.target_label}`;
  $("#cam-stats").textContent = `${stats(res)} (decode ${res.timing.decode_ms.toFixed(1)}, explain ` +
    `${res.timing.explain_ms.toFixed(1)}, draw ${res.timing.render_ms.toFixed(1)})`;
}

function setupCamera() {
  const models = $("#cam-model");
  models.replaceChildren(...app.imageModels.map((m) => option(m.name, m.name)));
  $("#cam-model-field").hidden = app.imageModels.length < 2;
  const first = app.imageModels.find((m) => m.drawable);
  if (first) models.value = first.name;
  fillCameraControls();
  models.addEventListener("change", () => { fillCameraControls(); sendCameraOptions(); });
  $("#cam-composite").addEventListener("change", sendCameraOptions);
  $("#cam-preprocess").addEventListener("change", () => { describeCamera(); sendCameraOptions(); });
  $("#cam-invert").addEventListener("change", sendCameraOptions);
  $("#cam-start").addEventListener("click", startCamera);
  $("#cam-stop").addEventListener("click", stopCamera);
  window.addEventListener("resize", placeGuide);
  window.addEventListener("pagehide", stopCamera);
}

// ------------------------------------------------------------------ tabs and start

const TABS = ["draw", "upload", "camera", "text", "vqa"];

function showTab(name) {
  if (name !== "camera" && cam.stream) stopCamera();  // the camera runs only while its tab shows
  for (const tab of TABS) {
    $(`#tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`#${tab}`).hidden = tab !== name;
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

async function start() {
  for (const tab of TABS) $(`#tab-${tab}`).addEventListener("click", () => showTab(tab));
  try {
    const info = await api("/api/models");
    app.models = info.models;
    app.limits = info.limits;
  } catch (err) {
    showError(`cannot reach the server: ${err.message}`);
    return;
  }
  app.imageModels = app.models.filter((m) => (m.modality || "image") === "image");
  app.textModels = app.models.filter((m) => m.modality === "text");
  app.vqaModels = app.models.filter((m) => m.modality === "vqa");
  app.drawModel = app.imageModels.find((m) => m.drawable) || null;
  const available = [];
  if (app.imageModels.length) {
    if (app.drawModel) {
      fillComposites($("#draw-composite"), app.drawModel);
      setupPad();
      setupSamples().catch((err) => showError(err.message));
    } else {
      $("#draw-grid").hidden = true;
      $("#draw-unavailable").hidden = false;
    }
    setupUpload();
    $("#tab-camera").hidden = false;
    setupCamera();
    available.push("draw", "upload", "camera");
  } else {  // text models only: no image tabs
    $("#tab-draw").hidden = true;
    $("#tab-upload").hidden = true;
  }
  if (app.textModels.length) {
    $("#tab-text").hidden = false;
    setupText();
    available.push("text");
  }
  if (app.vqaModels.length) {
    $("#tab-vqa").hidden = false;
    setupVQA();
    available.push("vqa");
  }
  const asked = location.hash.slice(1);
  const first = app.drawModel ? "draw" : (app.imageModels.length ? "upload" : (app.textModels.length ? "text" : "vqa"));
  showTab(available.includes(asked) && (asked !== "draw" || app.drawModel) ? asked : first);
  document.body.dataset.ready = "true";
}

start();
