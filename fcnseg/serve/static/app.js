// The page of `fcnseg serve`: upload an image to /predict?format=json, blend the mask over it on a canvas, list the
// classes present, name the class under the cursor, offer the mask PNG. Plain JavaScript, nothing fetched elsewhere.
// A server started with an API key answers 401 without it: the page then asks for the key, keeps it for this tab
// only (sessionStorage) and sends it with every request as the X-API-Key header.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_ITEM = "fcnseg-api-key";

function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

function authHeaders() {
  return apiKey() ? { "X-API-Key": apiKey() } : {};
}

function askForKey(refused) {
  // A key that was sent and refused is forgotten, and said so; the form stays until a key is accepted.
  if (refused) {
    sessionStorage.removeItem(KEY_ITEM);
    showError("The server refused this API key: check it and enter it again.");
  }
  $("key-form").hidden = false;
  $("key").focus();
}

const state = {
  card: null,       // GET /model
  result: null,     // the JSON answer of the last upload
  file: null,       // the uploaded File
  picture: null,    // ImageData of the picture (null when the browser cannot decode its format)
  head: 0,          // which head is shown
  mask: null,       // ImageData of the head's colour mask
  classAt: null,    // Int32Array: the class index of each pixel (-1: unknown colour)
  downloadUrl: null,
};

// ------------------------------------------------------------------------------------------- messages, progress

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setProgress(text, percent) {
  $("progress").hidden = text === null;
  if (text === null) return;
  $("progress-text").textContent = text;
  const bar = $("progress-bar");
  if (percent === undefined) bar.removeAttribute("value");
  else bar.value = percent;
}

function errorOf(xhr) {
  // The server answers {"error": "..."}; anything else (a proxy's page, a dropped connection) gets a plain message.
  let message = null;
  try {
    message = JSON.parse(xhr.responseText).error;
  } catch (e) {
    message = null;
  }
  if (!message) message = `the server answered ${xhr.status} ${xhr.statusText || ""}`.trim();
  const retry = xhr.getResponseHeader("Retry-After");
  if (xhr.status === 503 && retry) message += ` (try again in ${retry} s)`;
  return `Could not segment the image: ${message}`;
}

// ------------------------------------------------------------------------------------------------ model card

function addCardRow(list, term, value) {
  if (value === null || value === undefined || value === "") return;
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  list.append(dt, dd);
}

function metricsText(metrics) {
  const parts = [];
  for (const [key, value] of Object.entries(metrics || {})) {
    if (value && typeof value === "object") {
      const inner = Object.entries(value).map(([k, v]) => `${k} ${v}`).join(", ");
      parts.push(`${key}: ${inner}`);
    } else {
      parts.push(`${key}: ${typeof value === "number" && value < 1 && value > 0 ? value.toFixed(4) : value}`);
    }
  }
  return parts.join("; ") || "none recorded";
}

function renderCard(card) {
  state.card = card;
  $("model-name").textContent = `${card.name} (${card.architecture})`;
  const list = $("card");
  list.replaceChildren();
  const pp = card.preprocessing;
  const serving = card.serving;
  addCardRow(list, "Name", card.name);
  addCardRow(list, "Architecture", card.architecture);
  addCardRow(list, "Parameters", card.parameters.toLocaleString("en"));
  addCardRow(list, "Alignment", card.alignment);
  addCardRow(list, "Input", `${card.input_channels} channels, ${pp.channel_order}, 0-${pp.value_range}, ` +
    `mean ${pp.mean.map((v) => +v.toFixed(3)).join("/")}, std ${pp.std.map((v) => +v.toFixed(3)).join("/")}`);
  for (const head of card.heads) {
    addCardRow(list, card.heads.length > 1 ? `Classes (${head.name})` : "Classes",
      `${head.classes.length}: ${head.classes.map((c) => c.name).join(", ")}`);
  }
  addCardRow(list, "Runtime", serving.runtime + (serving.tile ? `, tiles of ${serving.tile} px` : ""));
  addCardRow(list, "Workers", `${serving.workers} (${serving.threads_per_worker} threads each), queue ${serving.queue}`);
  addCardRow(list, "Metrics", metricsText(card.metrics));
  $("limits").textContent = `Up to ${serving.max_upload_mb} MB and ${serving.max_pixels.toLocaleString("en")} ` +
    (serving.tile ? "pixels per image." : "pixels per image, counted as the model pads it.");
  if (card.input_channels > 3) {
    showError(`This model takes ${card.input_channels} input channels (colour plus depth or HHA); ` +
      "the page sends colour images only. Use the API with the 'extra' field.");
  }
}

async function loadCard() {
  try {
    const response = await fetch("/model", { headers: authHeaders() });
    if (response.status === 401) {
      $("model-name").textContent = "an API key is needed";
      askForKey(apiKey() !== "");
      return;
    }
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    $("key-form").hidden = true;
    renderCard(await response.json());
  } catch (e) {
    $("model-name").textContent = "model card unavailable";
    showError(`Could not load the model card: ${e.message}`);
  }
}

// ------------------------------------------------------------------------------------------------ pixels

function pixelsOf(source, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(source, 0, 0, width, height);
  return ctx.getImageData(0, 0, width, height);
}

async function decodePicture(file, width, height) {
  // As the server reads it: EXIF orientation applied, colour values as stored (no colour-profile conversion).
  try {
    const bitmap = await createImageBitmap(file, { imageOrientation: "from-image", colorSpaceConversion: "none" });
    if (bitmap.width !== width || bitmap.height !== height) return null;
    return pixelsOf(bitmap, width, height);
  } catch (e) {
    return null;
  }
}

async function decodeMask(base64, width, height) {
  const image = new Image();
  image.src = `data:image/png;base64,${base64}`;
  await image.decode();
  return pixelsOf(image, width, height);
}

function classIndices(mask, classes) {
  const byColour = new Map(classes.map((c) => [c.color.join(","), c.index]));
  const data = mask.data;
  const out = new Int32Array(mask.width * mask.height);
  for (let i = 0; i < out.length; i++) {
    const key = `${data[4 * i]},${data[4 * i + 1]},${data[4 * i + 2]}`;
    const index = byColour.get(key);
    out[i] = index === undefined ? -1 : index;
  }
  return out;
}

function blend() {
  const canvas = $("canvas");
  const mask = state.mask;
  if (!mask) return;
  const alpha = $("opacity").value / 100;
  $("opacity-value").textContent = `${$("opacity").value}%`;
  const out = new ImageData(mask.width, mask.height);
  const m = mask.data;
  const p = state.picture ? state.picture.data : null;
  for (let i = 0; i < m.length; i += 4) {
    // A class drawn black (background) leaves the picture untinted, as fcnseg predict's overlays do.
    const untinted = p && m[i] === 0 && m[i + 1] === 0 && m[i + 2] === 0;
    for (let c = 0; c < 3; c++) {
      const under = p ? p[i + c] : 255;  // no picture: the mask over white
      out.data[i + c] = untinted ? under : Math.round((1 - alpha) * under + alpha * m[i + c]);
    }
    out.data[i + 3] = 255;
  }
  canvas.getContext("2d").putImageData(out, 0, 0);
}

// ------------------------------------------------------------------------------------------------ the answer

function renderLegend(head) {
  const list = $("legend");
  list.replaceChildren();
  const present = head.classes.filter((c) => c.pixels > 0).sort((a, b) => b.share - a.share);
  for (const c of present) {
    const li = document.createElement("li");
    li.dataset.index = c.index;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${c.color.join(",")})`;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = c.name;
    const share = document.createElement("span");
    share.className = "share";
    share.textContent = `${(100 * c.share).toFixed(1)}%`;
    li.append(swatch, name, share);
    list.append(li);
  }
  $("legend-box").hidden = false;
}

function setDownload(head, stem) {
  const bytes = Uint8Array.from(atob(head.mask_png), (ch) => ch.charCodeAt(0));
  if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
  state.downloadUrl = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
  const link = $("download");
  link.href = state.downloadUrl;
  link.download = `${stem}${state.head > 0 ? "_" + head.name : ""}.png`;
}

async function showHead(index) {
  const result = state.result;
  const head = result.heads[index];
  state.head = index;
  state.mask = await decodeMask(head.mask_png, result.width, result.height);
  state.classAt = classIndices(state.mask, head.classes);
  blend();
  renderLegend(head);
  setDownload(head, (state.file.name || "mask").replace(/\.[^.]*$/, "") || "mask");
}

function headChooser(result) {
  const select = $("head");
  select.replaceChildren(...result.heads.map((h, i) => new Option(h.name, String(i))));
  $("head-label").hidden = result.heads.length < 2;
}

async function render(result, file) {
  state.result = result;
  state.file = file;
  const canvas = $("canvas");
  canvas.width = result.width;
  canvas.height = result.height;
  // Small images are shown enlarged (whole pixels, not smoothed); large ones fit the column.
  const scale = Math.max(1, Math.round(512 / Math.max(result.width, result.height)));
  canvas.style.width = `${result.width * scale}px`;
  canvas.classList.toggle("enlarged", scale > 1);
  state.picture = await decodePicture(file, result.width, result.height);
  $("note").hidden = state.picture !== null;
  $("note").textContent = "This browser cannot show this image format: the mask is shown over white.";
  headChooser(result);
  await showHead(0);
  const t = result.timing_ms;
  $("meta").textContent = `${result.file}: ${result.width} x ${result.height} px, ` +
    `segmented in ${Math.round(t.inference)} ms (${Math.round(t.total)} ms with reading).`;
  $("result").hidden = false;
}

// ------------------------------------------------------------------------------------------------ upload

function checkFile(file) {
  if (!state.card) return null;
  const limit = state.card.serving.max_upload_mb;
  if (file.size > limit * 1048576) {
    return `${file.name} is ${(file.size / 1048576).toFixed(1)} MB, over this server's limit of ${limit} MB.`;
  }
  if (file.size === 0) return `${file.name} is empty (0 bytes).`;
  return null;
}

function upload(file) {
  clearError();
  const problem = checkFile(file);
  if (problem) {
    showError(`Could not segment the image: ${problem}`);
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/predict?format=json");
  for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) setProgress(`Uploading… ${Math.round((100 * e.loaded) / e.total)}%`, (100 * e.loaded) / e.total);
  };
  xhr.upload.onload = () => setProgress("Segmenting…");
  xhr.onload = async () => {
    try {
      if (xhr.status === 401) askForKey(apiKey() !== "");
      if (xhr.status !== 200) throw new Error(errorOf(xhr));
      await render(JSON.parse(xhr.responseText), file);
    } catch (e) {
      showError(e.message.startsWith("Could not") ? e.message : `Could not show the result: ${e.message}`);
    } finally {
      setProgress(null);
    }
  };
  xhr.onerror = () => {
    setProgress(null);
    showError("Could not segment the image: the server could not be reached (stopped, or the upload was cut off).");
  };
  setProgress("Uploading… 0%", 0);
  xhr.send(form);
}

// ------------------------------------------------------------------------------------------------ events

function onHover(event) {
  const canvas = $("canvas");
  const hover = $("hover");
  if (!state.classAt) return;
  const rect = canvas.getBoundingClientRect();  // the border box: the pixels start inside the border
  const x = Math.floor(((event.clientX - rect.left - canvas.clientLeft) * canvas.width) / canvas.clientWidth);
  const y = Math.floor(((event.clientY - rect.top - canvas.clientTop) * canvas.height) / canvas.clientHeight);
  if (x < 0 || y < 0 || x >= canvas.width || y >= canvas.height) {
    hover.hidden = true;
    return;
  }
  const index = state.classAt[y * canvas.width + x];
  const head = state.result.heads[state.head];
  const c = head.classes[index];
  hover.textContent = c ? `${c.name} (${(100 * c.share).toFixed(1)}% of the image) at ${x}, ${y}` : `? at ${x}, ${y}`;
  hover.style.left = `${event.clientX - rect.left + 12}px`;
  hover.style.top = `${event.clientY - rect.top + 12}px`;
  hover.hidden = false;
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    if (e.target.files.length) upload(e.target.files[0]);
    e.target.value = "";  // choosing the same file again is a new upload
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $("key").value.trim());
    $("key").value = "";
    clearError();
    loadCard();
  });
  $("opacity").addEventListener("input", blend);
  $("head").addEventListener("change", (e) => showHead(Number(e.target.value)));
  $("canvas").addEventListener("mousemove", onHover);
  $("canvas").addEventListener("mouseleave", () => ($("hover").hidden = true));
  window.addEventListener("error", (e) => showError(`Something went wrong on this page: ${e.message}`));
}

wire();
loadCard();
