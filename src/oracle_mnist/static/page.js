"use strict";
// The page knows nothing about the model: class names, characters and limits all come from GET /model, and
// every image goes through POST /predict like any other client's.
(() => {
  const $ = (id) => document.getElementById(id);
  const input = $("files");
  const results = $("results");
  const status = $("status");
  let model = null;
  let previews = [];

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key.includes("-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function bytes(n) {
    if (n >= 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MB`;
    if (n >= 1024) return `${Math.round(n / 1024)} kB`;
    return `${n} bytes`;
  }

  function percent(p) {
    return `${(100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1)}%`;
  }

  function className(index) {
    const char = model.characters ? model.characters[index] : null;
    return [char ? el("span", { className: "char", lang: "zh" }, char) : null, el("span", { className: "name" }, model.class_names[index])];
  }

  function describeModel(info) {
    const classes = info.class_names.map((name, i) => (info.characters && info.characters[i] ? `${info.characters[i]} ${name}` : name));
    $("model").textContent = `Model ${info.model_name} sees each image as ${info.image_size} × ${info.image_size} pixels and tells apart ${classes.length} characters: ${classes.join(", ")}.`;
    $("limits").textContent = `Up to ${info.limits.max_files} images at a time, ${bytes(info.limits.max_file_bytes)} each.`;
  }

  function addCard(file) {
    const upload = el("img", { className: "upload", alt: `${file.name} as uploaded` });
    const url = URL.createObjectURL(file);
    previews.push(url);
    upload.addEventListener("error", () => upload.replaceWith(el("span", { className: "nopreview" }, "no preview")));
    upload.src = url;
    const card = el(
      "li",
      { className: "card" },
      el("h3", { className: "file" }, file.name),
      el("div", { className: "images" }, el("figure", {}, upload, el("figcaption", {}, "Uploaded"))),
      el("div", { className: "outcome" }, el("p", { className: "pending" }, "Waiting…")),
    );
    card.dataset.file = file.name;
    card.dataset.state = "pending";
    results.append(card);
    return card;
  }

  function showError(card, headline, detail) {
    card.dataset.state = "error";
    const outcome = card.querySelector(".outcome");
    outcome.replaceChildren(el("p", { className: "error" }, headline), ...(detail ? [el("p", { className: "detail" }, detail)] : []));
  }

  // A 4xx body is {"detail": "<file>: <problem>"}; people get a sentence, with the server's words as detail.
  function explain(code, body, name) {
    let detail = body && typeof body.detail === "string" ? body.detail : "";
    if (detail.startsWith(`${name}: `)) detail = detail.slice(name.length + 2);
    if (detail) detail = `Details: ${detail}.`.replace(/\.\.$/, ".");
    const headline =
      code === 413 ? "This file is too large for the model." :
      code === 422 ? "This file is not an image the model can read." :
      code >= 500 ? "The server failed while classifying this file. Try again later." :
      `The server refused this file (HTTP ${code}).`;
    return [headline, detail];
  }

  // The API's unsure_reason: the image itself may be the doubt, not the model's confidence.
  const UNSURE = {
    low_confidence: "Unsure: the model's confidence is below its minimum, so treat this answer with care.",
    no_ink: "Unsure: this image holds no ink (it is blank or uniform), so the class above means nothing.",
    too_small: "Unsure: this image is too small to hold a character, so the class above means nothing.",
  };

  function showPrediction(card, pred) {
    card.dataset.state = "done";
    card.dataset.index = String(pred.index);
    if (pred.input) {
      const seen = el("img", { className: "seen", src: pred.input, alt: `${card.dataset.file} as the model saw it` });
      card.querySelector(".images").append(el("figure", {}, seen, el("figcaption", {}, `As the model saw it (${model.image_size} × ${model.image_size})`)));
    }
    const rows = pred.top_k.map((c) =>
      el(
        "li",
        {},
        ...className(c.index),
        el("span", { className: "bar", "aria-hidden": "true" }, el("span", { style: `width: ${(100 * c.probability).toFixed(1)}%` })),
        el("span", { className: "pct" }, percent(c.probability)),
      ),
    );
    const best = el("p", { className: "top" }, "Most likely: ", ...className(pred.index), ` (${percent(pred.probability)})`);
    const unsure = pred.unsure ? el("p", { className: "unsure" }, UNSURE[pred.unsure_reason] || UNSURE.low_confidence) : null;
    const topk = el("ol", { className: "topk", "aria-label": "Most likely classes" }, ...rows);
    card.querySelector(".outcome").replaceChildren(...[best, unsure, topk].filter(Boolean));
  }

  async function classify(file, card) {
    card.querySelector(".pending").textContent = "Classifying…";
    const body = new FormData();
    body.append("files", file, file.name);
    let response;
    try {
      response = await fetch("predict?include=input", { method: "POST", body });
    } catch (err) {
      showError(card, "The server could not be reached. Is it still running?");
      return false;
    }
    const data = await response.json().catch(() => null);
    if (!response.ok || !data || !data.predictions) {
      showError(card, ...explain(response.status, data, file.name));
      return false;
    }
    showPrediction(card, data.predictions[0]);
    return true;
  }

  async function handle(fileList) {
    const files = Array.from(fileList);
    if (!files.length || !(await ready)) return;
    const { max_files: maxFiles, max_file_bytes: maxBytes } = model.limits;
    status.textContent = `Classifying ${files.length} image${files.length > 1 ? "s" : ""}…`;
    const jobs = files.map((file, i) => {
      const card = addCard(file);
      if (i >= maxFiles) {
        showError(card, `Not sent: at most ${maxFiles} images can be classified at a time.`, "Choose this one again in a second batch.");
      } else if (file.size > maxBytes) {
        showError(card, "This file is too large for the model.", `It is ${bytes(file.size)}; the limit is ${bytes(maxBytes)} per image.`);
      } else {
        return classify(file, card);
      }
      return Promise.resolve(false);
    });
    const done = (await Promise.all(jobs)).filter(Boolean).length;
    status.textContent = `${done} of ${files.length} image${files.length > 1 ? "s" : ""} classified.`;
  }

  input.addEventListener("change", () => {
    handle(input.files);
    input.value = "";
  });
  $("clear").addEventListener("click", () => {
    previews.forEach((url) => URL.revokeObjectURL(url));
    previews = [];
    results.replaceChildren();
    status.textContent = "Results cleared.";
  });
  const drop = $("drop");
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) drop.classList.remove("over");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    handle(e.dataTransfer.files);
  });

  const ready = fetch("model")
    .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`HTTP ${r.status}`))))
    .then((info) => {
      model = info;
      describeModel(info);
      document.body.dataset.ready = "true";
      return true;
    })
    .catch((err) => {
      $("model").textContent = `The model's description could not be loaded (${err.message}). Reload the page once the server is running.`;
      return false;
    });
})();
