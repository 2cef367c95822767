// The circe search page: pick a reference, say what should change, browse the ranking,
// click a result to make it the next reference. Talks to the same server's JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
// The current reference: a gallery image {id, thumbnail_url} or an uploaded {file}.
let reference = null;

function showMessage(text) {
  $("message").textContent = text || "";
}

function setReference(next) {
  reference = next;
  const preview = $("reference-preview");
  preview.src = next.file ? URL.createObjectURL(next.file) : next.thumbnail_url + "?size=256";
  preview.dataset.id = next.id || "";
  preview.alt = next.file ? next.file.name : next.path;
  preview.hidden = false;
  $("drop-hint").hidden = true;
  showMessage("");
  $("text").focus();
}

function card(item, score) {
  const element = document.createElement("figure");
  element.className = score === undefined ? "card gallery-item" : "card result";
  element.dataset.id = item.id;
  element.title = "use as the reference";
  const image = document.createElement("img");
  image.src = item.thumbnail_url;
  image.alt = item.path;
  image.loading = "lazy";
  const caption = document.createElement("figcaption");
  if (score !== undefined) {
    const value = document.createElement("div");
    value.className = "score";
    value.textContent = `#${item.rank} · ${score.toFixed(3)}`;
    caption.append(value);
  }
  const path = document.createElement("div");
  path.className = "path";
  path.textContent = item.path;
  caption.append(path);
  element.append(image, caption);
  element.addEventListener("click", () => {
    setReference(item);
    window.scrollTo({ top: 0, behavior: "smooth" });
  });
  return element;
}

function fillGrid(title, elements) {
  $("grid-title").textContent = title;
  $("grid").replaceChildren(...elements);
}

async function failure(response) {
  try {
    const body = await response.json();
    const detail = body.detail;
    return typeof detail === "string" ? detail : detail.map((d) => d.msg).join("; ");
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function search(event) {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!reference) return showMessage("Choose a reference image first.");
  if (!text) return showMessage("Say how the image you want differs from the reference.");
  const form = new FormData();
  form.append("text", text);
  form.append("k", $("k").value);
  if (reference.file) form.append("image", reference.file);
  else form.append("id", reference.id);
  showMessage("searching…");
  const response = await fetch("/search", { method: "POST", body: form });
  if (!response.ok) return showMessage(await failure(response));
  const body = await response.json();
  showMessage("");
  const step = document.createElement("li");
  step.textContent = `${reference.file ? reference.file.name : reference.path} + “${text}”`;
  $("history").append(step);
  fillGrid(
    `Results for “${text}” (${body.took_ms} ms) — click one to refine from it`,
    body.results.map((hit) => card(hit, hit.score)),
  );
}

function useFile(file) {
  if (file && file.type.startsWith("image/")) setReference({ file });
  else showMessage("That is not an image file.");
}

async function start() {
  const health = await (await fetch("/healthz")).json();
  $("status").textContent = `${health.images} images · ${health.method} · ${health.backbone}`;
  const page = await (await fetch("/gallery?limit=48")).json();
  fillGrid(
    `Gallery (${page.total} images) — click one to use it as the reference`,
    page.items.map((item) => card(item)),
  );
  $("search-form").addEventListener("submit", search);
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
}

start().catch((error) => showMessage(`cannot reach the server: ${error}`));
