// The static page `loratune export --format web` writes beside the ONNX file: it loads model.onnx with
// onnxruntime-web (vendored in ./ort/, single-threaded WebAssembly, no network), preprocesses each dropped photo as the
// metadata says (short side to resize_size, center crop, mean/std) and shows the top classes. `{{INFO}}` is replaced
// by the model's JSON (classes, mean, std, sizes), `{{TITLE}}` by the escaped title.
#pragma once

namespace loratune::web {

inline constexpr const char* kOrtScript = "ort.wasm.bundle.min.mjs";
inline constexpr const char* kOrtWasm = "ort-wasm-simd-threaded.wasm";

inline constexpr const char* kPage = R"HTML(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>
body { font: 15px/1.45 system-ui, "Noto Sans CJK KR", "NanumGothic", sans-serif; margin: 2rem auto; max-width: 52rem;
       padding: 0 1rem; color: #1d232a; }
#drop { border: 2px dashed #8a97a6; border-radius: 10px; padding: 2.5rem 1rem; text-align: center; color: #46525f; }
#drop.over { background: #eef4fb; border-color: #2f6fb3; }
#status { margin: 1rem 0; color: #46525f; }
.result { display: flex; gap: 1rem; align-items: flex-start; border-top: 1px solid #dde3ea; padding: .8rem 0; }
.result img { width: 96px; height: 96px; object-fit: cover; border-radius: 6px; background: #f2f4f7; }
.result ol { margin: 0; padding-left: 1.3rem; }
.result .name { font-weight: 600; }
.bar { display: inline-block; height: .55rem; background: #2f6fb3; border-radius: 3px; margin-left: .4rem; }
</style>
</head>
<body>
<h1>{{TITLE}}</h1>
<div id="drop">Drop photos here, or <label><u>choose them</u>
  <input id="file" type="file" accept="image/*" multiple hidden></label></div>
<div id="status">Loading the model…</div>
<div id="results"></div>
<script type="application/json" id="model-info">{{INFO}}</script>
<script type="module">
import * as ort from "./ort/ort.wasm.bundle.min.mjs";

const info = JSON.parse(document.getElementById("model-info").textContent);
const status = document.getElementById("status");
// One thread: no SharedArrayBuffer, so any static server works without special headers. The bundle loads its .wasm
// from beside itself.
ort.env.wasm.numThreads = 1;

// Short side to resize_size, center crop image_size, RGB scaled to [0, 1], then (x - mean) / std, NCHW.
function preprocess(bitmap) {
  const size = info.image_size, scale = info.resize_size / Math.min(bitmap.width, bitmap.height);
  const crop = size / scale;
  const canvas = new OffscreenCanvas(size, size);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, (bitmap.width - crop) / 2, (bitmap.height - crop) / 2, crop, crop, 0, 0, size, size);
  const rgba = ctx.getImageData(0, 0, size, size).data, plane = size * size;
  const x = new Float32Array(3 * plane);
  for (let i = 0; i < plane; i++)
    for (let c = 0; c < 3; c++) x[c * plane + i] = (rgba[4 * i + c] / 255 - info.mean[c]) / info.std[c];
  return new ort.Tensor("float32", x, [1, 3, size, size]);
}

function softmax(logits) {
  const max = Math.max(...logits), e = logits.map(v => Math.exp(v - max)), sum = e.reduce((a, b) => a + b, 0);
  return e.map(v => v / sum);
}

let session;
async function classify(file) {
  const bitmap = await createImageBitmap(file);
  const output = await session.run({ [session.inputNames[0]]: preprocess(bitmap) });
  const probabilities = softmax(Array.from(output[session.outputNames[0]].data));
  const order = probabilities.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]).slice(0, info.top_k);
  const row = document.createElement("div");
  row.className = "result";
  row.dataset.file = file.name;
  row.dataset.top1 = info.classes[order[0][1]] ?? String(order[0][1]);
  const img = document.createElement("img");
  img.src = URL.createObjectURL(file);
  img.alt = file.name;
  const list = document.createElement("ol");
  for (const [p, i] of order) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = info.classes[i] ?? String(i);  // text, never markup: class names come from folder names
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(120 * p)}px`;
    item.append(name, ` ${(100 * p).toFixed(1)}%`, bar);
    list.append(item);
  }
  const caption = document.createElement("div");
  caption.textContent = file.name;
  const text = document.createElement("div");
  text.append(caption, list);
  row.append(img, text);
  document.getElementById("results").prepend(row);
}

async function classifyAll(files) {
  for (const file of files) {
    try {
      await classify(file);
    } catch (e) {
      status.textContent = `${file.name}: ${e.message}`;
    }
  }
  document.body.dataset.classified = String(document.querySelectorAll(".result").length);
}

const drop = document.getElementById("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault();
  drop.classList.remove("over");
  classifyAll([...e.dataTransfer.files].filter(f => f.type.startsWith("image/")));
});
document.getElementById("file").addEventListener("change", e => classifyAll([...e.target.files]));

try {
  session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  status.textContent = `Ready: ${info.classes.length} classes, ${info.image_size}×${info.image_size} input. ` +
                       "Photos stay on this computer.";
  document.body.dataset.ready = "1";
} catch (e) {
  status.textContent = `The model did not load: ${e.message}. Open this page from a web server ` +
                       "(for example `npx http-server` in this folder), not as a file.";
  document.body.dataset.ready = "error";
}
</script>
</body>
</html>
)HTML";

}  // namespace loratune::web
