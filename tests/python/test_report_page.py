"""The HTML report in a real browser (Debian's headless Chromium): the numbers on the page are metrics.json's, a click
on a confusion-matrix cell shows that cell's photos (as predictions.csv lists them), hostile class and file names are
shown as text and never run, Korean names render, a 5,000-photo evaluation stays small; screenshots are kept.

usage: test_report_page.py LORATUNE_BINARY FIXTURE_DIR ARTIFACT_DIR DEMO_DIR [TestClass ...]
"""
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import browser  # noqa: E402

BIN, FIX, ARTIFACTS, DEMO = sys.argv[1:5]
TOY = os.path.join(FIX, "images", "toy")
BASE = os.path.join(FIX, "models", "hf_script.pt")
TMP = tempfile.mkdtemp(prefix="loratune_report_")

# Class names a hostile folder could hold (no "/" in a file name), and Korean. The first class ends in "<" and the
# first file name starts with "script>", so the shown name "class/file" holds "</script>".
HOSTILE_CLASSES = {"circle": '<img src=x onerror="window.pwned=1"><',
                   "stripes": "\"quote' & <b>bold <script>window.pwned=2<\\script>",
                   "빨간_사각형": "고양이"}
HOSTILE_FILES = ["script><script>window.pwned=3<\\script>.png", 'x" onmouseover="window.pwned=4.png',
                 "a<img src=x onerror=window.pwned=5>.png"]


def run(*args, timeout=600):
    p = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def predictions(eval_dir):
    with open(os.path.join(eval_dir, "predictions.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def display_name(path, metrics):
    rel = os.path.relpath(path, os.path.abspath(metrics["data"]))
    return rel if not rel.startswith("..") else os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def check_report(test, b, page, screenshot):
    """The checks every report passes; returns the seconds the page took to load."""
    seconds = b.open("file://" + os.path.abspath(page))
    test.assertEqual(b.js("document.body.dataset.ready"), "1", f"the page script did not finish: {b.console_errors}")
    data = b.js("JSON.parse(document.getElementById('report-data').textContent)")
    for k, ev in enumerate(data["evals"]):
        with open(os.path.join(ev["dir"], "metrics.json"), encoding="utf-8") as f:
            m = json.load(f)
        shown = b.js(f"Object.fromEntries([...document.querySelectorAll('#evaluation-{k} [data-metric]')]"
                     ".map(e => [e.dataset.metric, e.textContent]))")
        test.assertEqual(shown["top1"], f"{100 * m['top1']:.2f}%")
        test.assertEqual(shown["top5"], f"{100 * m['top5']:.2f}%" if "top5" in m else "n/a")
        test.assertEqual(shown["macro_f1"], f"{100 * m['macro_f1']:.2f}%")
        test.assertEqual(shown["loss"], f"{m['loss']:.4f}")
        test.assertEqual(shown["ece"], f"{100 * m['ece']:.2f}%")
        test.assertEqual(shown["count"], str(m["count"]))
        rows = b.js(f"[...document.querySelectorAll('#evaluation-{k} table.per-class tr[data-class]')].map(r => "
                    "[r.querySelector('th').textContent, ...[...r.querySelectorAll('td')].map(d => d.textContent)])")
        test.assertEqual(rows, [[c["class"], f"{100 * c['precision']:.1f}%", f"{100 * c['recall']:.1f}%",
                                 f"{100 * c['f1']:.1f}%", str(c["support"])] for c in m["per_class"]])
        cells = b.js(f"[...document.querySelectorAll('#confusion-{k} tbody tr')].map(r => "
                     "[...r.querySelectorAll('td.cell')].map(d => Number(d.textContent)))")
        test.assertEqual(cells, m["confusion_matrix"])
        # The photos of a cell, from predictions.csv; the page is clicked where an off-diagonal cell has photos.
        rows = predictions(ev["dir"])
        classes = m["classes"]
        errors = [(t, p) for t in range(len(classes)) for p in range(len(classes)) if t != p and cells[t][p]]
        t, p = errors[0] if errors else (0, 0)
        b.click(f"#confusion-{k} td.cell[data-true='{t}'][data-pred='{p}']")
        names = b.js(f"[...document.querySelectorAll('#cell-photos-{k} .tile .name')].map(e => e.textContent)")
        want = [display_name(r["path"], m) for r in rows if r["true"] == classes[t] and r["predicted"] == classes[p]]
        test.assertEqual(len(want), cells[t][p])
        test.assertEqual(sorted(names), sorted(want[:data["maxTiles"]]))
        test.assertIn(f": {len(want)} photo", b.js(f"document.getElementById('cell-title-{k}').textContent"))
        # Misclassified: every one (up to the cap), the most confident first.
        wrong = sorted((r for r in rows if r["true"] != r["predicted"]), key=lambda r: -float(r["confidence"]))
        tiles = b.js(f"[...document.querySelectorAll('#errors-{k} .tile .name')].map(e => e.textContent)")
        test.assertEqual(len(tiles), min(len(wrong), data["maxTiles"]))
        if wrong:
            top = [display_name(r["path"], m) for r in wrong if float(r["confidence"]) == float(wrong[0]["confidence"])]
            test.assertIn(tiles[0], top)
    b.screenshot(screenshot)
    test.assertEqual(b.dialogs, [], "a dialog opened")
    test.assertEqual(b.console_errors, [])
    return seconds, data


def rename_folder(src, dst, files=()):
    """The toy folder `src` copied to `dst` with hostile class names; `files` renames the first photos."""
    for cls in sorted(os.listdir(src)):
        out = os.path.join(dst, HOSTILE_CLASSES[cls])
        os.makedirs(out, exist_ok=True)
        for i, name in enumerate(sorted(os.listdir(os.path.join(src, cls)))):
            target = files[i] if i < len(files) and cls == "circle" else name
            shutil.copy(os.path.join(src, cls, name), os.path.join(out, target))


class HostileNames(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.data = os.path.join(TMP, "photos")
        for split in ("train", "val"):
            rename_folder(os.path.join(TOY, split), os.path.join(cls.data, split))
        rename_folder(os.path.join(TOY, "eval36"), os.path.join(cls.data, "test"), HOSTILE_FILES)
        cls.runs, cls.evals = [], []
        for name, epochs in (("short", 1), ("long", 4)):
            cfg = {"model": BASE, "data": {"train": os.path.join(cls.data, "train"), "val": os.path.join(cls.data, "val")},
                   "epochs": epochs, "batch_size": 8, "precision": "fp32", "optim": {"lr": 0.005}, "threads": 2,
                   "output_dir": os.path.join(TMP, "runs", name)}
            path = os.path.join(TMP, name + ".json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(cfg, f)
            code, _, err = run("train", "--config", path)
            assert code == 0, err
            eval_dir = os.path.join(TMP, "eval", name)
            code, out, err = run("eval", "--model", BASE, "--adapter", os.path.join(cfg["output_dir"], "best"),
                                 "--data", os.path.join(cls.data, "test"), "--output", eval_dir, "--report")
            assert code == 0, err
            assert "report.html" in out, out
            cls.runs.append(cfg["output_dir"])
            cls.evals.append(eval_dir)

    def test_two_runs_side_by_side_with_names_shown_as_text(self):
        page = os.path.join(TMP, "compare.html")
        code, out, err = run("report", *self.runs, "--eval", self.evals[0], "--eval", self.evals[1], "--output", page)
        self.assertEqual(code, 0, err)
        self.assertIn("report: " + page, out)
        with browser.Browser() as b:
            _, data = check_report(self, b, page, os.path.join(ARTIFACTS, "report_hostile_names.png"))
            self.assertIsNone(b.js("window.pwned"), "a name ran as script")
            text = b.js("document.body.innerText")
            for name in HOSTILE_CLASSES.values():
                self.assertIn(name, text)
            # The renamed photos are in their class's row of the confusion matrix, wherever they were predicted.
            classes = data["evals"][0]["classes"]
            t = classes.index(HOSTILE_CLASSES["circle"])
            shown = set()
            for p in range(len(classes)):
                b.click(f"#confusion-0 td.cell[data-true='{t}'][data-pred='{p}']")
                shown |= set(b.js("[...document.querySelectorAll('#cell-photos-0 .tile .name')].map(e => e.textContent)"))
            for name in HOSTILE_FILES:
                self.assertIn(os.path.join(classes[t], name), shown)
            self.assertTrue(any("</script>" in name for name in shown))
            self.assertIsNone(b.js("window.pwned"))
            # Comparison: the counts of photos one evaluation gets right and the other wrong, from predictions.csv.
            a, c = predictions(self.evals[0]), predictions(self.evals[1])
            right_b = {r["path"]: r["true"] == r["predicted"] for r in c}
            a_only = sum(r["true"] == r["predicted"] and not right_b[r["path"]] for r in a)
            b_only = sum(r["true"] != r["predicted"] and right_b[r["path"]] for r in a)
            self.assertEqual(b.js("document.querySelector('[data-compare=a-only]').textContent"), str(a_only))
            self.assertEqual(b.js("document.querySelector('[data-compare=b-only]').textContent"), str(b_only))
            self.assertEqual(len(b.js("[...document.querySelectorAll('#a-only .tile')]")), a_only)
            # Each photo counts once in the footer, however many evaluations scored it.
            self.assertIn(f"{len(data['thumbs'])} of {len({r['path'] for r in a + c})} evaluated photos embedded",
                          b.js("document.querySelector('footer').textContent"))
            # Curves of both runs: one line per run in the loss chart.
            self.assertEqual(b.js("document.querySelectorAll('#training svg')[0].querySelectorAll('polyline').length"), 2)
            # Self-contained: the page fetched nothing (thumbnails are data: URIs).
            self.assertEqual(b.js("performance.getEntriesByType('resource').length"), 0)

    def test_eval_report_is_the_evaluation_part(self):
        with browser.Browser() as b:
            check_report(self, b, os.path.join(self.evals[1], "report.html"), os.path.join(ARTIFACTS, "eval_report.png"))
            self.assertIsNone(b.js("document.getElementById('training')"))

    def test_damaged_evaluation_folders_are_one_line_errors(self):
        def truncate(d):
            with open(os.path.join(d, "predictions.csv"), "r+b") as f:
                f.truncate(60)

        def unknown_class(d):
            with open(os.path.join(d, "predictions.csv"), "a", encoding="utf-8") as f:
                f.write("x.png,nope,nope,0.5\n")

        def not_json(d):
            with open(os.path.join(d, "metrics.json"), "w") as f:
                f.write("{")

        def bad_matrix(d):
            with open(os.path.join(d, "metrics.json"), encoding="utf-8") as f:
                m = json.load(f)
            m["confusion_matrix"] = [[1]]
            with open(os.path.join(d, "metrics.json"), "w", encoding="utf-8") as f:
                json.dump(m, f)

        for damage in (truncate, unknown_class, not_json, bad_matrix):
            with self.subTest(damage.__name__):
                d = os.path.join(TMP, "damaged", damage.__name__)
                shutil.copytree(self.evals[0], d)
                damage(d)
                page = d + ".html"
                code, _, err = run("report", d, "--output", page)
                self.assertEqual(code, 3, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertFalse(os.path.exists(page))

    def test_five_thousand_photos_stay_small(self):
        big = os.path.join(TMP, "big")
        src = os.path.join(self.data, "test")
        classes = sorted(os.listdir(src))
        for k in range(5000):
            cls = classes[k % len(classes)]
            files = sorted(os.listdir(os.path.join(src, cls)))
            os.makedirs(os.path.join(big, cls), exist_ok=True)
            os.link(os.path.join(src, cls, files[k % len(files)]), os.path.join(big, cls, f"{k:05d}.png"))
        eval_dir = os.path.join(TMP, "eval", "big")
        code, _, err = run("eval", "--model", BASE, "--adapter", os.path.join(self.runs[0], "best"), "--data", big,
                           "--output", eval_dir, "--report", "--threads", "2")
        self.assertEqual(code, 0, err)
        page = os.path.join(eval_dir, "report.html")
        size = os.path.getsize(page)
        self.assertLess(size, 20 * 2**20)
        with browser.Browser() as b:
            seconds, data = check_report(self, b, page, os.path.join(ARTIFACTS, "report_5000.png"))
            self.assertEqual(len(data["thumbs"]), 500)
            self.assertIn("500 of 5000 evaluated photos embedded", b.js("document.querySelector('footer').textContent"))
        print(f"5000 photos: page {size / 2**20:.1f} MB, loaded in {seconds:.2f} s", file=sys.stderr)


class DemoReport(unittest.TestCase):
    def test_the_demo_report_in_a_browser(self):
        page = os.path.join(DEMO, "report.html")
        self.assertTrue(os.path.exists(page), f"{page}: the demo (demo_reduced) writes it")
        with browser.Browser() as b:
            _, data = check_report(self, b, page, os.path.join(ARTIFACTS, "report_demo.png"))
            self.assertEqual(len(data["evals"]), 2)
            self.assertIsNotNone(data["comparison"])


if __name__ == "__main__":
    result = unittest.main(argv=[sys.argv[0], "-v", *sys.argv[5:]], exit=False).result
    shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(0 if result.wasSuccessful() else 1)
