// Runs an ONNX file in ONNX Runtime (onnxruntime-node) for the export tests:
//   node ort_run.js MODEL INPUT.f32 OUTPUT.f32 N C H W
// reads a float32 batch of shape [N, C, H, W], writes the first output as float32 and prints its dims as JSON.
const fs = require("fs");
const ort = require("onnxruntime-node");

async function main() {
  const [model, input, output, ...dims] = process.argv.slice(2);
  const bytes = fs.readFileSync(input);
  const data = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
  const session = await ort.InferenceSession.create(model, { intraOpNumThreads: 1, interOpNumThreads: 1 });
  const result = await session.run({ [session.inputNames[0]]: new ort.Tensor("float32", data, dims.map(Number)) });
  const y = result[session.outputNames[0]];
  fs.writeFileSync(output, Buffer.from(y.data.buffer, y.data.byteOffset, y.data.byteLength));
  console.log(JSON.stringify({ dims: y.dims, input: session.inputNames[0], output: session.outputNames[0] }));
}

main().catch((e) => {
  console.error(e.message);
  process.exit(1);
});
