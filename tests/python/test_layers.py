"""The source folders form layers and includes only run down them (README, "Layout"):

    common -> io -> import -> lora -> quant -> model -> data -> eval -> distributed -> train -> plan -> run -> text -> plot
    -> report -> cli -> apps

A folder may include its own headers and those of folders to its left. Public headers (include/loratune) belong to
the folder that implements them, listed below; a new public header must be added here. Also checked:
- the README's picture of the layers says what the includes do (the chain and each folder's line);
- each public header is implemented by the source of the same name in its folder (or is header-only);
- each public header is in exactly one umbrella header (loratune.h, vision.h, text.h), the one of the library that
  compiles its source, and no source includes an umbrella.

usage: test_layers.py SOURCE_DIR
"""
import collections
import glob
import os
import re
import sys

ORDER = ["common", "io", "import", "lora", "quant", "model", "export", "data", "eval", "distributed", "train", "plan", "run", "text",
         "plot", "report", "cli", "apps"]
OWNER = {
    "common": ["amp", "cpu_allocator", "device", "errors", "memory", "method", "named_enum", "named_tensor", "threads"],
    "io": ["safetensors"],
    "import": ["import"],
    "lora": ["adapter", "adapter_init", "adapter_variant", "lora", "targets"],
    "quant": ["quantize"],
    "model": ["adapter_binding", "block_stack", "bundle", "classifier_head", "merge", "mlp_adapters", "model", "prompt_tokens"],
    "export": ["onnx_export"],
    "data": ["batch_source", "captions", "image", "image_folder", "loader", "transform"],
    "eval": ["evaluate", "metrics"],
    "distributed": ["process_group"],
    "train": ["config", "optim", "train_step", "trainer", "training_setup"],
    "plan": ["memory_plan"],
    "run": ["training_run"],
    "text": ["clip_tokenizer", "sentencepiece_tokenizer", "text_tokenizer", "zero_shot"],
}
HEADER_ONLY = {"errors", "method", "named_tensor", "text_tokenizer"}
# Umbrella header -> the CMake library whose public headers it gathers.
UMBRELLAS = {"loratune": "loratune", "vision": "loratune_vision", "text": "loratune_text"}
HEADER_FOLDER = {h: folder for folder, headers in OWNER.items() for h in headers}


def includes(path):
    return re.findall(r'#include "([a-z_]+)/([a-z_]+)\.h"', open(path, encoding="utf-8").read())


def library_sources(root):
    """source path -> CMake library, from the add_library lists of CMakeLists.txt."""
    text = open(os.path.join(root, "CMakeLists.txt"), encoding="utf-8").read()
    out = {}
    for name, body in re.findall(r"add_library\((\w+)\s([^)]*)\)", text):
        for src in re.findall(r"src/\S+\.cpp", body):
            out[src] = name
    return out


def check_readme(root, uses):
    text = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    failures = []
    chain = re.search(r"^ {4}(common <- .*)$", text, re.M)
    if not chain or [p.strip() for p in chain.group(1).split("<-")] != ORDER:
        failures.append("README: the layer chain is not " + " <- ".join(ORDER))
    for folder in ORDER[1:]:
        line = re.search(rf"^ {{4}}{folder} +-> ([a-z, ]+)", text, re.M)
        want = ", ".join(sorted(uses[folder] - {folder}, key=ORDER.index))
        got = line.group(1).strip() if line else None
        if got != want:
            failures.append(f"README: the line of {folder} says {got!r}; the includes say {want!r}")
    return failures


def check_contributing(root):
    """CONTRIBUTING.md's "Where a change goes": every file it names exists, and every function it names as `name()`
    is defined in one of the files named in the same bullet."""
    text = open(os.path.join(root, "CONTRIBUTING.md"), encoding="utf-8").read()
    section = text.split("## Where a change goes", 1)[1].split("\n## ", 1)[0]
    failures = []
    for bullet in re.split(r"\n- ", section)[1:]:
        paths = [p for p in re.findall(r"`([A-Za-z0-9_./<>-]+\.(?:cpp|h|py|txt))`", bullet) if "<" not in p]
        paths += re.findall(r"`(CMakeLists\.txt)`", bullet)
        for path in paths:
            if not os.path.exists(os.path.join(root, path)):
                failures.append(f"CONTRIBUTING.md names {path}, which does not exist")
        sources = "".join(open(os.path.join(root, p), encoding="utf-8").read() for p in set(paths)
                          if os.path.exists(os.path.join(root, p)))
        for function in re.findall(r"`([a-z_]+)\(\)`", bullet):
            if not re.search(rf"\b{function}\(", sources):
                failures.append(f"CONTRIBUTING.md names {function}(), which none of {sorted(set(paths))} defines")
        for test in re.findall(r"`([A-Z][A-Za-z]+\.[A-Z][A-Za-z]+)", bullet):
            suite, name = test.split(".")
            if not re.search(rf"TEST(_P)?\({suite}, {name}", "".join(
                    open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(root, "tests", "unit", "*.cpp")))):
                failures.append(f"CONTRIBUTING.md names the test {test}..., which tests/unit does not hold")
    return failures


def main(root):
    failures = []
    public = sorted(os.path.basename(p)[:-2] for p in glob.glob(os.path.join(root, "include", "loratune", "*.h")))
    headers = [h for h in public if h not in UMBRELLAS]
    failures += [f"include/loratune/{h}.h has no layer in test_layers.py" for h in headers if h not in HEADER_FOLDER]
    uses = collections.defaultdict(set)
    files = glob.glob(os.path.join(root, "src", "*", "*.*")) + glob.glob(os.path.join(root, "include", "loratune", "*.h")) + \
        glob.glob(os.path.join(root, "apps", "*", "*.cpp"))
    for path in files:
        rel = os.path.relpath(path, root)
        parts = rel.split(os.sep)
        name = parts[-1][:-2]
        if parts[0] == "include" and name in UMBRELLAS:
            continue
        folder = "apps" if parts[0] == "apps" else HEADER_FOLDER.get(name) if parts[0] == "include" else parts[1]
        for kind, included in includes(path):
            if kind == "loratune" and included in UMBRELLAS:
                failures.append(f"{rel} includes the umbrella loratune/{included}.h: include what it uses")
                continue
            target = HEADER_FOLDER.get(included) if kind == "loratune" else kind
            if target is None or folder is None:
                continue
            uses[folder].add(target)
            if ORDER.index(target) > ORDER.index(folder):
                failures.append(f"{rel} ({folder}) includes {kind}/{included}.h ({target}): an include runs up the layers")

    sources = library_sources(root)
    library_of = {}
    for h in headers:
        folder = HEADER_FOLDER.get(h)
        src = f"src/{folder}/{h}.cpp"
        if h in HEADER_ONLY:
            library_of[h] = next((lib for s, lib in sources.items() if s.startswith(f"src/{folder}/")), None)
        elif src not in sources:
            failures.append(f"include/loratune/{h}.h: no {src} implements it (name the source after the header)")
        else:
            library_of[h] = sources[src]
    gathered = collections.defaultdict(list)
    for umbrella, library in UMBRELLAS.items():
        path = os.path.join(root, "include", "loratune", umbrella + ".h")
        if not os.path.exists(path):
            failures.append(f"include/loratune/{umbrella}.h is missing")
            continue
        for kind, included in includes(path):
            if included in UMBRELLAS:
                continue
            gathered[included].append(umbrella)
            if library_of.get(included) not in (None, library):
                failures.append(f"{umbrella}.h includes {included}.h, which {library_of[included]} implements")
    for h in headers:
        if len(gathered[h]) != 1:
            failures.append(f"include/loratune/{h}.h is in {len(gathered[h])} umbrella headers, not one")

    failures += check_readme(root, uses)
    failures += check_contributing(root)
    for folder in ORDER:
        print(f"{folder:11s} -> {', '.join(sorted(uses[folder] - {folder}, key=ORDER.index))}")
    for f in failures:
        print("FAIL:", f)
    print(f"{0 if failures else 1} passed, {1 if failures else 0} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
