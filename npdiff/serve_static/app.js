// npdiff serve's page: posts to webui's /sdapi/v1 API and polls /sdapi/v1/progress while a picture is made.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;

async function api(path, body) {
  const options = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.detail || response.statusText);
  return data;
}

async function loadLists() {
  const samplers = await api("/sdapi/v1/samplers");
  for (const sampler of samplers) $("sampler_name").add(new Option(sampler.name, sampler.name));
  const loras = await api("/sdapi/v1/loras");
  if (loras.length) $("loras").querySelector(".hint").remove();
  for (const lora of loras) {
    const label = document.createElement("label");
    label.className = "row";
    label.innerHTML = '<span><input type="checkbox"> </span><input type="number" value="1" step="0.1">';
    label.querySelector("span").append(lora.name);
    label.dataset.name = lora.name;
    $("loras").append(label);
  }
}

function promptWithLoras() {
  let prompt = $("prompt").value;
  for (const label of $("loras").querySelectorAll("label")) {
    const [checkbox, scale] = label.querySelectorAll("input");
    if (checkbox.checked) prompt += ` <lora:${label.dataset.name}:${scale.value}>`;
  }
  return prompt;
}

function request() {
  return {
    prompt: promptWithLoras(), negative_prompt: $("negative_prompt").value,
    width: Number($("width").value), height: Number($("height").value), steps: Number($("steps").value),
    cfg_scale: Number($("cfg_scale").value), seed: Number($("seed").value),
    sampler_name: $("sampler_name").value || null,
  };
}

async function pollProgress(running) {
  while (running.active) {
    try {
      const progress = await api("/sdapi/v1/progress");
      if (!running.active) break;
      $("progress").value = progress.progress;
      const state = progress.state;
      if (state.sampling_steps) $("status").textContent = `step ${state.sampling_step} of ${state.sampling_steps}`;
      if (progress.current_image) {
        $("live").src = "data:image/png;base64," + progress.current_image;
        $("live").hidden = false;
      }
    } catch (error) { /* the next poll tries again */ }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function generate(event) {
  event.preventDefault();
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress").value = 0;
  $("status").textContent = "waiting";
  const running = {active: true};
  const polling = pollProgress(running);
  try {
    const result = await api("/sdapi/v1/txt2img", request());
    const info = JSON.parse(result.info);
    $("live").src = "data:image/png;base64," + result.images[0];
    $("live").hidden = false;
    $("progress").value = 1;
    $("status").textContent = info.interrupted ? "interrupted" : "done";
    $("parameters").textContent = info.infotexts[0];
  } catch (error) {
    $("status").textContent = "error: " + error.message;
  } finally {
    running.active = false;
    await polling;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    showGallery();
  }
}

async function showGallery() {
  const pictures = await api("/npdiff/v1/gallery");
  $("gallery").replaceChildren(...pictures.map((picture) => {
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.src = "data:image/png;base64," + picture.image;
    const caption = document.createElement("figcaption");
    caption.textContent = picture.infotext;
    figure.append(image, caption);
    return figure;
  }));
}

// --reproduce by dropping a PNG: its settings come back from /sdapi/v1/png-info
function fillFrom(parameters) {
  const fields = {"Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps",
                  "CFG scale": "cfg_scale", "Seed": "seed", "Size-1": "width", "Size-2": "height"};
  for (const [key, id] of Object.entries(fields)) if (key in parameters) $(id).value = parameters[key];
  if ("Sampler" in parameters) $("sampler_name").value = parameters.Sampler;
}

async function dropped(event) {
  event.preventDefault();
  document.body.classList.remove("dropping");
  const file = event.dataTransfer.files[0];
  if (!file) return;
  const data = await new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.readAsDataURL(file);
  });
  try {
    const info = await api("/sdapi/v1/png-info", {image: data});
    fillFrom(info.parameters);
    $("status").textContent = `settings of ${file.name} filled in`;
  } catch (error) {
    $("status").textContent = "error: " + error.message;
  }
}

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}));
document.body.addEventListener("dragover", (event) => { event.preventDefault(); document.body.classList.add("dropping"); });
document.body.addEventListener("dragleave", () => document.body.classList.remove("dropping"));
document.body.addEventListener("drop", dropped);
loadLists();
showGallery();
