"""ONNX Runtime for the tests: onnxruntime-node and onnxruntime-web (npm, pinned in tests/js/package.json) installed
once into the build folder, and `exported_outputs`, which exports a bundle with `loratune export`, checks the file with the ONNX checker
(python3-onnx) and runs it on a batch in ONNX Runtime."""
import fcntl
import json
import os
import shutil
import subprocess
import tempfile

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
JS = os.path.join(os.path.dirname(HERE), "js")
ORT_RUN = os.path.join(JS, "ort_run.js")


def runtime_dir(binary):
    """<build>/onnx_runtime for the loratune binary <build>/bin/loratune."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(binary))), "onnx_runtime")


def web_runtime(binary):
    """onnxruntime-web's dist folder, as `loratune export --format web` finds it in a build folder."""
    return os.path.join(ensure_runtime(binary), "node_modules", "onnxruntime-web", "dist")


def ensure_runtime(binary):
    """Installs the packages once (suites run side by side: the first installs under a lock, the others wait).
    Its install script only fetches GPU builds; the CPU binaries ship inside the package, so it is skipped."""
    target = runtime_dir(binary)
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(os.path.join(JS, "package.json")) as f:
            packages = json.load(f)["dependencies"]
        if not all(os.path.isdir(os.path.join(target, "node_modules", p)) for p in packages):
            shutil.copy(os.path.join(JS, "package.json"), target)
            subprocess.run(["npm", "install", "--prefix", target, "--ignore-scripts", "--no-audit", "--no-fund",
                            "--loglevel=error"], check=True, timeout=900)
    return target


def run_onnx(binary, model, x, optimization="all"):
    """The first output of `model` in ONNX Runtime for the batch `x` (float32 images or int64 tokens), with ONNX
    Runtime's graph optimizations at `optimization` (disabled, basic, extended, all)."""
    target = ensure_runtime(binary)
    with tempfile.TemporaryDirectory(prefix="loratune_ort_") as tmp:
        tokens = x.dtype == np.int64
        inp, out = os.path.join(tmp, "in.i64" if tokens else "in.f32"), os.path.join(tmp, "out.f32")
        np.ascontiguousarray(x, dtype=np.int64 if tokens else np.float32).tofile(inp)
        env = dict(os.environ, NODE_PATH=os.path.join(target, "node_modules"), ORT_OPTIMIZATION=optimization)
        p = subprocess.run(["node", ORT_RUN, model, inp, out, *map(str, x.shape)], capture_output=True, text=True,
                           env=env, timeout=600)
        if p.returncode:
            raise AssertionError(f"ONNX Runtime failed on {model}: {p.stderr}")
        return np.fromfile(out, dtype=np.float32).reshape(json.loads(p.stdout)["dims"])


def exported_outputs(binary, bundle, x):
    """`loratune export` of `bundle`, checked, run on `x` in ONNX Runtime; the file is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="loratune_onnx_") as tmp:
        model = os.path.join(tmp, "model.onnx")
        p = subprocess.run([binary, "export", "--model", bundle, "--output", model, "--threads", "1"],
                           capture_output=True, text=True, timeout=900)
        if p.returncode:
            raise AssertionError(f"loratune export {bundle}: {p.stderr}")
        onnx.checker.check_model(model, full_check=True)
        return run_onnx(binary, model, x)
