"""The source folders form layers and includes only run down them (README, "Layout"):

    common -> io -> import -> lora -> model -> data -> eval -> distributed -> train -> plan -> text -> plot -> cli -> apps

A folder may include its own headers and those of folders to its left. Public headers (include/loratune) belong to
the folder that implements them, listed below; a new public header must be added here.

usage: test_layers.py SOURCE_DIR
"""
import collections
import glob
import os
import re
import sys

ORDER = ["common", "io", "import", "lora", "model", "data", "eval", "distributed", "train", "plan", "text", "plot", "cli", "apps"]
OWNER = {
    "common": ["amp", "cpu_allocator", "device", "errors", "memory", "method", "named_tensor"],
    "io": ["safetensors"],
    "import": ["import"],
    "lora": ["adapter", "lora"],
    "model": ["adapter_binding", "bundle", "merge", "model"],
    "data": ["batch_source", "image", "image_folder", "loader"],
    "eval": ["evaluate", "metrics"],
    "distributed": ["process_group"],
    "train": ["config", "optim", "train_step", "trainer", "training_setup"],
    "plan": ["memory_plan"],
    "text": ["clip_tokenizer", "sentencepiece_tokenizer", "text_tokenizer", "zero_shot"],
}
HEADER_FOLDER = {h: folder for folder, headers in OWNER.items() for h in headers}


def main(root):
    failures = []
    public = sorted(os.path.basename(p)[:-2] for p in glob.glob(os.path.join(root, "include", "loratune", "*.h")))
    failures += [f"include/loratune/{h}.h has no layer in test_layers.py" for h in public if h not in HEADER_FOLDER]
    uses = collections.defaultdict(set)
    files = glob.glob(os.path.join(root, "src", "*", "*.*")) + glob.glob(os.path.join(root, "include", "loratune", "*.h")) + \
        glob.glob(os.path.join(root, "apps", "*", "*.cpp"))
    for path in files:
        rel = os.path.relpath(path, root)
        parts = rel.split(os.sep)
        folder = "apps" if parts[0] == "apps" else HEADER_FOLDER.get(parts[-1][:-2]) if parts[0] == "include" else parts[1]
        for kind, name in re.findall(r'#include "([a-z_]+)/([a-z_]+)\.h"', open(path, encoding="utf-8").read()):
            target = HEADER_FOLDER.get(name) if kind == "loratune" else kind
            if target is None or folder is None:
                continue
            uses[folder].add(target)
            if ORDER.index(target) > ORDER.index(folder):
                failures.append(f"{rel} ({folder}) includes {kind}/{name}.h ({target}): an include runs up the layers")
    for folder in ORDER:
        print(f"{folder:7s} -> {', '.join(sorted(uses[folder] - {folder}, key=ORDER.index))}")
    for f in failures:
        print("FAIL:", f)
    print(f"{0 if failures else 1} passed, {1 if failures else 0} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
