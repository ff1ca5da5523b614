#!/usr/bin/env python3
"""ONNX export: time and peak memory of `loratune export` on ViT-B/16 (timm) and MobileCLIP2-S2 (open_clip) image
bundles (random weights, made with the export scripts as a user would), and inference throughput of the same model
two ways on this CPU, interleaved in one run: the ONNX file in ONNX Runtime (onnxruntime-node) and the TorchScript
bundle in LibTorch (the engine `loratune predict` runs, through Debian's python3-torch, which links the same
libtorch), forward only on the same random batch, the same thread count, median of 5 runs after a warm-up.

usage: /usr/bin/python3 scripts/bench/bench_onnx_export.py [--binary build/bin/loratune] [--threads 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, os.path.join(ROOT, "tests", "python")]
import onnx_runtime  # noqa: E402
from process_peak import measured  # noqa: E402

NODE_BENCH = r"""
const ort = require("onnxruntime-node");
(async () => {
  const [model, batch, size, threads, repeats] = process.argv.slice(2).map((v, i) => i ? Number(v) : v);
  const s = await ort.InferenceSession.create(model, {intraOpNumThreads: threads, interOpNumThreads: 1});
  const x = new ort.Tensor("float32", Float32Array.from({length: batch * 3 * size * size}, () => Math.random() - 0.5),
                           [batch, 3, size, size]);
  await s.run({[s.inputNames[0]]: x});  // warm-up
  const times = [];
  for (let i = 0; i < repeats; i++) { const t = process.hrtime.bigint(); await s.run({[s.inputNames[0]]: x});
                                      times.push(Number(process.hrtime.bigint() - t) / 1e9); }
  times.sort((a, b) => a - b);
  console.log(JSON.stringify({median_s: times[times.length >> 1]}));
})();
"""

TORCH_BENCH = r"""
import json, sys, time, torch
model, batch, size, threads, repeats = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(threads)
m = torch.jit.load(model).eval()
x = torch.randn(batch, 3, size, size)
with torch.no_grad():
    m(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); m(x); times.append(time.perf_counter() - t)
print(json.dumps({"median_s": sorted(times)[len(times) // 2]}))
"""


def bundles(tmp, upstream):
    """(name, bundle path, image size) of the two models, made with the export scripts on random weights."""
    paths = [os.path.join(upstream, p) for p in ("timm", "ml-mobileclip", os.path.join("open_clip", "src"),
                                                 "torch113_standins")]
    site = os.path.join(tmp, "site")
    os.makedirs(site)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write("import open_clip_torch113\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site] + paths))
    export = os.path.join(ROOT, "scripts", "export")
    make = r"""
import sys, torch
kind, name, out = sys.argv[1:]
torch.manual_seed(0)
if kind == "timm":
    import timm
    torch.save(timm.create_model(name, pretrained=False).state_dict(), out)
else:
    import open_clip
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=None)
    torch.save(model.state_dict(), out)
"""
    vit = os.path.join(tmp, "vit_b16")
    subprocess.run([sys.executable, "-c", make, "timm", "vit_base_patch16_224", vit + ".pth"], env=env, check=True)
    subprocess.run([sys.executable, os.path.join(export, "timm_vit.py"), "--model", "vit_base_patch16_224",
                    "--checkpoint", vit + ".pth", "--output", vit + ".pt"], env=env, check=True, stdout=subprocess.DEVNULL)
    s2 = os.path.join(tmp, "mobileclip2_s2")
    subprocess.run([sys.executable, "-c", make, "open_clip", "MobileCLIP2-S2", s2 + ".pth"], env=env, check=True)
    subprocess.run([sys.executable, os.path.join(export, "open_clip_mobileclip.py"), "--model", "MobileCLIP2-S2",
                    "--checkpoint", s2 + ".pth", "--output", s2], env=env, check=True, stdout=subprocess.DEVNULL)
    return [("ViT-B/16 (timm)", vit + ".pt", 224), ("MobileCLIP2-S2 image", s2 + "_image.pt", 256)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "bin", "loratune"))
    p.add_argument("--upstream", default=os.path.join(ROOT, "..", "shared", "upstream"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    runtime = onnx_runtime.ensure_runtime(args.binary)
    env = dict(os.environ, NODE_PATH=os.path.join(runtime, "node_modules"))
    _, baseline = measured([args.binary, "--version"])
    print(f"CPU threads {args.threads}, batch {args.batch}; process baseline {baseline / 2**20:.0f} MiB")
    with tempfile.TemporaryDirectory(prefix="loratune_bench_onnx_") as tmp:
        with open(os.path.join(tmp, "bench.js"), "w") as f:
            f.write(NODE_BENCH)
        for name, bundle, size in bundles(tmp, os.path.abspath(args.upstream)):
            out = bundle.replace(".pt", ".onnx")
            seconds, peak = measured([args.binary, "export", "--model", bundle, "--output", out,
                                      "--threads", str(args.threads)])
            print(f"\n{name}: bundle {os.path.getsize(bundle) / 2**20:.0f} MiB, ONNX {os.path.getsize(out) / 2**20:.0f} MiB;"
                  f" export {seconds:.1f} s, peak {peak / 2**20:.0f} MiB ({(peak - baseline) / 2**20:.0f} above baseline,"
                  f" {(peak - baseline) / os.path.getsize(bundle):.1f}x the weights)")
            rates = {"onnxruntime-node": [], "LibTorch (TorchScript)": []}
            for _ in range(args.rounds):  # interleaved: each engine once per round
                r = subprocess.run(["node", os.path.join(tmp, "bench.js"), out, str(args.batch), str(size),
                                    str(args.threads), "5"], capture_output=True, text=True, env=env, check=True)
                rates["onnxruntime-node"].append(args.batch / json.loads(r.stdout)["median_s"])
                r = subprocess.run([sys.executable, "-c", TORCH_BENCH, bundle, str(args.batch), str(size),
                                    str(args.threads), "5"], capture_output=True, text=True, check=True)
                rates["LibTorch (TorchScript)"].append(args.batch / json.loads(r.stdout)["median_s"])
            onnx_median = sorted(rates["onnxruntime-node"])[args.rounds // 2]
            for engine, values in rates.items():
                median = sorted(values)[args.rounds // 2]
                print(f"  {engine:32s} {median:7.1f} images/s  ({median / onnx_median:.2f}x ONNX Runtime;"
                      f" rounds {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
