// vitkit serve's page: everything it loads comes from this server (no CDN), so it works offline.
"use strict";
const $ = (id) => document.getElementById(id);
let card = null;
let explained = null;

function key() { return sessionStorage.getItem("vitkit-key") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (key()) headers["Authorization"] = "Bearer " + key();
  const res = await fetch(path, Object.assign({}, options, { headers }));
  if (res.status === 401) { $("auth").hidden = false; throw new Error("this server needs an API key"); }
  if (!res.ok) {
    let detail = res.statusText;
    try { const j = await res.json(); detail = j.detail || j.error || detail; } catch (e) { /* not JSON */ }
    const err = new Error(detail); err.status = res.status; throw err;
  }
  return res;
}

function say(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!isError);
}

function addRow(list, name, value) {
  const dt = document.createElement("dt"); dt.textContent = name;
  const dd = document.createElement("dd"); dd.textContent = value;
  list.append(dt, dd);
}

async function loadCard() {
  try {
    card = await (await api("/v1/model")).json();
  } catch (e) {
    if (e.status === 503) { say("The model is loading…"); setTimeout(loadCard, 1000); return; }
    say(e.message, true); return;
  }
  $("model-name").textContent = card.name;
  const list = $("card-list"); list.textContent = "";
  addRow(list, "Architecture", card.architecture);
  addRow(list, "Parameters", (card.params / 1e6).toFixed(2) + " M");
  addRow(list, "Input", card.preprocessing.input_size.join(" × "));
  addRow(list, "Classes", card.classes.length + ": " + card.classes.slice(0, 20).join(", ") +
         (card.classes.length > 20 ? ", …" : ""));
  const r = card.report || {};
  if (r.top1 !== undefined) addRow(list, "Held-out accuracy", "top-1 " + r.top1.toFixed(2) + " %" +
                                   (r.top5 !== undefined ? ", top-5 " + r.top5.toFixed(2) + " %" : "") +
                                   (r.eval_images ? " on " + r.eval_images + " images" : ""));
  if (r.epochs !== undefined) {
    const parts = [r.epochs + " epochs"];
    if (r.steps !== undefined) parts.push(r.steps + " steps");
    if (r.train_seconds !== undefined) parts.push(Math.round(r.train_seconds) + " s");
    if (r.data && r.data.num_train) parts.push(r.data.num_train + " images");
    if (r.date) parts.push(r.date.slice(0, 10));
    addRow(list, "Training", parts.join(", "));
  }
  const e = r.latest_eval;
  if (e && e.top1 != null) addRow(list, "Latest eval", "top-1 " + e.top1.toFixed(2) + " % on " + e.num_images +
                                  " images of " + e.data + " (" + e.date.slice(0, 10) + ")");
  addRow(list, "Runs on", card.device + " (" + card.backend + ")");
  if (card.index) addRow(list, "Index", card.index.count + " images (" + card.index.kind + ")");
  addRow(list, "Checkpoint", card.checkpoint + " · sha256 " + card.sha256.slice(0, 12));
  $("search-panel").hidden = !card.index;
  say("Ready: drop, paste or choose an image.");
}

function post(path, blob) {
  return api(path, { method: "POST", body: blob,
                     headers: { "Content-Type": blob.type || "application/octet-stream" } });
}

function showBars(res) {
  const ol = $("bars"); ol.textContent = "";
  for (const t of res.topk) {
    const li = document.createElement("li");
    const pct = (100 * t.prob).toFixed(1) + "%";
    li.setAttribute("aria-label", t.label + ": " + pct);
    const label = document.createElement("span"); label.className = "label"; label.textContent = t.label;
    const track = document.createElement("span"); track.className = "track"; track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span"); fill.className = "fill"; fill.style.width = pct;
    fill.style.display = "block"; track.append(fill);
    const num = document.createElement("span"); num.className = "pct"; num.textContent = pct;
    li.append(label, track, num); ol.append(li);
  }
}

function showMap() {
  if (!explained) return;
  const head = $("head").value;
  const png = head === "all" ? explained.heat_png : explained.head_pngs[Number(head)];
  $("overlay").src = "data:image/png;base64," + png;
  $("overlay-caption").textContent = head === "all"
    ? "Attention " + explained.method + " over the image; peak at row " + explained.peak[0] + ", column " +
      explained.peak[1] + " of the " + explained.grid.join("×") + " patch grid"
    : "Last block, head " + head;
}

function showExplain(doc) {
  explained = doc;
  $("image").src = "data:image/png;base64," + doc.image_png; $("image").hidden = false;
  $("overlay-base").src = "data:image/png;base64," + doc.image_png; $("overlay-base").hidden = false;
  $("overlay").hidden = false;
  const sel = $("head"); const keep = sel.value; sel.textContent = "";
  sel.append(new Option("all heads (" + doc.method + ")", "all"));
  doc.head_pngs.forEach((_, h) => sel.append(new Option("last block, head " + h, String(h))));
  sel.value = keep < doc.head_pngs.length || keep === "all" ? keep : "all";
  showMap();
}

async function showNeighbours(res) {
  const ul = $("neighbours"); ul.textContent = "";
  for (const n of res.neighbours) {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.alt = "Neighbour " + n.rank + (n.label !== null ? ", class " + n.label : "");
    const cap = document.createElement("span");
    cap.textContent = "#" + n.rank + " " + (n.label !== null ? n.label + " · " : "") + n.score.toFixed(3);
    li.append(img, document.createElement("br"), cap); ul.append(li);
    // fetched with the key (an <img src> could not send it), shown from a blob URL
    api(n.thumbnail_url).then((r) => r.blob()).then((b) => { img.src = URL.createObjectURL(b); })
      .catch(() => { cap.textContent += " (image unavailable)"; });
  }
}

async function analyse(blob) {
  if (!blob) return;
  if (!card) { say("The model is not ready yet; try again in a moment.", true); return; }
  say("Analysing " + (blob.name || "the pasted image") + "…");
  try {
    const jobs = [post("/v1/classify?topk=5", blob).then((r) => r.json()),
                  post("/v1/explain", blob).then((r) => r.json())];
    if (card.index) jobs.push(post("/v1/search?k=8", blob).then((r) => r.json()));
    const [cls, exp, near] = await Promise.all(jobs);
    showBars(cls); showExplain(exp);
    if (near) await showNeighbours(near);
    say("Predicted " + cls.label + " (" + (100 * cls.prob).toFixed(1) + "%).");
    $("result").focus();
  } catch (e) {
    say("Could not analyse the image: " + e.message, true);
  }
}

function setup() {
  $("file").addEventListener("change", (e) => analyse(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files.length) analyse(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) analyse(item.getAsFile());
  });
  $("opacity").addEventListener("input", (e) => {
    $("overlay").style.opacity = e.target.value / 100;
    e.target.setAttribute("aria-valuetext", e.target.value + "%");
  });
  $("head").addEventListener("change", showMap);
  $("key-save").addEventListener("click", () => {
    sessionStorage.setItem("vitkit-key", $("key").value.trim()); $("auth").hidden = true; loadCard();
  });
  loadCard();
}

document.addEventListener("DOMContentLoaded", setup);
