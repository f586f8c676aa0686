// visionserve web page: pick an image and a model, run it, see and download the answer.
//
// One request per run: the page asks for JSON and draws the boxes / masks itself on a canvas
// over the original. Only when the browser cannot read the original's pixels (a URL without
// CORS) does it ask the service a second time, for its rendered picture.
"use strict";

const POLL_MS = 300;             // job status polling interval
const ORIGINAL_WAIT_MS = 5000;   // how long a run waits for the browser's copy of the image
const MASK_ALPHA = 0.4;
// Shown open; the rest of a model's parameters go under "More parameters".
const MAIN_PARAMS = ["confidence", "score_threshold", "small_faces", "draw", "points_per_side"];
// The page's default model, when ready: the most accurate detector; then the seed's CNN.
const DEFAULT_MODELS = ["yunet-face-detection", "cnn-face-detection"];
const LANDMARK_COLORS = ["#2060ff", "#2060ff", "#ff2020", "#ffd000", "#ffd000"];
const KIND_LABELS = { detector: "Face detection", segmenter: "Segment Anything" };

const $ = (id) => document.getElementById(id);

const state = {
  models: [],
  file: null,            // the chosen or dropped File, or null when a URL is used
  original: null,        // Promise of {img, drawable} for the current image
  loadedUrl: null,       // the URL `original` was loaded from (null for a local file)
  originalUrl: null,     // object URL of a local file, revoked when replaced
  resultUrl: null,       // object URL of the result picture
};

class ApiError extends Error {
  constructor(status, code, detail) {
    super(status ? `${status} ${code}: ${detail}` : detail);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

// -- HTTP ------------------------------------------------------------------------------
function authHeaders(extra) {
  const headers = { ...(extra || {}) };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  } catch (err) {
    throw new ApiError(0, "unreachable",
      `Cannot reach the visionserve service (${err.message}). Is it running? Start it with ` +
      "`make run`.");
  }
  if (!response.ok) {
    let code = "http_error";
    let detail = response.statusText;
    try {
      const body = await response.json();
      code = body.error || code;
      detail = body.detail || detail;
    } catch (_) {
      // not JSON: keep the status text
    }
    if (response.status === 401 || response.status === 403) {
      detail += " (enter the API key under Service settings)";
    }
    throw new ApiError(response.status, code, detail);
  }
  return response;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

// The image and the parameters as a request body: a multipart upload for a local file,
// JSON {"url": ...} for a URL (the service fetches it).
function requestBody(params) {
  if (state.file) {
    const form = new FormData();
    form.append("file", state.file, state.file.name);
    for (const [key, value] of Object.entries(params)) {
      form.append(key, typeof value === "string" ? value : JSON.stringify(value));
    }
    return { body: form };
  }
  const url = $("image-url").value.trim();
  return {
    body: JSON.stringify({ url, ...params }),
    headers: { "Content-Type": "application/json" },
  };
}

// route: "detect" or "segment" (direct calls) or "job" (automatic SAM, with progress).
async function fetchAnswer(model, route, params, format) {
  const name = encodeURIComponent(model);
  const response = route === "job"
    ? await runJob(name, params, format)
    : await api(`v1/${route}/${name}?format=${format}`, { method: "POST", ...requestBody(params) });
  return format === "json" ? response.json() : response.blob();
}

async function runJob(name, params, format) {
  let job = await apiJson(`v1/jobs/${name}?format=${format}`,
    { method: "POST", ...requestBody(params) });
  while (job.status !== "done" && job.status !== "failed") {
    showProgress(job.progress, job.stage);
    await sleep(POLL_MS);
    job = await apiJson(`v1/jobs/${encodeURIComponent(job.id)}`);
  }
  showProgress(job.status === "done" ? 1 : job.progress, job.stage);
  // A failed job's result answers with the job's own error status and detail.
  return api(`v1/jobs/${encodeURIComponent(job.id)}/result`);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// -- models and parameters ---------------------------------------------------------------
async function loadModels() {
  const select = $("model");
  try {
    const data = await apiJson("v1/models");
    state.models = data.models;
  } catch (err) {
    showError(err);
    setState("error");
    return;
  }
  const previous = select.value;
  select.replaceChildren(...Object.entries(KIND_LABELS).map(([kind, title]) => {
    const group = document.createElement("optgroup");
    group.label = title;
    for (const m of state.models.filter((model) => model.kind === kind)) {
      group.append(new Option(m.status === "ready" ? m.name : `${m.name} (${m.status})`, m.name));
    }
    return group;
  }).filter((group) => group.children.length));
  const ready = state.models.filter((m) => m.status === "ready").map((m) => m.name);
  const names = state.models.map((m) => m.name);
  select.value = names.includes(previous) ? previous
    : (DEFAULT_MODELS.find((n) => ready.includes(n)) || ready[0] || names[0] || "");
  select.disabled = false;
  $("run").disabled = state.models.length === 0;
  hideError();
  onModelChange();
  setState("idle");
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

function onModelChange() {
  const model = currentModel();
  if (!model) return;
  const segmenter = model.kind === "segmenter";
  renderParams(model);
  $("prompt-box").hidden = !segmenter;
  $("original-frame").classList.toggle("clickable", segmenter);
  const note = $("model-note");
  note.replaceChildren();
  note.classList.toggle("warn", model.status !== "ready");
  if (model.status !== "ready") {
    note.append(`${model.name} is ${model.status}.`);
    if (model.fetch_command) {
      const code = document.createElement("code");
      code.textContent = model.fetch_command;
      note.append(" Fetch its weights with: ", code);
    }
  } else if (model.random_weights) {
    note.append("Random test weights: its masks mean nothing.");
  }
  drawPoints();
}

function renderParams(model) {
  const box = $("params");
  box.replaceChildren();
  const more = document.createElement("details");
  more.className = "more";
  const summary = document.createElement("summary");
  more.append(summary);
  let hidden = 0;
  for (const [name, spec] of Object.entries(model.parameters || {})) {
    const field = paramField(name, spec);
    if (MAIN_PARAMS.includes(name)) {
      box.append(field);
    } else {
      more.append(field);
      hidden += 1;
    }
  }
  if (hidden) {
    summary.textContent = `More parameters (${hidden})`;
    box.append(more);
  }
}

function paramField(name, spec) {
  const wrap = document.createElement("div");
  wrap.className = "param";
  const label = document.createElement("label");
  label.htmlFor = `param-${name}`;
  label.textContent = name.replaceAll("_", " ");
  const input = document.createElement(spec.choices ? "select" : "input");
  input.id = `param-${name}`;
  input.dataset.param = name;
  if (spec.choices) {
    input.append(...spec.choices.map((c) => new Option(c, c)));
    input.value = spec.default;
  } else if (spec.type === "bool") {
    input.type = "checkbox";
    input.checked = Boolean(spec.default);
  } else {
    input.type = "number";
    input.step = spec.type === "int" ? "1" : "any";
    if (spec.min !== null && spec.min !== undefined) input.min = spec.min;
    if (spec.max !== null && spec.max !== undefined) input.max = spec.max;
    input.value = spec.default;
  }
  wrap.append(label, input);
  if (spec.help) {
    const help = document.createElement("p");
    help.className = "hint";
    help.id = `param-${name}-help`;
    help.textContent = spec.help;
    input.setAttribute("aria-describedby", help.id);
    wrap.append(help);
  }
  return wrap;
}

// Values as text: the service validates and converts them (and answers 422 with a detail).
function collectParams() {
  const params = {};
  for (const input of $("params").querySelectorAll("[data-param]")) {
    if (input.type === "checkbox") {
      params[input.dataset.param] = input.checked ? "true" : "false";
    } else if (input.value.trim() !== "") {
      params[input.dataset.param] = input.value.trim();
    }
  }
  return params;
}

// -- the original image and SAM prompt points ----------------------------------------
function setFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(new Error(`${file.name} is not an image (${file.type}).`));
    return;
  }
  hideError();
  state.file = file;
  state.loadedUrl = null;
  $("image-url").value = "";
  if (state.originalUrl) URL.revokeObjectURL(state.originalUrl);
  state.originalUrl = URL.createObjectURL(file);
  showOriginal(state.originalUrl, true);
}

function setUrl() {
  const url = $("image-url").value.trim();
  if (!url) return;
  state.file = null;
  state.loadedUrl = url;
  $("file").value = "";
  showOriginal(url, false);
}

function showOriginal(src, local) {
  $("points").value = "";  // points belong to the previous image
  clearResult();
  const frame = $("original-frame");
  frame.classList.add("empty");
  state.original = loadOriginal(src, local);
  state.original.then(({ img }) => {
    const shown = $("original-image");
    shown.crossOrigin = img.crossOrigin;
    shown.src = img.src;
    shown.dataset.width = img.naturalWidth;
    shown.dataset.height = img.naturalHeight;
    frame.classList.remove("empty");
    // The layout settles after the image decodes; place the points layer then.
    requestAnimationFrame(drawPoints);
  }).catch(() => {
    frame.querySelector(".placeholder").textContent =
      "The browser cannot show this URL; the service will still fetch it.";
  });
}

// The browser's own copy: drawable when local or served with CORS (else the canvas would
// be tainted and could not be exported).
async function loadOriginal(src, local) {
  if (!local) {
    try {
      return { img: await loadImage(src, "anonymous"), drawable: true };
    } catch (_) {
      // no CORS: still show it, and let the service render the result
    }
  }
  return { img: await loadImage(src, null), drawable: local };
}

function loadImage(src, crossOrigin) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    if (crossOrigin) img.crossOrigin = crossOrigin;
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`cannot load ${src}`));
    img.src = src;
  });
}

function parsePoints(text) {
  const points = [];
  const labels = [];
  for (const token of text.split(/[\s;]+/).filter(Boolean)) {
    const parts = token.split(",").map(Number);
    const valid = (parts.length === 2 || parts.length === 3) && parts.every(Number.isFinite)
      && (parts.length === 2 || parts[2] === 0 || parts[2] === 1);
    if (!valid) {
      throw new Error(`Prompt point "${token}" is not x,y or x,y,0 (background) or x,y,1.`);
    }
    points.push([parts[0], parts[1]]);
    labels.push(parts.length === 3 ? parts[2] : 1);
  }
  return { points, labels };
}

function addPoint(event) {
  const model = currentModel();
  const img = $("original-image");
  if (!model || model.kind !== "segmenter" || !img.naturalWidth) return;
  const rect = img.getBoundingClientRect();
  const x = Math.round((event.clientX - rect.left) * img.naturalWidth / rect.width);
  const y = Math.round((event.clientY - rect.top) * img.naturalHeight / rect.height);
  const token = event.shiftKey ? `${x},${y},0` : `${x},${y}`;
  const field = $("points");
  field.value = field.value.trim() ? `${field.value.trim()} ${token}` : token;
  drawPoints();
}

function drawPoints() {
  const svg = $("points-layer");
  const img = $("original-image");
  const model = currentModel();
  svg.replaceChildren();
  if (!img.naturalWidth || !model || model.kind !== "segmenter") return;
  // Cover the displayed image exactly; the viewBox makes circles use image pixels.
  Object.assign(svg.style, {
    left: `${img.offsetLeft}px`, top: `${img.offsetTop}px`,
    width: `${img.offsetWidth}px`, height: `${img.offsetHeight}px`,
  });
  svg.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
  let parsed;
  try {
    parsed = parsePoints($("points").value);
  } catch (_) {
    return;  // half-typed text: the run reports it
  }
  const radius = Math.max(img.naturalWidth, img.naturalHeight) / 70;
  parsed.points.forEach(([x, y], i) => {
    const dot = document.createElementNS("http://www.w3.org/2000/svg", "circle");
    dot.setAttribute("cx", x);
    dot.setAttribute("cy", y);
    dot.setAttribute("r", radius);
    dot.setAttribute("fill", parsed.labels[i] ? "#16a34a" : "#dc2626");
    dot.setAttribute("stroke", "#fff");
    dot.setAttribute("stroke-width", radius / 3);
    svg.append(dot);
  });
}

// -- drawing the answer ----------------------------------------------------------------
async function renderLocally(model, data, params) {
  if (!state.original) return null;
  // Blurred or pixelated faces: the service's picture is the one to show and download.
  if (params.draw && params.draw !== "box") return null;
  const timeout = sleep(ORIGINAL_WAIT_MS).then(() => null);
  const original = await Promise.race([state.original.catch(() => null), timeout]);
  if (!original || !original.drawable) return null;
  const { img } = original;
  // A size mismatch (e.g. EXIF rotation read differently) would misplace every box.
  if (img.naturalWidth !== data.width || img.naturalHeight !== data.height) return null;
  const canvas = document.createElement("canvas");
  canvas.width = data.width;
  canvas.height = data.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  if (model.kind === "detector") {
    drawBoxes(ctx, data, model.box_color);  // the colour the service draws, from /v1/models
    if (params.landmarks !== "false") drawLandmarks(ctx, data);
  } else {
    drawMasks(ctx, data);
  }
  const type = model.kind === "detector" ? "image/jpeg" : "image/png";
  try {
    return await new Promise((resolve) => canvas.toBlob(resolve, type, 0.92));
  } catch (_) {
    return null;  // tainted canvas: let the service render it
  }
}

// Eyes, nose tip and mouth corners, for models that give them (YuNet).
function drawLandmarks(ctx, data) {
  for (const face of data.faces) {
    const radius = Math.max(2, Math.round(Math.max(face.w, face.h) / 40));
    (face.landmarks || []).forEach(([x, y], i) => {
      ctx.fillStyle = LANDMARK_COLORS[i];
      ctx.beginPath();
      ctx.arc(x, y, radius, 0, 2 * Math.PI);
      ctx.fill();
    });
  }
}

function drawBoxes(ctx, data, color) {
  // A little bolder than the service's boxes: they are seen scaled down beside the original.
  const width = Math.max(3, Math.round(Math.max(data.width, data.height) / 300));
  const font = Math.max(12, width * 7);
  ctx.lineWidth = width;
  ctx.font = `600 ${font}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  data.faces.forEach((face, i) => {
    ctx.strokeStyle = color;
    ctx.strokeRect(face.x, face.y, face.w, face.h);
    // The face's number in the list, in a tab on the box's corner.
    const label = String(i + 1);
    const tabWidth = ctx.measureText(label).width + font * 0.6;
    const top = face.y >= font * 1.3 ? face.y - font * 1.3 : face.y;
    ctx.fillStyle = color;
    ctx.fillRect(face.x - width / 2, top, tabWidth, font * 1.3);
    ctx.fillStyle = "#000";
    ctx.fillText(label, face.x - width / 2 + font * 0.3, top + font * 0.15);
  });
}

function drawMasks(ctx, data) {
  const { width, height } = data;
  const pixels = ctx.getImageData(0, 0, width, height);
  const px = pixels.data;
  // Largest first, as the service paints them, so small masks stay visible on top; the
  // colour stays tied to the mask's place in the list.
  const order = data.masks.map((_, i) => i).sort((a, b) => data.masks[b].area - data.masks[a].area);
  order.forEach((i) => {
    const mask = data.masks[i];
    const [r, g, b] = maskColor(i);
    const counts = Array.isArray(mask.segmentation.counts)
      ? mask.segmentation.counts : rleCounts(mask.segmentation.counts);
    // COCO RLE: alternating runs of 0s and 1s over the pixels in column-major order.
    let pos = 0;
    counts.forEach((run, k) => {
      if (k % 2 === 1) {
        for (let j = pos; j < pos + run; j += 1) {
          const y = j % height;
          const o = (y * width + (j - y) / height) * 4;
          px[o] += (r - px[o]) * MASK_ALPHA;
          px[o + 1] += (g - px[o + 1]) * MASK_ALPHA;
          px[o + 2] += (b - px[o + 2]) * MASK_ALPHA;
        }
      }
      pos += run;
    });
  });
  ctx.putImageData(pixels, 0, 0);
}

// pycocotools' compressed RLE string (rleFrString): 5 bits a character, a continuation bit,
// sign extension, and each count after the second stored as a delta to the one two back.
// Plain arithmetic instead of bit shifts: counts may pass 2^31 shifts' reach.
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x -= 2 ** (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// Distinct colours by the golden angle, the same for a mask's overlay and its list swatch.
function maskColor(i) {
  const h = (i * 137.508) % 360;
  const s = 0.75;
  const l = 0.5;
  const f = (n) => {
    const k = (n + h / 30) % 12;
    return Math.round(255 * (l - s * Math.min(l, 1 - l) * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [f(0), f(8), f(4)];
}

// -- showing the answer ------------------------------------------------------------------
function clearResult() {
  $("results").hidden = true;
  $("download").hidden = true;
  $("result-frame").classList.add("empty");
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = null;
}

async function showResult(model, data, picture) {
  clearResult();
  state.resultUrl = URL.createObjectURL(picture);
  const img = $("result-image");
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("the result image could not be displayed"));
    img.src = state.resultUrl;
  });
  $("result-frame").classList.remove("empty");

  const ext = picture.type === "image/png" ? "png" : "jpg";
  const stem = (state.file ? state.file.name : $("image-url").value.split(/[?#]/)[0])
    .split("/").pop().replace(/\.[^.]*$/, "") || "image";
  const link = $("download");
  link.href = state.resultUrl;
  link.download = `${stem}-${model.name}.${ext}`;
  link.hidden = false;

  const items = $("items");
  if (model.kind === "detector") {
    $("summary").textContent = `${plural(data.count, "face")} found`;
    items.replaceChildren(...data.faces.map((f) => listItem(
      `x ${f.x}, y ${f.y}, ${f.w} × ${f.h} px — score ${f.score.toFixed(3)}` +
      (f.landmarks ? `, ${f.landmarks.length} landmarks` : ""))));
  } else {
    const mode = data.mode ? ` (${data.mode})` : "";
    $("summary").textContent = `${plural(data.count, "mask")}${mode}`;
    items.replaceChildren(...data.masks.map((m, i) => {
      const [x, y, w, h] = m.bbox;
      const item = listItem(`box x ${x}, y ${y}, ${w} × ${h} px — area ${m.area}, ` +
        `IoU ${m.predicted_iou.toFixed(3)}, stability ${m.stability_score.toFixed(3)}`);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = `rgb(${maskColor(i).join(",")})`;
      item.prepend(swatch);
      return item;
    }));
  }
  $("raw-json").textContent = JSON.stringify(data, null, 2);
  $("results").hidden = false;
}

function listItem(text) {
  const li = document.createElement("li");
  li.textContent = text;
  return li;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

// -- status, progress, errors --------------------------------------------------------------
function setState(name) {
  document.body.dataset.state = name;  // for tests and styling: loading|idle|running|done|error
}

function setBusy(busy, label) {
  $("run").disabled = busy;
  $("progress-box").hidden = !busy;
  if (busy) {
    $("progress").removeAttribute("value");  // indeterminate until a job reports progress
    $("progress-label").textContent = label;
  }
}

function showProgress(fraction, stage) {
  const value = Math.max(0, Math.min(1, Number(fraction) || 0));
  $("progress").value = value;
  $("progress-label").textContent = `${Math.round(value * 100)}% — ${stage || "working"}`;
}

function showError(err) {
  const box = $("error");
  box.textContent = err instanceof ApiError && err.status
    ? `The service answered ${err.message}` : err.message;
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// -- running ---------------------------------------------------------------------------
async function run(event) {
  event.preventDefault();
  hideError();
  const model = currentModel();
  if (!model) return;
  const url = $("image-url").value.trim();
  if (!state.file && !url) {
    showError(new Error("Choose an image file, drop one, or give an image URL first."));
    return;
  }
  // Enter in the URL field may submit before its change event: load what will be sent.
  if (!state.file && url !== state.loadedUrl) setUrl();
  let route = "detect";
  const params = collectParams();
  try {
    if (model.kind === "segmenter") {
      const { points, labels } = parsePoints($("points").value);
      route = points.length ? "segment" : "job";
      if (points.length) Object.assign(params, { points, labels });
    }
  } catch (err) {
    showError(err);
    return;
  }
  setState("running");
  setBusy(true, route === "job" ? `Queued ${model.name}…` : `Running ${model.name}…`);
  try {
    const data = await fetchAnswer(model.name, route, params, "json");
    const picture = await renderLocally(model, data, params) || await fetchAnswer(
      model.name, route, params, model.kind === "detector" ? "jpeg" : "png");
    await showResult(model, data, picture);
    setState("done");
  } catch (err) {
    showError(err);
    setState("error");
  } finally {
    setBusy(false);
  }
}

function wireDropZone() {
  const zone = $("drop-zone");
  const over = (on) => (event) => {
    event.preventDefault();
    zone.classList.toggle("over", on);
  };
  zone.addEventListener("dragenter", over(true));
  zone.addEventListener("dragover", over(true));
  zone.addEventListener("dragleave", over(false));
  zone.addEventListener("drop", (event) => {
    over(false)(event);
    const files = event.dataTransfer.files;
    if (!files.length) return;
    try {
      $("file").files = files;  // so the picker shows the dropped file's name
    } catch (_) {
      // older browsers: the name is not shown, the file is still used
    }
    setFile(files[0]);
  });
}

function init() {
  $("api-key").value = sessionStorage.getItem("visionserve-api-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("visionserve-api-key", $("api-key").value.trim());
    loadModels();
  });
  $("file").addEventListener("change", () => setFile($("file").files[0]));
  $("image-url").addEventListener("change", setUrl);
  $("model").addEventListener("change", onModelChange);
  $("original-image").addEventListener("click", addPoint);
  $("points").addEventListener("input", drawPoints);
  $("clear-points").addEventListener("click", () => {
    $("points").value = "";
    drawPoints();
  });
  $("run-form").addEventListener("submit", run);
  window.addEventListener("resize", drawPoints);
  wireDropZone();
  loadModels();
}

init();
