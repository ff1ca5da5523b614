// Runs an ONNX file in ONNX Runtime (onnxruntime-node) for the export tests:
//   node ort_run.js MODEL INPUT OUTPUT.f32 DIM...
// reads a batch of shape DIM... (float32, or int64 token ids when INPUT ends in .i64), writes the first output as
// float32 and prints its dims as JSON. $ORT_OPTIMIZATION sets the graph optimization level (default: all).
const fs = require("fs");
const ort = require("onnxruntime-node");

async function main() {
  const [model, input, output, ...dims] = process.argv.slice(2);
  const bytes = fs.readFileSync(input);
  const tokens = input.endsWith(".i64");
  const data = tokens ? new BigInt64Array(bytes.buffer, bytes.byteOffset, bytes.length / 8)
                      : new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
  const session = await ort.InferenceSession.create(model, {
    intraOpNumThreads: 1, interOpNumThreads: 1, graphOptimizationLevel: process.env.ORT_OPTIMIZATION || "all" });
  const x = new ort.Tensor(tokens ? "int64" : "float32", data, dims.map(Number));
  const result = await session.run({ [session.inputNames[0]]: x });
  const y = result[session.outputNames[0]];
  fs.writeFileSync(output, Buffer.from(y.data.buffer, y.data.byteOffset, y.data.byteLength));
  console.log(JSON.stringify({ dims: y.dims, input: session.inputNames[0], output: session.outputNames[0] }));
}

main().catch((e) => {
  console.error(e.message);
  process.exit(1);
});
