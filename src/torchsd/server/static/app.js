// The torchsd web page: plain JavaScript over the server's AUTOMATIC1111 API (/sdapi/v1), no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let running = false;
let maskPainted = false;

async function api(path, body) {
  const options = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (data && (data.detail || (data.error && data.error.message) || data.errors)) || response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return data;
}

function showError(err) { $("error").textContent = err ? String(err.message || err) : ""; }

const FAMILIES = { sd1: "SD 1", sd2: "SD 2", sdxl: "SDXL", sd3: "SD 3", flux: "FLUX.1" };
let model = {};  // /info's word on the loaded model: family, guidance_embedded, samplers and features (null: all)
let controlModels = false;  // whether the server has ControlNet models at all
const runs = (feature) => !model.features || model.features.includes(feature);

// --- start-up: model list, samplers, the model's native size ---------------------------------------------
async function init() {
  try {
    const [info, models, options, samplers, styles, latentModes, upscalers] = await Promise.all([
      api("/info"), api("/sdapi/v1/sd-models"), api("/sdapi/v1/options"), api("/sdapi/v1/samplers"),
      api("/sdapi/v1/prompt-styles"), api("/sdapi/v1/latent-upscale-modes"), api("/sdapi/v1/upscalers")]);
    for (const m of models) {
      const label = FAMILIES[m.family] ? `${m.title} — ${FAMILIES[m.family]}` : m.title;
      $("model").add(new Option(label, m.title, false, m.title === options.sd_model_checkpoint));
    }
    for (const m of models) $("refiner").add(new Option(m.title, m.title));  // a second model for the last steps
    for (const s of samplers) $("sampler").add(new Option(s.name, s.name));
    for (const s of styles) {
      const option = new Option(s.name, s.name);
      option.title = [s.prompt, s.negative_prompt && `negative: ${s.negative_prompt}`].filter(Boolean).join("\n");
      $("styles").add(option);
    }
    $("styles").parentElement.hidden = styles.length === 0;
    $("no-styles").hidden = styles.length > 0;
    // hires fix: latent upscalers first (A1111's default "Latent"), then Lanczos/Nearest and the network files
    for (const name of [...latentModes.map((m) => m.name), ...upscalers.map((u) => u.name).filter((n) => n !== "None")]) {
      $("hr-upscaler").add(new Option(name, name));
    }
    if (info.sample_size) { $("width").value = info.sample_size; $("height").value = info.sample_size; }
    $("steps").max = info.limits.max_steps;
    $("batch").max = info.limits.max_images;
    applyModel(info);
  } catch (err) { showError(err); }
}

// --- the controls that depend on the model: flow models' fields shown, what their run refuses disabled --------
function applyModel(info) {
  model = info;
  const flow = info.family === "sd3" || info.family === "flux";
  // hidden fields are disabled too: not sent, and not checked by the browser's form validation
  for (const [box, input, shown] of [["distilled-box", "distilled-cfg", Boolean(info.guidance_embedded)],
                                     ["shift-box", "shift", flow],
                                     ["slg-box", "slg-layers", info.family === "sd3"],
                                     ["slg-scale-box", "slg-scale", info.family === "sd3"]]) {
    $(box).hidden = !shown;
    $(input).disabled = !shown;
  }
  if (info.distilled_cfg) $("distilled-cfg").value = info.distilled_cfg;  // the model's own: dev 3.5, Fill 30
  // samplers that add fresh noise do not run on flow models: greyed out rather than removed, so that the
  // list keeps its order and comes back whole for the next U-Net model
  for (const option of $("sampler").options) {
    option.disabled = Boolean(info.samplers) && !info.samplers.includes(option.value);
  }
  const chosen = $("sampler").selectedOptions[0];
  if (chosen && chosen.disabled) $("sampler").value = info.samplers[0];  // the first one that runs: Euler
  $("tiling").disabled = !runs("tiling");
  $("refiner-box").disabled = !runs("refiner");
  $("control").disabled = !controlModels || !runs("control");
  $("control-box").hidden = !$("control").checked || $("control").disabled;
  // say why, once, under the fields: a disabled control shows no tooltip
  const refused = [["tiling", "tiling"], ["refiner", "refiner"], ["control", "ControlNet"]]
    .filter(([feature]) => !runs(feature)).map(([, name]) => name);
  const none = refused.length > 1 ? `${refused.slice(0, -1).join(", ")} or ${refused.at(-1)}` : refused[0];
  $("model-note").hidden = !info.samplers;
  $("model-note").textContent = !info.samplers ? "" : `${FAMILIES[info.family] || "Flow"} models: samplers ` +
    `${info.samplers.join(", ")} only (flow matching: none that adds fresh noise)${none ? `; no ${none}` : ""}.`;
}

$("hires").addEventListener("change", () => { $("hires-box").hidden = !$("hires").checked; });

// --- ControlNet: one unit, sent as the AUTOMATIC1111 extension's alwayson_scripts.controlnet.args ---------
let controlImage = null;  // the chosen file as a data URL

async function initControl() {
  try {
    const [models, modules] = await Promise.all([api("/controlnet/model_list"), api("/controlnet/module_list")]);
    for (const name of models.model_list) $("control-model").add(new Option(name, name));
    for (const name of modules.module_list) $("control-module").add(new Option(name, name));
    $("no-control").hidden = models.model_list.length > 0;
    controlModels = models.model_list.length > 0;
    $("control").disabled = !controlModels || !runs("control");
  } catch (err) { showError(err); }
}

$("control").addEventListener("change", () => { $("control-box").hidden = !$("control").checked; });
$("control-file").addEventListener("change", () => {
  const file = $("control-file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    controlImage = reader.result;
    $("control-image").src = controlImage;
    $("control-image").hidden = false;
    $("control-map").hidden = true;
  };
  reader.readAsDataURL(file);
});
$("control-preview").addEventListener("click", async () => {
  if (!controlImage) { showError("choose a control image first"); return; }
  try {
    const result = await api("/controlnet/detect", { controlnet_module: $("control-module").value,
                                                    controlnet_input_images: [controlImage.split(",")[1]] });
    $("control-map").src = "data:image/png;base64," + result.images[0];
    $("control-map").hidden = false;
    showError(null);
  } catch (err) { showError(err); }
});

function controlUnit() {
  // the fields webuiapi's ControlNetUnit.to_dict() sends; -1 thresholds: the preprocessor's defaults
  return { enabled: true, image: controlImage.split(",")[1], module: $("control-module").value,
           model: $("control-model").value, weight: Number($("control-weight").value),
           guidance_start: Number($("control-start").value), guidance_end: Number($("control-end").value),
           control_mode: Number($("control-mode").value), resize_mode: "Crop and Resize",
           threshold_a: -1, threshold_b: -1, pixel_perfect: false };
}

$("model").addEventListener("change", async () => {
  const title = $("model").value;
  $("model-status").textContent = "loading…";
  $("generate").disabled = true;
  try {
    await api("/sdapi/v1/options", { sd_model_checkpoint: title });
    const info = await api("/info");  // the new model's own size (SDXL: 1024) and what it runs
    if (info.sample_size) { $("width").value = info.sample_size; $("height").value = info.sample_size; }
    applyModel(info);
    $("model-status").textContent = "";
    showError(null);
  } catch (err) { showError(err); $("model-status").textContent = "failed"; }
  $("generate").disabled = false;
});

// --- image to image: the init image and a mask painted over it -------------------------------------------
function setInitImage(src) {
  const image = new Image();
  image.onload = () => {
    for (const id of ["init-canvas", "mask-canvas"]) { $(id).width = image.naturalWidth; $(id).height = image.naturalHeight; }
    $("init-canvas").getContext("2d").drawImage(image, 0, 0);
    clearMask();
    $("init-box").hidden = false;
  };
  image.src = src;
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  maskPainted = false;
}

$("init-file").addEventListener("change", () => {
  const file = $("init-file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setInitImage(reader.result);
  reader.readAsDataURL(file);
});
$("clear-mask").addEventListener("click", clearMask);
$("clear-init").addEventListener("click", () => { $("init-box").hidden = true; $("init-file").value = ""; clearMask(); });

(function maskBrush() {
  const canvas = $("mask-canvas");
  let last = null;  // the previous point of the stroke: strokes are lines, so fast moves leave no gaps
  function point(event) {
    const rect = canvas.getBoundingClientRect();
    const scale = canvas.width / rect.width;
    return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
  }
  function paint(event) {
    const p = point(event);
    const ctx = canvas.getContext("2d");
    ctx.strokeStyle = "#ffffff";
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = $("brush").value * p.scale;
    ctx.beginPath();
    ctx.moveTo((last || p).x, (last || p).y);
    ctx.lineTo(p.x + (last ? 0 : 0.01), p.y);
    ctx.stroke();
    last = p;
    maskPainted = true;
  }
  canvas.addEventListener("pointerdown", (e) => { last = null; canvas.setPointerCapture(e.pointerId); paint(e); });
  canvas.addEventListener("pointermove", (e) => { if (last) paint(e); });
  canvas.addEventListener("pointerup", () => { last = null; });
})();

function maskDataURL() {
  // white = repaint, black = keep, as AUTOMATIC1111 reads masks
  const mask = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = mask.width; out.height = mask.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(mask, 0, 0);
  return out.toDataURL("image/png");
}

// --- generation, progress, gallery ---------------------------------------------------------------------
function payload() {
  const number = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    steps: number("steps"), cfg_scale: number("cfg"), seed: number("seed"), width: number("width"),
    height: number("height"), batch_size: number("batch"), n_iter: 1,
    styles: [...$("styles").selectedOptions].map((o) => o.value), tiling: $("tiling").checked && !$("tiling").disabled,
  };
  // FLUX.1-dev's distilled CFG (Forge's field) and the flow shift: only where shown; an empty shift: the model's
  if (!$("distilled-cfg").disabled) body.distilled_cfg_scale = number("distilled-cfg");
  if (!$("shift").disabled && $("shift").value !== "") body.flow_shift = number("shift");
  // SD 3.5's skip-layer guidance (diffusers' argument names): on with a list of joint blocks; empty: off
  const layers = $("slg-layers").disabled ? [] : $("slg-layers").value.split(/[\s,]+/).filter(Boolean);
  if (layers.length) {
    if (!layers.every((v) => /^\d+$/.test(v))) throw new Error("SLG layers: block numbers such as 7,8,9");
    Object.assign(body, { skip_guidance_layers: layers.map(Number), skip_layer_guidance_scale: number("slg-scale") });
  }
  if ($("hires").checked && $("init-box").hidden) {  // as in A1111, hires fix belongs to text to image
    Object.assign(body, { enable_hr: true, hr_upscaler: $("hr-upscaler").value, hr_scale: number("hr-scale"),
                          hr_second_pass_steps: number("hr-steps"), denoising_strength: number("hr-strength") });
  }
  if ($("refiner").value && !$("refiner-box").disabled) {
    Object.assign(body, { refiner_checkpoint: $("refiner").value, refiner_switch_at: number("refiner-switch") });
  }
  if ($("control").checked && !$("control").disabled) {
    if (!controlImage) throw new Error("ControlNet: choose a control image (or untick ControlNet)");
    body.alwayson_scripts = { controlnet: { args: [controlUnit()] } };
  }
  if (!$("init-box").hidden) {
    body.init_images = [$("init-canvas").toDataURL("image/png")];
    body.denoising_strength = number("strength");
    if (maskPainted) body.mask = maskDataURL();
  }
  return body;
}

async function pollProgress() {
  while (running) {
    try {
      const p = await api("/sdapi/v1/progress");
      if (!running) break;
      $("progress").value = p.progress;
      $("progress-text").textContent = p.state.sampling_steps ?
        `step ${p.state.sampling_step}/${p.state.sampling_steps}` : (p.state.job_count ? "queued" : "starting");
      if (p.current_image) { $("preview").src = "data:image/png;base64," + p.current_image; $("preview").hidden = false; }
    } catch (err) { /* the generation request reports errors */ }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

function addToGallery(b64, infotext, seed) {
  const figure = document.createElement("figure");
  const src = "data:image/png;base64," + b64;
  const img = document.createElement("img");
  img.src = src;
  img.alt = infotext;
  const download = document.createElement("a");
  download.href = src;  // the PNG carries its parameters in a 'parameters' text chunk
  download.download = `torchsd-${seed}.png`;
  download.textContent = "Download PNG";
  const reuse = document.createElement("a");
  reuse.href = "#";
  reuse.textContent = "Use as input";
  reuse.addEventListener("click", (e) => { e.preventDefault(); setInitImage(src); });
  const caption = document.createElement("figcaption");
  caption.textContent = infotext;
  figure.append(img, download, reuse, caption);
  $("gallery").prepend(figure);
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (running) return;
  showError(null);
  let body;
  try { body = payload(); } catch (err) { showError(err); return; }
  const route = body.init_images ? "/sdapi/v1/img2img" : "/sdapi/v1/txt2img";
  running = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress").value = 0;
  $("progress-text").textContent = "starting";
  const started = performance.now();
  const polling = pollProgress();
  let result = null;
  try { result = await api(route, body); } catch (err) { showError(err); }
  running = false;
  await polling;  // so that no late progress reply overwrites the final state
  if (result) {
    const info = JSON.parse(result.info);
    result.images.forEach((b64, i) => addToGallery(b64, info.infotexts[i], info.all_seeds[i]));
    $("progress").value = 1;
    $("progress-text").textContent = `${info.interrupted ? "interrupted" : "done"} in ` +
      `${((performance.now() - started) / 1000).toFixed(1)} s`;
    if (result.images.length) { $("preview").src = "data:image/png;base64," + result.images[0]; $("preview").hidden = false; }
  } else {
    $("progress-text").textContent = "failed";
  }
  $("generate").disabled = false;
  $("interrupt").disabled = true;
});

$("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}).catch(showError));

init();
initControl();
