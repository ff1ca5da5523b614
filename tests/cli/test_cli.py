"""The loratune command line end to end, on the test fixtures: messages and exit codes of bad input, Ctrl-C and
resume, eval metrics against a Python computation from the merged file's logits, adapter switching in predict.

usage: test_cli.py LORATUNE_BINARY FIXTURE_DIR [TestClass ...]
"""
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
import onnx_runtime  # noqa: E402
import safetensors_lite  # noqa: E402

BIN, FIX = sys.argv[1], sys.argv[2]
IMAGES = os.path.join(FIX, "images")
BASE = os.path.join(FIX, "models", "hf_script.pt")
OTHER_BASE = os.path.join(FIX, "models", "timm_script.pt")
TMP = tempfile.mkdtemp(prefix="loratune_cli_")


def run(*args, timeout=300):
    p = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def write_config(name, **extra):
    cfg = {"model": BASE, "data": {"train": os.path.join(IMAGES, "toy", "train"), "val": os.path.join(IMAGES, "toy", "val"),
                                   "workers": 2},
           "epochs": 3, "batch_size": 8, "precision": "fp32", "optim": {"lr": 0.005},
           # Pinned: `threads: auto` follows the machine's load, and another count rounds differently, so two runs
           # compared bit for bit could differ on a busy machine.
           "threads": 2, "output_dir": os.path.join(TMP, name)}
    cfg.update(extra)
    path = os.path.join(TMP, name + ".json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path, cfg["output_dir"]


_trained = {}


def trained_run():
    """One small training run shared by the tests that need an adapter."""
    if "dir" not in _trained:
        cfg, out = write_config("shared")
        code, _, err = run("train", "--config", cfg)
        assert code == 0, err
        _trained["dir"] = out
    return _trained["dir"]


class Help(unittest.TestCase):
    def test_every_command_has_help_with_examples(self):
        code, out, _ = run("--help")
        self.assertEqual(code, 0)
        self.assertIn("Exit codes: 0 ok, 2 bad command line, 3 bad input", out)
        for cmd in ("train", "eval", "predict", "merge", "info", "report", "plan"):
            code, out, _ = run(cmd, "--help")
            self.assertEqual(code, 0, cmd)
            self.assertIn("Examples:", out, cmd)

    def test_bash_completion_from_the_command_table(self):
        code, script, err = run("--completion", "bash")
        self.assertEqual(code, 0, err)

        def complete(*words):
            """What bash completes for `loratune <words>` (the last word being typed)."""
            words = ("loratune",) + words
            shell = (script + "\nCOMP_WORDS=(" + " ".join(f"'{w}'" for w in words) + f"); COMP_CWORD={len(words) - 1}\n"
                     "_loratune; printf '%s\\n' \"${COMPREPLY[@]}\"")
            return subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True).stdout.split()

        self.assertIn("predict", complete("pr"))
        self.assertEqual(complete("predict", "--fo"), ["--format"])
        self.assertEqual(sorted(complete("predict", "--format", "")), ["csv", "json", "table"])
        self.assertEqual(complete("eval", "--frozen-dtype", "n"), ["nf4"])
        self.assertIn("--help-config", complete("train", "--he"))

    def test_config_reference(self):
        code, out, _ = run("train", "--help-config")
        self.assertEqual(code, 0)
        self.assertIn("lora.rank", out)
        self.assertIn("gradient_checkpointing", out)

    def test_usage_errors_exit_2(self):
        code, _, err = run("train", "--bogus")
        self.assertEqual(code, 2)
        self.assertTrue(err.startswith("error: "))
        self.assertEqual(run("frobnicate")[0], 2)
        self.assertEqual(run("eval", "--model", BASE)[0], 2)  # --data missing


class ExpectsInputError:
    def assert_input_error(self, args, message):
        code, _, err = run(*args)
        self.assertEqual(code, 3, err)
        errors = [line for line in err.splitlines() if line.startswith("error")]
        self.assertEqual(len(errors), 1, "one clear error line: " + err)
        self.assertEqual(errors[0], err.strip().splitlines()[-1], "the error comes last")
        self.assertIn(message, errors[0])


class BadInput(unittest.TestCase, ExpectsInputError):
    def test_missing_files(self):
        self.assert_input_error(("train", "--config", os.path.join(TMP, "nope.json")), "nope.json: no such file")
        self.assert_input_error(("eval", "--model", os.path.join(TMP, "nope.pt"), "--data", IMAGES),
                                "model file " + os.path.join(TMP, "nope.pt") + " does not exist")
        self.assert_input_error(("info", os.path.join(TMP, "nothing")), "does not exist")
        self.assert_input_error(("report", TMP), "is neither a training run folder (metrics.jsonl) nor an evaluation folder")
        self.assert_input_error(("predict", "--model", BASE, "--adapter", trained_run() + "/best", os.path.join(TMP, "x.png")),
                                "input " + os.path.join(TMP, "x.png") + " does not exist")

    def test_bad_configs_and_folders(self):
        cfg, _ = write_config("typo", lora={"rnak": 4})
        self.assert_input_error(("train", "--config", cfg), 'unknown key "lora.rnak" (did you mean "lora.rank"?)')
        cfg, _ = write_config("single", data={"train": os.path.join(IMAGES, "single_class")})
        self.assert_input_error(("train", "--config", cfg), "a classifier needs at least two")
        cfg, _ = write_config("empty", data={"train": os.path.join(IMAGES, "empty_class")})
        self.assert_input_error(("train", "--config", cfg), "class folder broken in")
        cfg, _ = write_config("noresume")
        self.assert_input_error(("train", "--config", cfg, "--resume"), "nothing to resume")
        self.assert_input_error(("train", "--config", cfg, "--set", "lora.rank=abc"), "lora.rank must be an integer")

    def test_unknown_classes_and_wrong_base(self):
        run_dir = trained_run()
        self.assert_input_error(("eval", "--model", BASE, "--adapter", run_dir + "/best", "--data", os.path.join(IMAGES, "edge")),
                                "has class folders the model does not know: alpha, beta")
        self.assert_input_error(("eval", "--model", OTHER_BASE, "--adapter", run_dir + "/best", "--data",
                                 os.path.join(IMAGES, "toy", "val")), "was trained on a different base model")
        out = os.path.join(TMP, "refused.pt")
        self.assert_input_error(("merge", "--base", OTHER_BASE, "--adapter", run_dir + "/best", "--output", out),
                                "was trained on a different base model")
        self.assertFalse(os.path.exists(out), "no half-written output")
        self.assert_input_error(("merge", "--base", BASE, "--adapter", run_dir + "/best", "--output", out, "--strength", "2"),
                                "merge strength must be between 0 and 1")
        self.assert_input_error(("eval", "--model", BASE, "--data", os.path.join(IMAGES, "toy", "val")), "pass --adapter")


class Presets(unittest.TestCase):
    def test_every_shipped_config_parses(self):
        configs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
        names = sorted(n for n in os.listdir(configs) if n.endswith(".json"))
        self.assertGreaterEqual(len(names), 7)
        for name in names:
            code, out, err = run("info", OTHER_BASE, "--config", os.path.join(configs, name))
            self.assertEqual(code, 0, name + ": " + err)
            self.assertIn("this config would adapt", out)


class AdapterSettingsRoundTrip(unittest.TestCase):
    """Adapter files carry the run's LoRA settings: eval right after training gives the trainer's last validation
    loss on the same images, and adapter_config.json gives PEFT the scale each module was trained with."""
    CASES = {  # name: (base, lora settings)
        "rank_alpha": ("hf_script", {"rank": 4, "alpha": 32.0, "dropout": 0.0}),
        "rslora_fused": ("timm_script", {"rank": 16, "alpha": 16.0, "rslora": True, "dropout": 0.0}),
        "dropout": ("hf_script", {"rank": 8, "alpha": 16.0, "dropout": 0.3}),
        "patterns": ("hf_script", {"rank": 4, "alpha": 8.0, "rank_pattern": {"value": 2}, "alpha_pattern": {"query": 2.0}}),
        "mha_slices": ("torchvision_script", {"rank": 2, "alpha": 6.0, "targets": ["self_attention:q,v"], "dropout": 0.0}),
        "dora_fused": ("timm_script", {"rank": 4, "alpha": 8.0, "variant": "dora", "dropout": 0.0}),
        "all_linear_last_block": ("hf_script", {"rank": 2, "alpha": 4.0, "targets": ["all-linear"], "last_blocks": 1}),
        # Starts taken from the weight: the file is PEFT's conversion, rank 2r on the unmodified base, same scale.
        "pissa_rslora_fused": ("timm_script", {"rank": 4, "alpha": 8.0, "rslora": True, "init": "pissa", "dropout": 0.0,
                                               "rank_pattern": {"qkv": 2}}),
        "olora_dora": ("hf_script", {"rank": 4, "alpha": 8.0, "variant": "dora", "init": "olora", "dropout": 0.0}),
    }
    TAKES_FROM_WEIGHT = ("pissa", "olora")

    @staticmethod
    def expected_scale(lora, module):
        def pick(patterns, default):
            return next((v for k, v in patterns.items() if module == k or module.endswith("." + k)), default)
        rank = pick(lora.get("rank_pattern", {}), lora["rank"])
        alpha = pick(lora.get("alpha_pattern", {}), lora["alpha"])
        scale = alpha / (rank ** 0.5 if lora.get("rslora") else rank)
        return rank * (2 if lora.get("init") in AdapterSettingsRoundTrip.TAKES_FROM_WEIGHT else 1), scale

    def test_eval_reproduces_training_and_peft_config_scales(self):
        for name, (base, lora) in self.CASES.items():
            with self.subTest(case=name):
                cfg, out = write_config("settings_" + name, model=os.path.join(FIX, "models", base + ".pt"), lora=lora,
                                        epochs=1)
                code, _, err = run("train", "--config", cfg)
                self.assertEqual(code, 0, err)
                with open(os.path.join(out, "summary.json")) as f:
                    summary = json.load(f)
                eval_dir = os.path.join(TMP, "settings_eval_" + name)
                code, _, err = run("eval", "--model", os.path.join(FIX, "models", base + ".pt"), "--adapter",
                                   os.path.join(out, "adapter"), "--data", os.path.join(IMAGES, "toy", "val"), "--output", eval_dir)
                self.assertEqual(code, 0, err)
                with open(os.path.join(eval_dir, "metrics.json")) as f:
                    self.assertAlmostEqual(json.load(f)["loss"], summary["final_val_loss"], delta=1e-6)

                with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
                    peft = json.load(f)
                doubled = lora.get("init") in self.TAKES_FROM_WEIGHT
                self.assertEqual((peft["r"], peft["lora_alpha"], peft["lora_dropout"], peft["use_rslora"], peft["use_dora"],
                                  peft["init_lora_weights"]),
                                 (lora["rank"] * (2 if doubled else 1),
                                  lora["alpha"] * ((2 ** 0.5 if lora.get("rslora") else 2) if doubled else 1),
                                  lora.get("dropout", 0.1), lora.get("rslora", False), lora.get("variant") == "dora", True))
                _, meta = safetensors_lite.load(os.path.join(out, "adapter", "adapter_model.safetensors"))
                modules = {t["module"] for t in json.loads(meta["loratune"])["targets"]}
                self.assertTrue(modules)
                for module in modules:
                    want_rank, want_scale = self.expected_scale(lora, module)
                    rank = peft["rank_pattern"].get(module, peft["r"])
                    alpha = peft["alpha_pattern"].get(module, peft["lora_alpha"])
                    scale = alpha / (rank ** 0.5 if peft["use_rslora"] else rank)
                    self.assertEqual(rank, want_rank, module)
                    self.assertAlmostEqual(scale, want_scale, places=12, msg=module)
                code, info, _ = run("info", os.path.join(out, "adapter"))
                self.assertEqual(code, 0)
                self.assertIn(f"rank {peft['r']}, alpha {peft['lora_alpha']:g}", info)
                if doubled:
                    self.assertIn(f"started with {lora['init']}, rank", info)
                self.assertIn(f"dropout {lora.get('dropout', 0.1):g}", info)


class PaperCuts(unittest.TestCase):
    def test_dora_says_once_that_dropout_does_not_reach_it_and_records_none(self):
        cfg, out = write_config("dora_dropout", epochs=1, max_steps=2, lora={"variant": "dora", "dropout": 0.1})
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertEqual(err.count("lora.dropout 0.1 does not apply"), 1, err)
        self.assertIn("the run trains without dropout", err)
        code, info, err = run("info", os.path.join(out, "adapter"))
        self.assertEqual(code, 0, err)
        self.assertIn("dropout 0,", info)
        with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
            self.assertEqual(json.load(f)["lora_dropout"], 0.0)

    def test_a_merged_file_as_base_is_called_merged(self):
        run_dir = trained_run()
        merged = os.path.join(TMP, "merged_as_base.pt")
        self.assertEqual(run("merge", "--base", BASE, "--adapter", run_dir + "/best", "--output", merged)[0], 0)
        code, _, err = run("merge", "--base", merged, "--adapter", run_dir + "/best", "--output", merged + ".2")
        self.assertEqual(code, 3, err)
        self.assertIn(merged + " is already merged", err)
        backbone = os.path.join(TMP, "merged_backbone.pt")
        self.assertEqual(run("merge", "--base", BASE, "--adapter", run_dir + "/best", "--output", backbone,
                             "--features-only")[0], 0)
        code, _, err = run("eval", "--model", backbone, "--adapter", run_dir + "/best", "--data",
                           os.path.join(IMAGES, "toy", "val"), "--output", os.path.join(TMP, "merged_eval"))
        self.assertEqual(code, 3, err)
        self.assertIn(backbone + " is already merged", err)

    def test_home_folder_in_set_values_and_config_paths(self):
        home = tempfile.mkdtemp(prefix="home_", dir=TMP)
        os.symlink(os.path.abspath(os.path.join(IMAGES, "toy")), os.path.join(home, "photos"))
        cfg, out = write_config("tilde", epochs=1, max_steps=1)
        env = dict(os.environ, HOME=home)
        p = subprocess.run([BIN, "train", "--config", cfg, "--set", "data.train=~/photos/train", "--set",
                            "data.val=~/photos/val", "--set", "output_dir=~/run"], capture_output=True, text=True, env=env,
                           timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertTrue(os.path.exists(os.path.join(home, "run", "adapter", "adapter_model.safetensors")))

    def test_a_typo_in_set_is_the_flag_not_the_file(self):
        cfg, _ = write_config("set_typo")
        code, _, err = run("train", "--config", cfg, "--set", "lora.rnak=4")
        self.assertEqual(code, 3)
        self.assertIn('--set lora.rnak=4: unknown key "lora.rnak" (did you mean "lora.rank"?)', err)
        self.assertNotIn(cfg, err)

    def test_info_on_a_text_encoder(self):
        code, out, err = run("info", os.path.join(FIX, "models", "mobileclip_text.pt"))
        self.assertEqual(code, 0, err)
        self.assertIn("tokens -> text embeddings", out)
        self.assertIn("tokenizer      clip_bpe", out)
        for image_only in ("preprocessing", "LoRA", "would adapt"):
            self.assertNotIn(image_only, out)

    def test_small_folders_train_their_last_partial_batch(self):
        # 72 training images, batch 16, 2 micro-batches a step: 5 batches (the last of 8 images), 3 steps an epoch.
        cfg, out = write_config("partial", epochs=2, batch_size=16, grad_accum_steps=2)
        code, stdout, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        self.assertEqual((summary["steps"], summary["images_seen"]), (6, 144))
        rate = [line for line in stdout.splitlines() if line.startswith("training done")][0]
        self.assertNotIn(" 0 train images/s", rate)


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def png_header_only(path, width, height):
    """A PNG whose header claims width x height (the pixel data is missing: decoding it would fail anyway)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


class Hardening(unittest.TestCase, ExpectsInputError):
    """Hostile or unlucky input: one clear error line with exit 3 naming the file, or a skip that is counted and
    listed; no data lost."""

    def test_config_paths_that_are_folders_or_symlink_loops(self):
        self.assert_input_error(("train", "--config", TMP), TMP + " is a folder")
        loop = os.path.join(TMP, "loop.json")
        os.symlink(loop, loop)
        self.assert_input_error(("train", "--config", loop), "loop.json")
        self.assert_input_error(("eval", "--model", loop, "--data", IMAGES), "loop.json")

    def test_degenerate_crop_ratios_train(self):
        cfg, _ = write_config("ratios", epochs=1, max_steps=2, data={
            "train": os.path.join(IMAGES, "toy", "train"), "val": os.path.join(IMAGES, "toy", "val"),
            "augment": {"ratio": [1e-300, 1e-300], "scale": [1e-300, 1e-300]}})
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)

    def test_names_that_are_not_utf8(self):
        root = os.path.join(TMP, "latin1").encode()
        for cls in (b"a", b"b"):
            os.makedirs(os.path.join(root, cls))
            for i in range(4):
                shutil.copy(os.path.join(IMAGES, "toy", "train", "circle", "000.png"), os.path.join(root, cls, b"%d.png" % i))
        shutil.copy(os.path.join(IMAGES, "toy", "train", "circle", "000.png"), os.path.join(root, b"a", b"caf\xe9.png"))
        cfg, out = write_config("latin1_files", epochs=1, data={"train": root.decode(), "val_fraction": 0.25})
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertIn("caf\\xE9.png: file name is not valid UTF-8", err)
        with open(os.path.join(out, "summary.json")) as f:
            skipped = json.load(f)["skipped_files"]
        self.assertEqual([s["path"].endswith("caf\\xE9.png") for s in skipped], [True])
        os.makedirs(os.path.join(root, b"\xb0\xed\xbe\xe7\xc0\xcc"))  # "고양이" in CP949
        cfg, _ = write_config("latin1_class", epochs=1, data={"train": root.decode()})
        self.assert_input_error(("train", "--config", cfg), "class folder name \"\\xB0\\xED\\xBE\\xE7\\xC0\\xCC\"")

    def test_huge_images_are_skipped_before_decoding(self):
        root = os.path.join(TMP, "huge_photos")
        shutil.copytree(os.path.join(IMAGES, "toy", "train"), root)
        png_header_only(os.path.join(root, "circle", "huge.png"), 20000, 20000)
        cfg, out = write_config("huge", epochs=1, max_steps=1, data={"train": root, "val_fraction": 0.1})
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertIn("20000x20000 pixels, over data.max_image_pixels (100000000)", err)

    def test_truncated_tensor_record_in_a_bundle(self):
        import zipfile
        damaged = os.path.join(TMP, "short_record.pt")
        with zipfile.ZipFile(BASE) as zin, zipfile.ZipFile(damaged, "w") as zout:
            records = [i for i in zin.infolist() if "/data/" in i.filename and i.file_size > 64]
            for info in zin.infolist():
                data = zin.read(info.filename)
                zout.writestr(info, data[:len(data) // 2] if info is records[0] else data)
        self.assert_input_error(("info", damaged), "short_record.pt: a tensor needs 128 bytes")

    def test_no_command_writes_over_or_into_its_inputs(self):
        run_dir = trained_run()
        scratch = os.path.join(TMP, "inputs_kept")
        shutil.copytree(os.path.join(IMAGES, "toy", "val"), os.path.join(scratch, "photos"))
        shutil.copytree(run_dir + "/best", os.path.join(scratch, "adapter"))
        shutil.copy(BASE, os.path.join(scratch, "base.pt"))
        photo = os.path.join(scratch, "photos", sorted(os.listdir(os.path.join(scratch, "photos")))[0])
        photo = os.path.join(photo, sorted(os.listdir(photo))[0])
        base, adapter, photos = (os.path.join(scratch, n) for n in ("base.pt", "adapter", "photos"))

        def snapshot():
            out = {}
            for root, _, files in os.walk(scratch):
                for f in files:
                    with open(os.path.join(root, f), "rb") as fh:
                        out[os.path.join(root, f)] = fh.read()
            return out
        before = snapshot()
        predict = ("predict", "--model", base, "--adapter", adapter, photos, "-o")
        self.assert_input_error((*predict, base), "-o " + base + " is the input " + base)
        self.assert_input_error((*predict, adapter + "/adapter_model.safetensors"), "is inside the input folder " + adapter)
        self.assert_input_error((*predict, photo), "is inside the input folder " + photos)
        self.assert_input_error(("predict", "--model", base, "--adapter", adapter, photo, "-o", photo),
                                "-o " + photo + " is the input " + photo)
        self.assert_input_error(("merge", "--base", base, "--adapter", adapter, "--output", photo),
                                "--output " + photo + " exists and is not a TorchScript file")
        self.assert_input_error(("predict", "--model", base, "--adapter", adapter, os.path.join(IMAGES, "toy", "val"),
                                 "-o", photo), "-o " + photo + " exists and is not a text file")
        self.assert_input_error(("predict", "--model", base, "--adapter", adapter, os.path.join(IMAGES, "toy", "val"),
                                 "-o", base), "-o " + base + " is the input")
        self.assert_input_error((*predict, BASE), "-o " + BASE + " exists and is not a text file")
        eval_args = ("eval", "--model", base, "--adapter", adapter, "--data", photos, "--output")
        self.assert_input_error((*eval_args, photos), "--output " + photos + " is the input " + photos)
        self.assert_input_error((*eval_args, photos + "/report"), "is inside the input folder " + photos)
        self.assert_input_error((*eval_args, base), "is the input " + base)
        cfg, _ = write_config("into_photos", data={"train": photos}, output_dir=photos + "/run")
        self.assert_input_error(("train", "--config", cfg), "output_dir " + photos + "/run is inside the input folder")
        self.assertEqual(snapshot(), before, "every input as it was, nothing added")
        code, _, err = run(*predict, os.path.join(scratch, "predictions.txt"))
        self.assertEqual(code, 0, err)

    def test_adapters_that_overflow_are_refused_not_scored(self):
        run_dir = trained_run()
        val = os.path.join(IMAGES, "toy", "val")

        def variant(name, change):
            folder = os.path.join(TMP, "overflow_" + name)
            shutil.copytree(run_dir + "/best", folder)
            path = os.path.join(folder, "adapter_model.safetensors")
            tensors, meta = safetensors_lite.load(path)
            tensors, meta = change(tensors, meta)
            del meta["tensors_hash"]  # made as a hostile user would: the checksum is optional, the file is complete
            os.remove(os.path.join(folder, "adapter_config.json"))
            safetensors_lite.save(tensors, path, meta)
            return folder

        def scaled(tensors, meta):  # finite values (up to 3e38) whose products overflow float32
            return {k: v / v.abs().max().clamp(min=1e-30) * 3e38 if "lora_B" in k else v for k, v in tensors.items()}, meta

        def alpha(tensors, meta):
            record = json.loads(meta["loratune"])
            record["lora"]["alpha"] = 1e308
            for target in record["targets"]:
                target["alpha"] = 1e308
            return tensors, {**meta, "loratune": json.dumps(record)}
        for name, change in (("values", scaled), ("alpha", alpha)):
            with self.subTest(name):
                folder = variant(name, change)
                out = os.path.join(TMP, "overflow_eval_" + name)
                code, stdout, err = run("eval", "--model", BASE, "--adapter", folder, "--data", val, "--output", out)
                self.assertEqual(code, 4, err)
                self.assertIn(folder + " gives inf/NaN outputs for", err.strip().splitlines()[-1])
                self.assertNotIn("loss", stdout)
                self.assertFalse(os.path.exists(os.path.join(out, "metrics.json")))
                code, stdout, err = run("predict", "--model", BASE, "--adapter", folder, val)
                self.assertEqual(code, 4, err)
                self.assertIn("gives inf/NaN outputs", err)
                self.assertEqual(stdout, "")

    def test_merge_never_overwrites_its_inputs_or_a_good_output(self):
        run_dir = trained_run()
        base_copy = os.path.join(TMP, "base_copy.pt")
        shutil.copy(BASE, base_copy)
        before = open(base_copy, "rb").read()
        self.assert_input_error(("merge", "--base", base_copy, "--adapter", run_dir + "/best", "--output", base_copy),
                                "--output " + base_copy + " is the input " + base_copy)
        self.assertEqual(open(base_copy, "rb").read(), before)
        self.assert_input_error(("merge", "--base", BASE, "--adapter", run_dir + "/best", "--output",
                                 run_dir + "/best/adapter_model.safetensors"), "is inside the input folder " + run_dir + "/best")
        # An adapter so large that the merged file cannot match (fp32 rounding of huge logits): the check fails and
        # the good output from before stays.
        good = os.path.join(TMP, "good_merged.pt")
        self.assertEqual(run("merge", "--base", BASE, "--adapter", run_dir + "/best", "--output", good)[0], 0)
        good_bytes = open(good, "rb").read()
        huge = os.path.join(TMP, "huge_adapter")
        shutil.copytree(run_dir + "/best", huge)
        tensors, meta = safetensors_lite.load(os.path.join(huge, "adapter_model.safetensors"))
        tensors = {k: v * 1e5 if "lora_B" in k or "classifier" in k else v for k, v in tensors.items()}
        del meta["tensors_hash"]  # as another tool that rewrites the tensors would
        safetensors_lite.save(tensors, os.path.join(huge, "adapter_model.safetensors"), meta)
        code, _, err = run("merge", "--base", BASE, "--adapter", huge, "--output", good)
        self.assertEqual(code, 4, err)
        self.assertIn("was not written", err)
        self.assertEqual(open(good, "rb").read(), good_bytes)
        self.assertEqual([n for n in os.listdir(TMP) if n.startswith(".good_merged")], [], "no temporary left")

    def test_leftovers_of_a_killed_run_are_recovered(self):
        cfg, out = write_config("leftovers", epochs=1)
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        expected = open(os.path.join(out, "best", "adapter_model.safetensors"), "rb").read()
        pid = dead_pid()
        # Killed between the two renames of a directory swap: the only copy of best/ is hidden; and a stray temporary.
        os.rename(os.path.join(out, "best"), os.path.join(out, ".best.old-%d" % pid))
        os.makedirs(os.path.join(out, ".adapter.tmp-%d" % pid))
        # The run had finished: resuming it is refused, after its folder is put back in order.
        code, _, err = run("train", "--config", cfg, "--resume")
        self.assertEqual(code, 3, err)
        self.assertIn("has finished (step", err)
        self.assertEqual(open(os.path.join(out, "best", "adapter_model.safetensors"), "rb").read(), expected)
        self.assertEqual([n for n in os.listdir(out) if n.startswith(".")], [".lock"])

    def test_report_on_a_diverged_run(self):
        run_dir = os.path.join(TMP, "diverged")
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.write('{"type": "train", "step": 1, "loss": 2.3, "lr": 0.001}\n')
            f.write('{"type": "train", "step": 2, "loss": null, "lr": 0.001, "grad_norm": null}\n')
            f.write('{"type": "val", "step": 2, "epoch": 1, "val_loss": null, "val_top1": 0.25}\n')
        code, out, err = run("report", run_dir)
        self.assertEqual(code, 0, err)
        self.assertIn("train loss: first 2.3000, last 2.3000", out)

    def test_recipe_settings_that_cannot_work(self):
        cfg, _ = write_config("recipes")
        self.assert_input_error(("train", "--config", cfg, "--set", "lora.variant=dorra"), "lora.variant must be lora, dora, lora_fa or ssf")
        self.assert_input_error(("train", "--config", cfg, "--set", "optim.lora_plus_ratio=-1"),
                                "optim.lora_plus_ratio must be positive")
        self.assert_input_error(("train", "--config", cfg, "--set", "lora.last_blocks=9"),
                                "lora.last_blocks 9 is more than the 2 blocks")
        self.assert_input_error(("train", "--config", cfg, "--set", "early_stopping.patience=0"),
                                "early_stopping.patience must be at least 1")

    def test_too_many_workers_are_capped(self):
        cfg, _ = write_config("workers", epochs=1, max_steps=1, data={
            "train": os.path.join(IMAGES, "toy", "train"), "val": os.path.join(IMAGES, "toy", "val"), "workers": 100000})
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertIn("100000 decoding workers asked for; using", err)


class MemoryPlan(unittest.TestCase, ExpectsInputError):
    def test_bad_memory_budget_and_config_are_one_line_errors(self):
        cfg, _ = write_config("plan_bad")
        self.assert_input_error(("plan", "--config", cfg, "--memory", "12 potatoes"), 'memory "12 potatoes": give a size')
        self.assert_input_error(("plan", "--table", "--memory", "-3GB"), "give a size such as 12GB")
        self.assert_input_error(("plan", "--config", cfg, "--memory", "40KB"), "give a size")
        self.assert_input_error(("plan", "--config", cfg, "--memory", "0.02MB"), "below what the frozen weights alone take")
        self.assert_input_error(("train", "--config", cfg, "--fit-memory", "twelve"), 'memory "twelve"')
        typo, _ = write_config("plan_typo", lora={"rnak": 4})
        self.assert_input_error(("plan", "--config", typo), 'unknown key "lora.rnak"')

    def test_sizes_beyond_any_run_are_refused(self):
        cfg, _ = write_config("plan_bounds")
        for classes in ("10000000", "-5", "0"):
            code, _, err = run("plan", "--config", cfg, "--classes", classes)
            self.assertEqual(code, 2, err)
            self.assertIn("--classes", err)
        self.assert_input_error(("plan", "--config", cfg, "--set", f"batch_size={2 ** 62}"),
                                "batch_size must be in [1, 65536]")
        self.assert_input_error(("plan", "--config", cfg, "--set", f"grad_accum_steps={2 ** 62}"),
                                "grad_accum_steps must be in [1, 65536]")

    def test_fit_keeps_the_effective_batch_and_train_uses_it(self):
        cfg, out = write_config("plan_fit", epochs=1, batch_size=16)
        code, text, err = run("plan", "--config", cfg, "--json")
        self.assertEqual(code, 0, err)
        plan = json.loads(text)
        self.assertEqual(plan["total"], sum(item["bytes"] for item in plan["items"]))
        # A budget between two micro-batches' predictions: the fit keeps the effective batch of 16.
        code, text, err = run("plan", "--config", cfg, "--memory", "1.5MB")
        self.assertEqual(code, 0, err)
        self.assertIn("--set batch_size=", text)
        sets = dict(s.split("=", 1) for s in text.strip().splitlines()[-1].replace("--set ", "").split())
        self.assertEqual(int(sets["batch_size"]) * int(sets["grad_accum_steps"]), 16)
        self.assertEqual(sets["grad_accum_steps"], "2")  # 16 images do not fit in one micro-batch
        code, _, err = run("train", "--config", cfg, "--fit-memory", "1.5MB")
        self.assertEqual(code, 0, err)
        self.assertIn("fits in 1.50 MB", err)
        with open(os.path.join(out, "config.json")) as f:
            used = json.load(f)
        self.assertEqual((used["batch_size"], used["grad_accum_steps"]), (8, 2))
        code, _, err = run("plan", "--config", cfg, "--memory", "0.2MB")
        self.assertEqual(code, 4)
        self.assertIn("nothing fits in 204.80 KB", err)
        self.assertIn("the smallest run needs", err)

    def test_resident_total_is_the_peak_rss_train_reaches(self):
        # On the CPU, plan's resident total (the larger of training's and loading's) against the peak RSS of the
        # run itself; with nf4 the dense weights are read before they are quantised.
        for fmt in ("fp32", "nf4"):
            cfg, out = write_config("plan_rss_" + fmt, epochs=1, frozen_dtype=fmt, threads=2, lora={"dropout": 0.0})
            code, text, err = run("plan", "--config", cfg, "--json")
            self.assertEqual(code, 0, err)
            resident = json.loads(text)["resident"]
            self.assertEqual(resident["total"], max(resident["training"], resident["loading"]))
            self.assertGreater(resident["loading"], 0)
            code, _, err = run("train", "--config", cfg)
            self.assertEqual(code, 0, err)
            with open(os.path.join(out, "summary.json")) as f:
                rss = json.load(f)["peak_memory_bytes"]
            self.assertLess(abs(resident["total"] / rss - 1), 0.10, f"{fmt}: planned {resident}, measured {rss}")

    def test_table_of_standard_models(self):
        code, out, err = run("plan", "--table", "--memory", "12GB")
        self.assertEqual(code, 0, err)
        for name in ("ViT-Ti/16", "ViT-S/16", "ViT-B/16", "ViT-L/16", "ViT-H/14", "MobileCLIP-S0", "MobileCLIP-S2",
                     "MobileCLIP-B"):
            self.assertIn(name, out)
        code, out, _ = run("plan", "--table", "--memory", "12GB", "--json")
        rows = {r["name"]: r["settings"] for r in json.loads(out)}
        # More memory, larger batches; checkpointing fits more than keeping every activation.
        self.assertGreater(rows["ViT-B/16"]["lora_checkpoint"]["largest_batch"], rows["ViT-B/16"]["lora"]["largest_batch"])
        self.assertGreater(rows["ViT-B/16"]["lora"]["largest_batch"], rows["ViT-L/16"]["lora"]["largest_batch"])
        self.assertEqual(rows["ViT-H/14"]["full_checkpoint"]["largest_batch"], 0)  # 632M x 18 bytes > 12 GB
        # The largest encoders on small cards: quantised frozen weights fit what 16-bit ones cannot.
        small = {}
        for memory in ("4GB", "8GB"):
            code, out, _ = run("plan", "--table", "--memory", memory, "--json")
            small[memory] = {r["name"]: {k: v["largest_batch"] for k, v in r["settings"].items()} for r in json.loads(out)}
        self.assertEqual(small["4GB"]["ViT-bigG/14"]["lora_checkpoint"], 0)
        self.assertGreaterEqual(small["4GB"]["ViT-bigG/14"]["lora_checkpoint_nf4"], 32)
        self.assertGreater(small["4GB"]["ViT-bigG/14"]["lora_checkpoint_nf4"], small["4GB"]["ViT-bigG/14"]["lora_checkpoint_int8"])
        self.assertEqual(small["8GB"]["InternViT-6B"]["lora_checkpoint"], 0)
        self.assertGreater(small["8GB"]["InternViT-6B"]["lora_checkpoint_nf4"], 0)
        # Offload both: two blocks' weights and saved inputs on the GPU; a 6B encoder at batch 32 on an 8 GB card.
        self.assertGreaterEqual(small["8GB"]["InternViT-6B"]["lora_checkpoint_nf4_offload"], 32)
        self.assertGreater(small["4GB"]["InternViT-6B"]["lora_checkpoint_offload"], 0)
        self.assertGreater(small["8GB"]["InternViT-6B"]["lora_checkpoint_nf4_offload"],
                           small["8GB"]["InternViT-6B"]["lora_checkpoint_nf4"])
        self.assertIn("ViT-g/14", small["4GB"])


def eval_loss(test, name, *args):
    """The loss `loratune eval ARGS` reports on the toy validation photos (its output under TMP/<name>_eval)."""
    out = os.path.join(TMP, name + "_eval")
    code, _, err = run("eval", *args, "--data", os.path.join(IMAGES, "toy", "val"), "--output", out)
    test.assertEqual(code, 0, err)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["loss"]


def adapter_difference(dir_a, dir_b):
    """Largest |a - b| / max|a| over the tensors of two adapters (same keys)."""
    a = safetensors_lite.load(os.path.join(dir_a, "adapter_model.safetensors"))[0]
    b = safetensors_lite.load(os.path.join(dir_b, "adapter_model.safetensors"))[0]
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


def metric_lines(out, kind):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if json.loads(line)["type"] == kind]


def start_training(args, out, env=None):
    """`loratune train ARGS` in the background, returned once its first metrics line is written (or after 120 s)."""
    p = subprocess.Popen([BIN, "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.02)
    return p


def two_workers_equal_one_process(test, cfg, one):
    """Trains CFG in one process (into ONE) and in two workers (into ONE_two): their adapters agree to float32
    rounding."""
    code, _, err = run("train", "--config", cfg)
    test.assertEqual(code, 0, err)
    code, _, err = run("train", "--config", cfg, "--set", "output_dir=" + one + "_two", "--nproc", "2")
    test.assertEqual(code, 0, err)
    test.assertLess(adapter_difference(os.path.join(one, "adapter"), os.path.join(one + "_two", "adapter")), 1e-4)
    return err


def merged_file_scores_and_exports(test, adapter, merged, val, kept, seed, eval_loss_of):
    """`merge` of OTHER_BASE and ADAPTER into MERGED says what it KEPT inside the model; the file scores training's
    validation loss VAL, and its ONNX export gives its logits in ONNX Runtime."""
    code, text, err = run("merge", "--base", OTHER_BASE, "--adapter", adapter, "--output", merged)
    test.assertEqual(code, 0, err)
    test.assertIn(kept, text + err)
    test.assertAlmostEqual(eval_loss_of(merged), val, delta=1e-5 * max(1.0, val))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = torch.jit.load(merged)(x).numpy()
    got = onnx_runtime.exported_outputs(BIN, merged, x.numpy())
    test.assertLess(float(np.abs(got - expected).max()), 1e-4)


def frozen_base_settings_train(test, method, prefix, trainable):
    """A method on a frozen base trains with int8 base weights (all 12 Linear layers quantised) and in bf16; two
    workers equal one process; plan counts its `trainable` parameters."""
    cfg, _ = write_config(prefix + "_int8", method=method, frozen_dtype="int8", epochs=1)
    code, _, err = run("train", "--config", cfg)
    test.assertEqual(code, 0, err)
    test.assertIn("quantised to int8: 12 layers", err)
    cfg, out = write_config(prefix + "_bf16", method=method, precision="bf16", epochs=1)
    test.assertEqual(run("train", "--config", cfg)[0], 0)
    test.assertTrue(all(np.isfinite(line["loss"]) for line in metric_lines(out, "train")))
    cfg, one = write_config(prefix + "_dp", method=method, batch_size=6, grad_accum_steps=2, epochs=2)
    two_workers_equal_one_process(test, cfg, one)
    code, text, err = run("plan", "--config", cfg, "--json")
    test.assertEqual(code, 0, err)
    items = {item["name"]: item for item in json.loads(text)["items"]}
    test.assertIn(f"parameters: {trainable} x", items["trainable tensors, gradients, AdamW"]["detail"])


def interrupt_and_resume(test, cfg, out):
    """Starts `train --config CFG`, interrupts it with Ctrl-C after its first metrics line, then resumes it to the end."""
    p = start_training(["--config", cfg], out)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    test.assertEqual(p.returncode, 130, err)
    code, _, err = run("train", "--config", cfg, "--resume")
    test.assertEqual(code, 0, err)


class DataParallel(unittest.TestCase):
    """Two Gloo workers on the loopback interface against one process with the same config (global batch)."""

    def config(self, name, **extra):
        # Augmentation stays on: it is seeded per image, so the shares see what the single process sees. No LoRA
        # dropout: its masks depend on how a batch is split.
        settings = {"lora": {"dropout": 0.0}, "batch_size": 6, "grad_accum_steps": 2, "epochs": 3}
        settings.update(extra)
        return write_config(name, **settings)

    def test_two_workers_equal_one_process(self):
        cfg, one = self.config("dp_one")
        # Two shares summed against one batch: float32 rounding only (measured 3e-6 here).
        err = two_workers_equal_one_process(self, cfg, one)
        self.assertIn("data-parallel worker 0 of 2", err)
        for kind, keys in (("val", ("val_loss", "val_top1")), ("train", ("loss", "grad_norm"))):
            for a, b in zip(metric_lines(one, kind), metric_lines(one + "_two", kind), strict=True):
                for k in keys:
                    self.assertAlmostEqual(a[k], b[k], delta=1e-5 * max(1.0, abs(a[k])), msg=f"{kind} {k}")
        self.assertFalse(any("rank" in f for f in os.listdir(one + "_two")), "one set of files, written by rank 0")
        # Started as torchrun starts workers (its variables, no launcher): the same run.
        codes, errs = self.start_workers(cfg, ["--set", "output_dir=" + one + "_env"], [2, 2])
        self.assertEqual(codes, [0, 0], errs)
        self.assertEqual(adapter_difference(os.path.join(one + "_two", "adapter"), os.path.join(one + "_env", "adapter")), 0.0)

    def start_workers(self, cfg, extra, world_sizes):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([BIN, "train", "--config", cfg, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(size),
                                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                                  "LORATUNE_DIST_TIMEOUT": "20"})
                 for rank, size in enumerate(world_sizes)]
        errs = [p.communicate(timeout=120)[1] for p in procs]
        return [p.returncode for p in procs], errs

    def test_interrupted_workers_resume_to_the_uninterrupted_result(self):
        cfg, whole = self.config("dp_whole", epochs=30)
        code, _, err = run("train", "--config", cfg, "--nproc", "2")
        self.assertEqual(code, 0, err)
        cfg, out = self.config("dp_resumed", epochs=30)
        p = start_training(["--config", cfg, "--nproc", "2"], out)
        p.send_signal(signal.SIGINT)  # to the launcher, which passes it to both workers
        _, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 130, err)
        self.assertIn("--nproc 2 --resume", err)
        self.assertEqual(err.count("resume with"), 1, "rank 0 alone says how to resume")
        code, _, err = run("train", "--config", cfg, "--nproc", "2", "--resume")
        self.assertEqual(code, 0, err)
        self.assertEqual(adapter_difference(os.path.join(whole, "adapter"), os.path.join(out, "adapter")), 0.0)

    @staticmethod
    def socket_addresses(pids):
        """(state, local address) of the processes' TCP sockets, IPv4 and IPv6, from /proc ("0A": listening)."""
        inodes = set()
        for pid in pids:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        found = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[9] not in inodes:
                        continue
                    addr = bytes.fromhex(fields[1].split(":")[0])
                    if len(addr) == 4:
                        found.append((fields[3], socket.inet_ntop(socket.AF_INET, addr[::-1])))
                    else:
                        words = b"".join(addr[i:i + 4][::-1] for i in range(0, 16, 4))
                        found.append((fields[3], socket.inet_ntop(socket.AF_INET6, words)))
        return found

    def test_local_workers_use_loopback_only_and_stop_with_their_launcher(self):
        cfg, out = self.config("dp_orphans", epochs=30)
        tmpdir = tempfile.mkdtemp(prefix="tmpdir_", dir=TMP)  # where the launcher makes the store's folder
        p = start_training(["--config", cfg, "--nproc", "2"], out, env={**os.environ, "TMPDIR": tmpdir})
        workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        self.assertEqual(len(workers), 2)
        # No rendezvous port: the store is a file in a private folder; Gloo's own connections are on 127.0.0.1.
        sockets = self.socket_addresses(workers)
        self.assertTrue(sockets, "Gloo connects the workers")
        self.assertTrue(all(a in ("127.0.0.1", "::ffff:127.0.0.1") for _, a in sockets), sockets)
        # The launcher killed outright: its workers checkpoint and stop instead of training on unsupervised.
        p.kill()
        p.communicate(timeout=60)
        deadline = time.time() + 90
        while time.time() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
            time.sleep(0.1)
        self.assertFalse(any(os.path.exists(f"/proc/{w}") for w in workers), "workers outlived their launcher")
        self.assertEqual(os.listdir(tmpdir), [], "the last worker removes the store's folder")
        self.assertTrue(os.path.exists(os.path.join(out, "checkpoint.safetensors")))
        code, _, err = run("train", "--config", cfg, "--nproc", "2", "--resume")
        self.assertEqual(code, 0, err)
        with open(os.path.join(out, "summary.json")) as f:
            self.assertEqual(json.load(f)["epochs"], 30)

    def test_a_store_client_that_stalls_does_not_keep_rank_0_alive(self):
        # Workers started with torchrun's variables: rank 0 serves the rendezvous store at MASTER_ADDR:MASTER_PORT.
        # With c10d's TCPStore, a client that sent part of a request and waited blocked its server thread, and rank
        # 0 never exited after a finished run; and the store listened on every interface.
        cfg, out = self.config("dp_stalled_client", epochs=8)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "LORATUNE_DIST_TIMEOUT": "20"}
        procs = [subprocess.Popen([BIN, "train", "--config", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**env, "RANK": "1"}),
                 start_training(["--config", cfg], out, env={**env, "RANK": "0"})]
        listening = [a for state, a in self.socket_addresses([procs[1].pid]) if state == "0A"]
        self.assertTrue(listening)
        self.assertTrue(all(a == "127.0.0.1" for a in listening), listening)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"\x00" + (64).to_bytes(8, "little") + b"loratune")  # a SET whose key never ends
            errs = [proc.communicate(timeout=120)[1] for proc in procs]
        self.assertEqual([proc.returncode for proc in procs], [0, 0], errs)

    def test_faults_end_in_one_line_within_the_timeout(self):
        cfg, _ = self.config("dp_faults")
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "LORATUNE_DIST_TIMEOUT": "3"}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        start = time.time()
        p = subprocess.run([BIN, "train", "--config", cfg], env={**env, "MASTER_PORT": str(free)}, capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(p.returncode, 4, p.stderr)
        self.assertLess(time.time() - start, 30)
        self.assertIn("did not join within 3 s", p.stderr.strip().splitlines()[-1])
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            p = subprocess.run([BIN, "train", "--config", cfg], env={**env, "MASTER_PORT": str(busy.getsockname()[1])},
                               capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 3, p.stderr)
        self.assertIn("is in use", p.stderr)
        p = subprocess.run([BIN, "train", "--config", cfg], env={**env, "RANK": "2"}, capture_output=True, text=True)
        self.assertEqual(p.returncode, 3, p.stderr)
        self.assertIn("RANK 2 is not below WORLD_SIZE 2", p.stderr)
        start = time.time()
        codes, errs = self.start_workers(cfg, [], [2, 3])
        self.assertEqual(codes, [3, 3], errs)
        self.assertLess(time.time() - start, 30)
        self.assertIn("was started with WORLD_SIZE 2, this one with 3", errs[1])
        # A worker killed in the middle: the other notices and the launcher reports it.
        cfg, run_dir = self.config("dp_killed", epochs=200)
        p = subprocess.Popen([BIN, "train", "--config", cfg, "--nproc", "2"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "LORATUNE_DIST_TIMEOUT": "20"})
        deadline = time.time() + 60
        workers = []
        while time.time() < deadline and len(workers) < 2:
            workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
            time.sleep(0.1)
        # Killed once both train (metrics written), not while they join: on a loaded machine a worker still joining
        # waits out the join timeout, past the launcher's 15 s before it stops the rest.
        while time.time() < deadline and not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            time.sleep(0.1)
        time.sleep(1)
        os.kill(int(workers[1]), signal.SIGKILL)
        start = time.time()
        _, err = p.communicate(timeout=60)
        self.assertNotEqual(p.returncode, 0)
        self.assertLess(time.time() - start, 30)
        self.assertRegex(err, r"worker [01] \(of 2\) exited with code 137")
        self.assertIn("lost the other workers", err)


class Interrupt(unittest.TestCase):
    def test_ctrl_c_checkpoints_and_refuses_a_second_writer(self):
        # Far more epochs than the checks take however busy the machine is: the run is stopped, never finished.
        cfg, out = write_config("interrupt", epochs=100000)
        p = start_training(["--config", cfg], out)
        # One writer per run folder: a second run or resume there is refused while this one trains.
        for extra in ([], ["--resume"]):
            code, _, err = run("train", "--config", cfg, *extra)
            self.assertEqual(code, 3, err)
            self.assertIn(f"{out} is in use by another training run (process {p.pid})", err)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 130, err)
        self.assertIn("resume with: loratune train --config " + cfg + " --resume", err)
        self.assertTrue(os.path.exists(os.path.join(out, "checkpoint.safetensors")))

    def test_resume_after_ctrl_c_finishes_the_run(self):
        cfg, out = write_config("interrupt_resume", epochs=40)
        interrupt_and_resume(self, cfg, out)
        with open(os.path.join(out, "summary.json")) as f:
            self.assertEqual(json.load(f)["epochs"], 40)


def python_metrics(logits, labels, classes):
    pred = logits.argmax(1)
    c = len(classes)
    cm = [[int(((labels == t) & (pred == p)).sum()) for p in range(c)] for t in range(c)]
    per = []
    for k in range(c):
        tp, predicted, actual = cm[k][k], sum(cm[j][k] for j in range(c)), sum(cm[k])
        prec = tp / predicted if predicted else 0.0
        rec = tp / actual if actual else 0.0
        per.append((prec, rec, 2 * prec * rec / (prec + rec) if prec + rec else 0.0, actual))
    # Expected calibration error over 15 equal-width bins of the top probability, (lower, upper] each.
    confidence = logits.double().softmax(1).max(1).values
    bins = (torch.ceil(confidence * 15).long() - 1).clamp(0, 14)
    ece = sum(float((bins == b).sum()) / len(labels) *
              abs(float((pred == labels)[bins == b].double().mean()) - float(confidence[bins == b].mean()))
              for b in range(15) if (bins == b).any())
    return {"top1": float((pred == labels).float().mean()), "confusion": cm, "per_class": per,
            "loss": float(torch.nn.functional.cross_entropy(logits.double(), labels)), "ece": ece,
            "predicted": pred.tolist(), "confidence": confidence.tolist()}


class EvalAgainstPython(unittest.TestCase):
    def test_merged_and_unmerged_eval_match_python_metrics(self):
        run_dir = trained_run()
        merged = os.path.join(TMP, "merged.pt")
        code, out, err = run("merge", "--base", BASE, "--adapter", run_dir + "/best", "--output", merged)
        self.assertEqual(code, 0, err)
        self.assertIn("max |merged - adapted|", out)
        data = os.path.join(IMAGES, "toy", "eval36")
        results = {}
        for name, args in (("merged", ["--model", merged]), ("adapted", ["--model", BASE, "--adapter", run_dir + "/best"])):
            out_dir = os.path.join(TMP, "eval_" + name)
            code, _, err = run("eval", *args, "--data", data, "--output", out_dir)
            self.assertEqual(code, 0, err)
            with open(os.path.join(out_dir, "metrics.json")) as f:
                results[name] = json.load(f)
            with Image.open(os.path.join(out_dir, "confusion_matrix.png")) as im:
                self.assertGreater(im.size[0], 100)
        self.assertEqual(results["merged"]["confusion_matrix"], results["adapted"]["confusion_matrix"])

        # Python: the merged file's logits on the same images (already 36x36: preprocessing is a 2-pixel crop).
        model = torch.jit.load(merged).eval()
        classes = results["merged"]["classes"]
        xs, ys, paths = [], [], []
        for label, name in enumerate(classes):
            for fn in sorted(os.listdir(os.path.join(data, name))):
                with Image.open(os.path.join(data, name, fn)) as im:
                    rgb = np.asarray(im.convert("RGB"), np.float32)[2:34, 2:34]
                xs.append(torch.from_numpy((rgb / 255.0 - 0.5) / 0.5).permute(2, 0, 1))
                ys.append(label)
                paths.append(os.path.abspath(os.path.join(data, name, fn)))
        with torch.no_grad():
            logits = model(torch.stack(xs))
        ref = python_metrics(logits, torch.tensor(ys), classes)
        got = results["merged"]
        self.assertEqual(got["confusion_matrix"], ref["confusion"])
        self.assertAlmostEqual(got["top1"], ref["top1"], places=9)
        self.assertAlmostEqual(got["loss"], ref["loss"], places=5)
        for k, (prec, rec, f1, support) in enumerate(ref["per_class"]):
            self.assertAlmostEqual(got["per_class"][k]["precision"], prec, places=9)
            self.assertAlmostEqual(got["per_class"][k]["recall"], rec, places=9)
            self.assertAlmostEqual(got["per_class"][k]["f1"], f1, places=9)
            self.assertEqual(got["per_class"][k]["support"], support)
        self.assertAlmostEqual(got["macro_f1"], sum(p[2] for p in ref["per_class"]) / 3, places=9)
        self.assertAlmostEqual(got["ece"], ref["ece"], places=5)
        self.assertEqual(sum(b["count"] for b in got["calibration"]), len(ys))
        # predictions.csv: every photo, its predicted class and that class's probability.
        with open(os.path.join(TMP, "eval_merged", "predictions.csv"), newline="", encoding="utf-8") as f:
            rows = {r["path"]: r for r in csv.DictReader(f)}
        self.assertEqual(sorted(rows), sorted(paths))
        for path, label, predicted, confidence in zip(paths, ys, ref["predicted"], ref["confidence"]):
            self.assertEqual(rows[path]["true"], classes[label])
            self.assertEqual(rows[path]["predicted"], classes[predicted])
            self.assertAlmostEqual(float(rows[path]["confidence"]), confidence, places=5)


class Predict(unittest.TestCase):
    def test_two_adapters_on_one_base_match_separate_runs(self):
        run_dir = trained_run()
        second = os.path.join(FIX, "models", "adapter_hf_script")  # another adapter for the same base
        images = [os.path.join(IMAGES, "toy", "val", "circle"), os.path.join(IMAGES, "toy", "val", "stripes", "000.png")]
        code, both, err = run("predict", "--model", BASE, "--adapter", run_dir + "/best", "--adapter", second, *images,
                              "--format", "json", "--top-k", "2")
        self.assertEqual(code, 0, err)
        both = json.loads(both)
        for adapter in (run_dir + "/best", second):
            code, alone, err = run("predict", "--model", BASE, "--adapter", adapter, *images, "--format", "json", "--top-k", "2")
            self.assertEqual(code, 0, err)
            alone = json.loads(alone)
            mine = [r for r in both if r["adapter"] == adapter]
            self.assertEqual(len(mine), 9)
            for a, b in zip(mine, alone):
                self.assertEqual(a["path"], b["path"])
                self.assertEqual([t["label"] for t in a["top"]], [t["label"] for t in b["top"]])
                for ta, tb in zip(a["top"], b["top"]):
                    self.assertAlmostEqual(ta["probability"], tb["probability"], places=6)
        labels = {r["adapter"]: r["top"][0]["label"] for r in both if r["path"].endswith("000.png") and "stripes" in r["path"]}
        self.assertEqual(labels[run_dir + "/best"], "stripes")
        self.assertTrue(labels[second].startswith("class_"), "the second adapter's own class names")

    def test_csv_holds_commas_and_quotes_in_names(self):
        run_dir = trained_run()
        folder = os.path.join(TMP, "predict_csv")
        os.makedirs(folder, exist_ok=True)
        shutil.copy(os.path.join(IMAGES, "toy", "val", "circle", "000.png"), os.path.join(folder, 'a, "b".png'))
        shutil.copy(os.path.join(IMAGES, "toy", "val", "circle", "001.png"), os.path.join(folder, "plain.png"))
        args = ("predict", "--model", BASE, "--adapter", run_dir + "/best", folder, "--top-k", "2")
        code, table, err = run(*args, "--format", "json")
        self.assertEqual(code, 0, err)
        want = [[r["adapter"], r["path"], str(k + 1), t["label"], t["probability"]]
                for r in json.loads(table) for k, t in enumerate(r["top"])]
        code, text, err = run(*args, "--format", "csv")
        self.assertEqual(code, 0, err)
        rows = list(csv.reader(io.StringIO(text)))
        self.assertEqual(rows[0], ["adapter", "path", "rank", "label", "probability"])
        self.assertEqual([r[:4] for r in rows[1:]], [w[:4] for w in want])
        for r, w in zip(rows[1:], want):
            self.assertAlmostEqual(float(r[4]), w[4], places=5)
        self.assertTrue(any(r[1].endswith('a, "b".png') for r in rows[1:]))

    def test_info_and_report(self):
        run_dir = trained_run()
        code, out, _ = run("info", run_dir + "/best")
        self.assertEqual(code, 0)
        self.assertIn("빨간_사각형", out)
        code, out, _ = run("info", BASE, "--set", 'lora.targets=["qkv"]')
        self.assertEqual(code, 3)
        code, out, _ = run("info", BASE, "--set", "lora.rank=4")
        self.assertEqual(code, 0)
        self.assertIn("would adapt 4 weights, 1024 adapter parameters", out)
        # Resolved as training resolves them: lora.last_blocks keeps the last block's q and v.
        code, out, err = run("info", BASE, "--set", "lora.rank=4", "--set", "lora.last_blocks=1")
        self.assertEqual(code, 0, err)
        self.assertIn("would adapt 2 weights, 512 adapter parameters", out)
        self.assertNotIn("layer.0.", out.split("would adapt")[1])
        code, out, err = run("info", BASE, "--set", "method=vpt", "--set", "vpt.tokens=5")
        self.assertEqual(code, 0, err)
        self.assertIn("would train 5 prompt tokens x 32 before every block (VPT-deep), 320 parameters", out)
        code, out, err = run("report", run_dir)
        self.assertEqual(code, 0, err)
        for png in ("loss.png", "lr.png", "val_accuracy.png"):
            with Image.open(os.path.join(run_dir, png)) as im:
                self.assertGreater(im.size[0], 100)
        self.assertIn("report: " + os.path.join(run_dir, "report.html"), out)  # tests/python/test_report_page.py opens pages
        with open(os.path.join(run_dir, "report.html"), encoding="utf-8") as f:
            self.assertIn('id="no-evaluation"', f.read(), "a run alone: the page says how to add evaluations")


class FrozenWeights(unittest.TestCase):
    def test_sixteen_bit_frozen_weights_or_a_clear_fallback(self):
        cfg, _ = write_config("frozen_bf16", precision="bf16", frozen_dtype="compute", epochs=1)
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertIn("frozen base weights stored as bf16", err)
        # This traced graph mixes dtypes with 16-bit weights: the probe step catches it, training goes on in fp32.
        cfg, _ = write_config("frozen_fallback", model=os.path.join(FIX, "models", "torchvision_trace.pt"),
                              precision="bf16", frozen_dtype="compute", epochs=1)
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        warning = [line for line in err.splitlines() if "frozen weights stay in fp32" in line]
        self.assertEqual(len(warning), 1, err)
        self.assertNotIn("Traceback", err)


class MobileClip(unittest.TestCase):
    IMAGE = os.path.join(FIX, "models", "mobileclip_trace.pt")
    PHOTOS = os.path.join(FIX, "models", "zeroshot")

    def test_zero_shot_eval_before_training(self):
        out = os.path.join(TMP, "zeroshot_eval")
        code, stdout, err = run("eval", "--model", self.IMAGE, "--zero-shot", "--data", self.PHOTOS, "--output", out)
        self.assertEqual(code, 0, err)
        self.assertIn("(zero-shot)", stdout)
        with open(os.path.join(out, "metrics.json")) as f:
            self.assertEqual(json.load(f)["top1"], 1.0)
        self.assertEqual(run("eval", "--model", self.IMAGE, "--zero-shot", "--adapter", "x", "--data", self.PHOTOS)[0], 3)

    def test_training_from_the_zero_shot_head_then_merge(self):
        cfg, out = write_config("zeroshot_train", model=self.IMAGE, data={"train": self.PHOTOS, "val": self.PHOTOS},
                                head={"init": "zero_shot"}, epochs=1, batch_size=3, optim={"lr": 1e-5})
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertIn("zero-shot head from", err)
        with open(os.path.join(out, "summary.json")) as f:
            self.assertEqual(json.load(f)["best_val_top1"], 1.0, "starts where zero-shot is")
        merged = os.path.join(TMP, "zeroshot_merged.pt")
        self.assertEqual(run("merge", "--base", self.IMAGE, "--adapter", out + "/best", "--output", merged)[0], 0)
        code, _, err = run("eval", "--model", merged, "--data", self.PHOTOS, "--output", os.path.join(TMP, "zs_merged"))
        self.assertEqual(code, 0, err)
        with open(os.path.join(TMP, "zs_merged", "metrics.json")) as f:
            self.assertEqual(json.load(f)["top1"], 1.0, "the merged cosine classifier normalises features too")

    def test_wise_ft_moves_the_head_from_its_zero_shot_start(self):
        """merge --strength s interpolates adapters and the head from where training started: at 0 the merged file is
        the zero-shot classifier (eval --zero-shot computes it anew from the text encoder), at 1 the adapted model;
        a randomly initialised head has no start to move from and stays as trained."""
        def metrics(name, *model_args):
            out = os.path.join(TMP, "wise_" + name)
            code, _, err = run("eval", *model_args, "--data", val, "--output", out)
            self.assertEqual(code, 0, err)
            with open(os.path.join(out, "metrics.json")) as f:
                return json.load(f)
        # The toy photos, where the fixture's zero-shot classifier is unsure (the colour photos would give loss 0).
        train, val = os.path.join(IMAGES, "toy", "train"), os.path.join(IMAGES, "toy", "val")
        cfg, out = write_config("wise_train", model=self.IMAGE, data={"train": train, "val": val},
                                head={"init": "zero_shot"}, epochs=2, batch_size=4, optim={"lr": 0.05})
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.exists(os.path.join(out, "adapter", "initial_head.safetensors")))
        zero_shot = metrics("zero_shot", "--model", self.IMAGE, "--zero-shot")
        adapted = metrics("adapted", "--model", self.IMAGE, "--adapter", os.path.join(out, "adapter"))
        self.assertGreater(abs(adapted["loss"] - zero_shot["loss"]), 1e-3, "training moved the model")
        merged = {}
        for strength in ("0", "0.5", "1"):
            path = os.path.join(TMP, f"wise_{strength}.pt")
            code, stdout, err = run("merge", "--base", self.IMAGE, "--adapter", os.path.join(out, "adapter"), "--output",
                                    path, "--strength", strength)
            self.assertEqual(code, 0, err)
            merged[strength] = metrics("merged_" + strength, "--model", path)
        self.assertAlmostEqual(merged["0"]["loss"], zero_shot["loss"], delta=1e-5 * max(1.0, zero_shot["loss"]))
        self.assertAlmostEqual(merged["1"]["loss"], adapted["loss"], delta=1e-5 * max(1.0, adapted["loss"]))
        self.assertGreater(min(abs(merged["0.5"]["loss"] - merged["0"]["loss"]),
                               abs(merged["0.5"]["loss"] - merged["1"]["loss"])), 1e-4)
        # A damaged start is named, not used.
        damaged = os.path.join(TMP, "wise_damaged")
        shutil.copytree(os.path.join(out, "adapter"), damaged)
        with open(os.path.join(damaged, "initial_head.safetensors"), "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"\x7f\x7f\x7f")
        code, _, err = run("merge", "--base", self.IMAGE, "--adapter", damaged, "--output", os.path.join(TMP, "wise_d.pt"),
                           "--strength", "0.5")
        self.assertEqual(code, 3, err)
        self.assertIn("initial_head.safetensors is damaged", err)
        self.assertFalse(os.path.exists(os.path.join(TMP, "wise_d.pt")))
        # The same run with a random head: strength 0 keeps the trained head on the base weights.
        cfg, out = write_config("wise_random_head", model=self.IMAGE, data={"train": train, "val": val},
                                epochs=1, batch_size=4, optim={"lr": 0.05})
        self.assertEqual(run("train", "--config", cfg)[0], 0)
        self.assertFalse(os.path.exists(os.path.join(out, "adapter", "initial_head.safetensors")))
        path = os.path.join(TMP, "wise_random_0.pt")
        self.assertEqual(run("merge", "--base", self.IMAGE, "--adapter", os.path.join(out, "adapter"), "--output", path,
                             "--strength", "0")[0], 0)
        self.assertNotAlmostEqual(metrics("random_0", "--model", path)["loss"], zero_shot["loss"], delta=1e-3)



def lora_delta(tensors, module, slice_, scale):
    """s * B @ A of one adapted slice, from an adapter's tensors."""
    a = tensors[f"base_model.model.{module}.lora_A.{slice_}.weight"].double()
    b = tensors[f"base_model.model.{module}.lora_B.{slice_}.weight"].double()
    return scale * b @ a


class Contrastive(unittest.TestCase):
    """loss contrastive (FLYP): LoRA on both towers of the MobileCLIP fixture, each toy photo paired with a prompt of its
    class; the saved head is the adapted text tower's zero-shot classifier."""
    IMAGE = MobileClip.IMAGE
    TEXT = os.path.join(FIX, "models", "mobileclip_text.pt")
    TRAIN, VAL = os.path.join(IMAGES, "toy", "train"), os.path.join(IMAGES, "toy", "val")

    def config(self, name, **extra):
        settings = {"model": self.IMAGE, "data": {"train": self.TRAIN, "val": self.VAL, "workers": 2},
                    "loss": "contrastive", "head": {"init": "zero_shot"}, "epochs": 2, "batch_size": 6,
                    "optim": {"lr": 0.02}, "log_every_steps": 1}
        settings.update(extra)
        return write_config(name, **settings)

    def eval_metrics(self, name, *args):
        out = os.path.join(TMP, "flyp_eval_" + name)
        code, stdout, err = run("eval", *args, "--data", self.VAL, "--output", out)
        self.assertEqual(code, 0, err)
        with open(os.path.join(out, "metrics.json")) as f:
            return json.load(f)

    def test_both_towers_train_and_classes_are_scored_by_the_adapted_text_tower(self):
        cfg, out = self.config("flyp")
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertIn("weights of the text tower mobileclip_text.pt (loss contrastive)", err)
        adapter = os.path.join(out, "adapter")
        code, stdout, err = run("info", adapter)
        self.assertEqual(code, 0, err)
        self.assertIn("text tower", stdout)
        self.assertIn("text_encoder.transformer.1.pre_norm_mha.1.qkv_proj", stdout)
        tensors, _ = safetensors_lite.load(os.path.join(adapter, "adapter_model.safetensors"))
        text_b = [k for k in tensors if k.startswith("base_model.model.text_encoder.") and ".lora_B." in k]
        self.assertEqual(len(text_b), 4)
        self.assertTrue(all(float(tensors[k].abs().max()) > 0 for k in text_b), "the text adapters trained")
        # The saved head scores as the adapted text tower does when asked anew, unlike the base text tower.
        saved = self.eval_metrics("saved", "--model", self.IMAGE, "--adapter", adapter)
        anew = self.eval_metrics("anew", "--model", self.IMAGE, "--adapter", adapter, "--zero-shot")
        base = self.eval_metrics("base", "--model", self.IMAGE, "--zero-shot")
        self.assertAlmostEqual(saved["loss"], anew["loss"], delta=1e-5 * max(1.0, saved["loss"]))
        self.assertGreater(abs(saved["loss"] - base["loss"]), 1e-3, "training moved the model")
        with open(os.path.join(out, "summary.json")) as f:
            self.assertAlmostEqual(json.load(f)["final_val_loss"], saved["loss"], delta=1e-5 * max(1.0, saved["loss"]))
        # Without the adapted text tower's head the adapter still classifies (eval loads no text tower).
        self.assertEqual(saved["top1"], anew["top1"])

    def test_merge_writes_both_towers_as_python_computes_them(self):
        cfg, out = self.config("flyp_merge", epochs=1)
        self.assertEqual(run("train", "--config", cfg)[0], 0)
        adapter = os.path.join(out, "adapter")
        tensors, _ = safetensors_lite.load(os.path.join(adapter, "adapter_model.safetensors"))
        base_text = {k: v.double() for k, v in torch.jit.load(self.TEXT).state_dict().items()}
        zero_shot = self.eval_metrics("merge_zs", "--model", self.IMAGE, "--zero-shot")
        adapted = self.eval_metrics("merge_adapted", "--model", self.IMAGE, "--adapter", adapter)
        for strength in ("1", "0.5", "0"):
            merged = os.path.join(TMP, f"flyp_merged_{strength}.pt")
            code, stdout, err = run("merge", "--base", self.IMAGE, "--adapter", adapter, "--output", merged,
                                    "--strength", strength)
            self.assertEqual(code, 0, err)
            text_file = os.path.join(TMP, f"flyp_merged_{strength}_text.pt")
            self.assertIn(text_file, stdout)
            got = torch.jit.load(text_file).state_dict()
            for layer in range(2):
                module = f"text_encoder.transformer.{layer}.pre_norm_mha.1.qkv_proj"
                expected = base_text[module + ".weight"].clone()
                rows = expected.shape[0] // 3
                for slice_, begin in (("q", 0), ("v", 2 * rows)):
                    expected[begin:begin + rows] += float(strength) * lora_delta(tensors, module, slice_, 16.0 / 8)
                self.assertLess(float((got[module + ".weight"].double() - expected).abs().max()), 1e-6, module)
            metrics = self.eval_metrics("merged_" + strength, "--model", merged)
            if strength == "1":
                self.assertAlmostEqual(metrics["loss"], adapted["loss"], delta=1e-4 * max(1.0, adapted["loss"]))
            if strength == "0":  # the base CLIP: its zero-shot classifier, made from the (unchanged) text tower
                self.assertAlmostEqual(metrics["loss"], zero_shot["loss"], delta=1e-4 * max(1.0, zero_shot["loss"]))
        self.assertIn("head made from the merged text tower", stdout)

    def test_interrupted_run_resumes_to_the_uninterrupted_result(self):
        cfg, whole = self.config("flyp_whole", epochs=12, batch_size=4, grad_accum_steps=2)
        self.assertEqual(run("train", "--config", cfg)[0], 0)
        cfg, out = self.config("flyp_resumed", epochs=12, batch_size=4, grad_accum_steps=2)
        interrupt_and_resume(self, cfg, out)
        self.assertEqual(adapter_difference(os.path.join(whole, "adapter"), os.path.join(out, "adapter")), 0.0)

    def test_mixed_precision_and_two_workers(self):
        cfg, out = self.config("flyp_bf16", epochs=1, precision="bf16")
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        lines = metric_lines(out, "train")
        self.assertTrue(lines and all(np.isfinite(line["loss"]) for line in lines))
        cfg, out = self.config("flyp_dp", epochs=1, lora={"dropout": 0.0})
        code, _, err = run("train", "--config", cfg, "--nproc", "2")
        self.assertEqual(code, 0, err)
        self.assertIn("data-parallel worker 0 of 2", err)
        tensors, _ = safetensors_lite.load(os.path.join(out, "adapter", "adapter_model.safetensors"))
        self.assertEqual(sum(k.startswith("base_model.model.text_encoder.") for k in tensors), 8)

    def test_plan_counts_the_text_tower(self):
        cfg, _ = self.config("flyp_plan")
        plans = {}
        for loss in ("contrastive", "cross_entropy"):
            code, text, err = run("plan", "--config", cfg, "--set", "loss=" + loss, "--json")
            self.assertEqual(code, 0, err)
            plans[loss] = {item["name"]: item for item in json.loads(text)["items"]}
        text_bytes = sum(t.numel() * t.element_size() for t in torch.jit.load(self.TEXT).state_dict().values())
        frozen = "frozen weights (fp32)"
        self.assertEqual(plans["contrastive"][frozen]["bytes"] - plans["cross_entropy"][frozen]["bytes"], text_bytes)
        trainable = "trainable tensors, gradients, AdamW"
        self.assertEqual(plans["contrastive"][trainable]["detail"], "parameters: 5120 x 16 bytes")  # both towers, no head

    def test_settings_it_cannot_use_are_named(self):
        for extra, message in (({"method": "full"}, "set method to lora"),
                               ({"head": {"init": "random"}}, "set head.init to zero_shot"),
                               ({"label_smoothing": 0.1}, "label_smoothing applies to loss cross_entropy")):
            cfg, _ = self.config("flyp_bad", **extra)
            code, _, err = run("train", "--config", cfg)
            self.assertEqual(code, 3, err)
            self.assertIn(message, err)


def caption_of(cls, i):
    """Words for the toy photos: a class's name in English or Korean and the photo's number."""
    words = {"circle": "a round circle", "stripes": "a pattern of stripes", "빨간_사각형": "빨간 사각형, a red square"}
    return f"{words[cls]} number {i}"


class Captions(unittest.TestCase):
    """data.captions: loss contrastive on each photo's own captions (Hugging Face metadata.jsonl / metadata.csv, a
    CSV/TSV), bad rows skipped and listed; eval --retrieval on the same layouts, base and adapted, in the report."""
    IMAGE = MobileClip.IMAGE
    VAL = os.path.join(IMAGES, "toy", "val")

    @classmethod
    def setUpClass(cls):
        cls.photos = os.path.join(TMP, "captioned")
        if not os.path.isdir(cls.photos):
            shutil.copytree(os.path.join(IMAGES, "toy", "train"), cls.photos)
        cls.rows = []  # (relative path, [captions])
        for c in sorted(os.listdir(cls.photos)):
            for i, name in enumerate(sorted(os.listdir(os.path.join(cls.photos, c)))):
                if c == "circle" and i == 0:
                    continue  # one photo without a caption
                texts = [caption_of(c, i)] + ([f"another view of {caption_of(c, i)}"] if i % 4 == 0 else [])
                cls.rows.append((f"{c}/{name}", texts))
        with open(os.path.join(cls.photos, "metadata.jsonl"), "wb") as f:
            for path, texts in cls.rows:
                f.write((json.dumps({"file_name": path, "text": texts if len(texts) > 1 else texts[0]},
                                    ensure_ascii=False) + "\n").encode())
            f.write(b'{"file_name": "circle/missing.png", "text": "no such photo"}\n')
            f.write(b'{"file_name": "stripes/000.png", "text": "   "}\n')
            f.write(b'{"file_name": "stripes/001.png", "text": "broken \xff\xfe bytes"}\n')

    def layout(self, name, header, sep, path_key, text_key):
        """The same captions as a delimited file in the photo folder (fields quoted where they need it)."""
        path = os.path.join(self.photos, name)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f, delimiter=sep)
            writer.writerow(header)
            for photo, texts in self.rows:
                for text in texts:
                    writer.writerow({path_key: photo, text_key: text}.get(h, "x") for h in header)
        return path

    def config(self, name, **extra):
        settings = {"model": self.IMAGE, "data": {"train": self.photos, "val": self.VAL, "workers": 2,
                                                  "captions": os.path.join(self.photos, "metadata.jsonl")},
                    "loss": "contrastive", "head": {"init": "zero_shot"}, "epochs": 3, "batch_size": 4,
                    "grad_accum_steps": 3, "optim": {"lr": 0.02}, "log_every_steps": 1, "lora": {"dropout": 0.0}}
        settings.update(extra)
        return write_config(name, **settings)

    def retrieval(self, name, captions, *args):
        out = os.path.join(TMP, "retrieval_" + name)
        code, stdout, err = run("eval", "--model", self.IMAGE, "--data", self.VAL, "--retrieval", captions,
                                "--output", out, "--threads", "2", *args)
        self.assertEqual(code, 0, err)
        with open(os.path.join(out, "metrics.json")) as f:
            return json.load(f), stdout, err, out

    def test_training_on_captions_lists_bad_rows_and_improves_retrieval(self):
        cfg, out = self.config("captions")
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertIn("skipped 3 files", err)
        self.assertIn("no such photo", err)
        self.assertIn("an empty caption", err)
        self.assertIn("not UTF-8", err)
        self.assertIn("circle/000.png: no caption in metadata.jsonl", err)
        captions = sum(len(texts) for _, texts in self.rows)
        self.assertIn(f"{captions} captions ({captions} different) for {len(self.rows)} training photos", err)
        with open(os.path.join(out, "summary.json")) as f:
            reasons = sorted(s["reason"].split(":")[0] for s in json.load(f)["skipped_files"])
        self.assertEqual(reasons, ["an empty caption", "no caption in metadata.jsonl", "no such photo",
                                   "not UTF-8 (save the file as UTF-8)"])
        adapter = os.path.join(out, "adapter")
        tensors, _ = safetensors_lite.load(os.path.join(adapter, "adapter_model.safetensors"))
        text_b = [k for k in tensors if k.startswith("base_model.model.text_encoder.") and ".lora_B." in k]
        self.assertTrue(text_b and all(float(tensors[k].abs().max()) > 0 for k in text_b), "the text adapters trained")
        metrics, stdout, err, _ = self.retrieval("trained", os.path.join(self.photos, "metadata.jsonl"),
                                                 "--adapter", adapter, "--report")
        r = metrics["retrieval"]
        self.assertEqual((r["images"], r["texts"]), (len(self.rows), captions))
        for variant in ("base", "adapted"):
            for direction in ("image_to_text", "text_to_image"):
                d = r[variant][direction]
                self.assertLessEqual(d["recall@1"], d["recall@5"])
                self.assertLessEqual(d["recall@5"], d["recall@10"])
        # Trained on these pairs: the adapted towers find them better than the random base does.
        for direction in ("image_to_text", "text_to_image"):
            self.assertLess(r["adapted"][direction]["mean_rank"], r["base"][direction]["mean_rank"], direction)
        self.assertIn("image->text R@1", stdout)
        self.assertIn("metadata.jsonl (rows): skipped 3 files", err)
        # Zero-shot classification of the class folders still works on the same model (metrics.json's top-1).
        self.assertGreaterEqual(metrics["top1"], 0.0)
        with open(os.path.join(TMP, "retrieval_trained", "report.html")) as f:
            html = f.read()
        self.assertIn("<h3>Retrieval</h3>", html)
        self.assertIn('data-variant="adapted"', html)

    def test_retrieval_alone_needs_no_class_folders_and_is_reported(self):
        captions = os.path.join(self.photos, "metadata.jsonl")
        with_classes, _, _, _ = self.retrieval("with_classes", captions, "--zero-shot")
        out = os.path.join(TMP, "retrieval_alone")
        code, stdout, err = run("eval", "--model", self.IMAGE, "--retrieval", captions, "--output", out,
                                "--threads", "2", "--report")
        self.assertEqual(code, 0, err)
        with open(os.path.join(out, "metrics.json")) as f:
            alone = json.load(f)
        self.assertNotIn("top1", alone)
        self.assertEqual(alone["retrieval"]["base"], with_classes["retrieval"]["base"])
        # Its report, and one that also holds a classification evaluation, show the table and run their scripts' data.
        for args in ((out,), (out, os.path.join(TMP, "retrieval_with_classes"))):
            page = os.path.join(TMP, "retrieval_alone.html")
            code, _, err = run("report", *args, "--output", page)
            self.assertEqual(code, 0, err)
            with open(page) as f:
                html = f.read()
            self.assertEqual(html.count("<h3>Retrieval</h3>"), len(args))
        code, _, err = run("eval", "--model", self.IMAGE, "--output", out)
        self.assertEqual(code, 2, err)
        self.assertIn("eval needs --data PHOTOS (or --retrieval CAPTIONS for retrieval alone)", err)

    def test_interrupted_caption_run_resumes_to_the_uninterrupted_result(self):
        cfg, whole = self.config("captions_whole", epochs=6)
        self.assertEqual(run("train", "--config", cfg)[0], 0)
        cfg, out = self.config("captions_resumed", epochs=6)
        interrupt_and_resume(self, cfg, out)
        self.assertEqual(adapter_difference(os.path.join(whole, "adapter"), os.path.join(out, "adapter")), 0.0)

    def test_two_workers_gather_the_step_s_pairs_as_one_process_does(self):
        # 71 photos in micro-batches of 6 x 2: the last micro-batch has 5 photos, shared 3 + 2. (Not a share of one
        # photo: LibTorch 1.13's CPU backward through the fixture's BatchNorm is wrong for a batch of one.)
        cfg, one = self.config("captions_dp_one", epochs=2, threads=1, batch_size=6, grad_accum_steps=2)
        two_workers_equal_one_process(self, cfg, one)
        for a, b in zip(metric_lines(one, "train"), metric_lines(one + "_two", "train"), strict=True):
            self.assertAlmostEqual(a["loss"], b["loss"], delta=1e-4 * max(1.0, abs(a["loss"])))
        # Negatives per micro-batch share (3 photos): another loss.
        cfg, share = self.config("captions_dp_share", epochs=2, threads=1, batch_size=6, grad_accum_steps=2,
                                 contrastive={"negatives": "micro_batch"})
        self.assertEqual(run("train", "--config", cfg, "--nproc", "2")[0], 0)
        self.assertGreater(abs(metric_lines(share, "train")[0]["loss"] - metric_lines(one, "train")[0]["loss"]), 1e-3)

    def test_csv_and_tsv_layouts_give_the_jsonl_file_s_retrieval(self):
        jsonl, _, _, _ = self.retrieval("jsonl", os.path.join(self.photos, "metadata.jsonl"), "--zero-shot")
        hf_csv = self.layout("metadata.csv", ["file_name", "text"], ",", "file_name", "text")
        open_clip_tsv = self.layout("train.tsv", ["title", "filepath", "extra"], "\t", "filepath", "title")
        for name, path, args in (("csv", hf_csv, ()), ("tsv", open_clip_tsv, ("--caption-column", "title"))):
            got, _, _, _ = self.retrieval(name, path, "--zero-shot", *args)
            self.assertEqual(got["retrieval"]["base"], jsonl["retrieval"]["base"], name)
        # A caption with the separator, quotes and a line break in it survives the quoting.
        with open(hf_csv, "a", newline="") as f:
            csv.writer(f).writerow(["circle/000.png", 'a "quoted", two-line\ncaption'])
        got, _, _, _ = self.retrieval("csv_quoted", hf_csv, "--zero-shot")
        self.assertEqual(got["retrieval"]["texts"], jsonl["retrieval"]["texts"] + 1)
        self.assertEqual(got["retrieval"]["images"], jsonl["retrieval"]["images"] + 1)

    def test_captions_it_cannot_use_are_named(self):
        bad_column = self.layout("no_text.csv", ["file_name", "words"], ",", "file_name", "words")
        nothing = os.path.join(TMP, "captions_elsewhere.jsonl")
        with open(nothing, "w") as f:
            f.write(json.dumps({"file_name": os.path.join(self.VAL, "circle", "000.png"), "text": "a val photo"}) + "\n")
        for data, extra, message in (
                ({"captions": bad_column}, {}, "has no caption column (text, caption, title); its columns: file_name, "
                                               "words; name one with data.caption_column"),
                ({"captions": nothing}, {}, "no photo of " + self.photos + " has a caption in " + nothing),
                ({}, {"loss": "cross_entropy", "head": {"init": "random"}}, "set loss to contrastive")):
            cfg, _ = self.config("captions_bad", **extra)
            with open(cfg) as f:
                settings = json.load(f)
            settings["data"].update(data)
            with open(cfg, "w") as f:
                json.dump(settings, f)
            code, _, err = run("train", "--config", cfg)
            self.assertEqual(code, 3, err)
            self.assertIn(message, err)


class QuantizedBase(unittest.TestCase):
    """frozen_dtype int8 / nf4: the blocks' Linear weights quantised under the adapters (hf_script: query, key, value,
    attention output, intermediate and output of 2 blocks)."""

    def config(self, name, fmt, **extra):
        settings = {"frozen_dtype": fmt, "lora": {"dropout": 0.0}, "epochs": 2}
        settings.update(extra)
        return write_config(name, **settings)

    def eval_loss(self, name, *args):
        return eval_loss(self, "quant_" + name, *args)

    def test_adapters_trained_on_a_quantised_base_are_ordinary_files(self):
        for fmt in ("int8", "nf4"):
            cfg, out = self.config("quant_" + fmt, fmt)
            code, _, err = run("train", "--config", cfg)
            self.assertEqual(code, 0, err)
            self.assertIn(f"quantised to {fmt}: 12 layers", err)
            adapter = os.path.join(out, "adapter")
            self.assertEqual(run("info", adapter)[0], 0)
            with open(os.path.join(out, "summary.json")) as f:
                quantised_val = json.load(f)["final_val_loss"]
            # eval on the base quantised as in training scores as training's validation did.
            unmerged = self.eval_loss(fmt + "_quantised", "--model", BASE, "--adapter", adapter, "--frozen-dtype", fmt)
            self.assertAlmostEqual(unmerged, quantised_val, delta=1e-5 * max(1.0, unmerged))
            # The same adapter on the full-precision base (as merge folds it): close to what the quantised base gave.
            dense = self.eval_loss(fmt, "--model", BASE, "--adapter", adapter)
            self.assertLess(abs(dense - quantised_val), (0.02 if fmt == "int8" else 0.2) * max(1.0, dense), fmt)
            merged = os.path.join(TMP, f"quant_merged_{fmt}.pt")
            self.assertEqual(run("merge", "--base", BASE, "--adapter", adapter, "--output", merged)[0], 0)
            self.assertAlmostEqual(self.eval_loss(fmt + "_merged", "--model", merged), dense, delta=1e-4 * max(1.0, dense))

    def test_offload_is_checked_and_on_the_cpu_does_nothing(self):
        cfg, out = self.config("offload_cpu", "nf4", offload="both")
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertIn("offload both applies on CUDA; on the CPU it does nothing", err)
        cfg, _ = self.config("offload_no_ckpt", "fp32", offload="weights", gradient_checkpointing=False)
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 3, err)
        self.assertIn("offload weights needs gradient_checkpointing true", err.strip().splitlines()[-1])
        cfg, _ = self.config("offload_full", "fp32", offload="activations", method="full")
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 3, err)
        self.assertIn("set method to lora", err.strip().splitlines()[-1])

    def test_resume_data_parallel_and_the_prefix_cache_keep_working(self):
        cfg, whole = self.config("quant_whole", "int8", epochs=8, batch_size=4)
        self.assertEqual(run("train", "--config", cfg)[0], 0)
        cfg, out = self.config("quant_resumed", "int8", epochs=8, batch_size=4)
        interrupt_and_resume(self, cfg, out)
        self.assertEqual(adapter_difference(os.path.join(whole, "adapter"), os.path.join(out, "adapter")), 0.0)

        cfg, one = self.config("quant_dp", "nf4", batch_size=6, grad_accum_steps=2)
        two_workers_equal_one_process(self, cfg, one)

        # Only the last block trains: the first, quantised too, is the frozen prefix, cached once.
        outs = {}
        for cache in ("memory", "off"):
            cfg, outs[cache] = self.config("quant_prefix_" + cache, "nf4", lora={"dropout": 0.0, "last_blocks": 1},
                                           data={"train": os.path.join(IMAGES, "toy", "train"),
                                                 "val": os.path.join(IMAGES, "toy", "val"), "workers": 2,
                                                 "prefix_cache": cache, "augment": {"enabled": False}})
            code, _, err = run("train", "--config", cfg)
            self.assertEqual(code, 0, err)
        self.assertLess(adapter_difference(os.path.join(outs["memory"], "adapter"), os.path.join(outs["off"], "adapter")),
                        1e-5)

    def test_plan_counts_quantised_weights_and_fit_quantises_only_when_nothing_else_fits(self):
        cfg, _ = self.config("quant_plan", "fp32", batch_size=1)
        frozen = {}
        for fmt in ("fp32", "int8", "nf4"):
            code, text, err = run("plan", "--config", cfg, "--set", "frozen_dtype=" + fmt, "--json")
            self.assertEqual(code, 0, err)
            frozen[fmt] = {item["name"]: item["bytes"] for item in json.loads(text)["items"]
                           if item["name"].startswith("frozen weights")}
        linear = [t for k, t in torch.jit.load(BASE).state_dict().items()
                  if ".encoder.layer." in k and k.endswith(".weight") and t.dim() == 2]
        dense = sum(t.numel() * 4 for t in linear)
        self.assertEqual(frozen["fp32"]["frozen weights (fp32)"] - frozen["int8"]["frozen weights (fp32)"], dense)
        self.assertEqual(frozen["int8"]["frozen weights (int8, quantised Linear weights)"],
                         dense // 4 + 4 * sum(t.shape[0] for t in linear))  # int8 values, an fp32 scale per row
        self.assertLess(frozen["nf4"]["frozen weights (nf4, quantised Linear weights)"], dense // 6)
        # A budget below every unquantised setting at micro-batch 1 (the config fixes fp32) but above int8 with
        # checkpointing.
        needs = {}
        for ckpt in ("true", "false"):
            for fmt in ("fp32", "int8"):
                code, text, _ = run("plan", "--config", cfg, "--json", "--set", "gradient_checkpointing=" + ckpt,
                                    "--set", "frozen_dtype=" + fmt)
                needs[ckpt, fmt] = json.loads(text)["total"] + json.loads(text)["host_buffers"]
        smallest_dense = min(v for k, v in needs.items() if k[1] == "fp32")
        quantised = needs["true", "int8"]
        self.assertLess(quantised, smallest_dense)
        budget = (smallest_dense + quantised) / 2 / 0.9
        code, text, err = run("plan", "--config", cfg, "--memory", f"{budget / 2**20:.5f}MB")
        self.assertEqual(code, 0, err + text)
        self.assertIn("--set frozen_dtype=int8", text)
        self.assertIn("frozen Linear weights quantised to int8 (each layer dequantises its weight when it runs): "
                      "nothing cheaper fits", text)
        self.assertIn("the plain one's", text)

    def test_settings_it_cannot_use_are_named_and_dora_layers_stay_dense(self):
        cfg, _ = self.config("quant_full", "nf4", method="full")
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 3, err)
        self.assertIn("frozen_dtype nf4 quantises the frozen base under adapters or prompts: set method to lora, vpt or adaptformer", err)
        # DoRA reads its layers' weights: those stay dense and are named, the others are quantised.
        cfg, _ = self.config("quant_dora", "int8", model=OTHER_BASE, lora={"variant": "dora", "dropout": 0.0}, epochs=1)
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertIn("quantised to int8: 6 layers", err)
        self.assertIn("2 Linear-shaped weights kept, e.g. model.blocks.0.attn.qkv (its weight is read by other code", err)


class Ssf(unittest.TestCase):
    """lora.variant ssf end to end: on int8 weights with checkpointing, in bf16, on two workers, planned; its file is
    loratune's own (no adapter_config.json: PEFT has no SSF), eval and merge agree with training."""

    def eval_loss(self, name, *args):
        return eval_loss(self, "ssf_" + name, *args)

    def test_quantised_training_eval_merge_and_info(self):
        cfg, out = write_config("ssf_int8", frozen_dtype="int8", gradient_checkpointing=True, epochs=2,
                                lora={"variant": "ssf"})
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertIn("quantised to int8: 12 layers", err)
        self.assertNotIn("dropout", err)  # SSF has none; nothing to warn about
        adapter = os.path.join(out, "adapter")
        self.assertFalse(os.path.exists(os.path.join(adapter, "adapter_config.json")))
        with open(os.path.join(out, "summary.json")) as f:
            val = json.load(f)["final_val_loss"]
        self.assertAlmostEqual(self.eval_loss("int8", "--model", BASE, "--adapter", adapter, "--frozen-dtype", "int8"),
                               val, delta=1e-5 * max(1.0, val))
        dense = self.eval_loss("dense", "--model", BASE, "--adapter", adapter)
        merged = os.path.join(TMP, "ssf_merged.pt")
        code, text, err = run("merge", "--base", BASE, "--adapter", adapter, "--output", merged)
        self.assertEqual(code, 0, err)
        self.assertAlmostEqual(self.eval_loss("merged", "--model", merged), dense, delta=1e-5 * max(1.0, dense))
        code, info, err = run("info", adapter)
        self.assertEqual(code, 0, err)
        self.assertIn("4 weights, variant ssf", info)
        self.assertIn("256 parameters", info)  # scale and shift of 32 rows, on q and v of 2 blocks
        self.assertIn("vit.encoder.layer.0.attention.attention.query [32x32] ssf", info)

    def test_bf16_two_workers_and_plan(self):
        cfg, out = write_config("ssf_bf16", precision="bf16", epochs=1, lora={"variant": "ssf"})
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        lines = metric_lines(out, "train")
        self.assertTrue(lines and all(np.isfinite(line["loss"]) for line in lines))
        cfg, one = write_config("ssf_dp", batch_size=6, grad_accum_steps=2, epochs=2,
                                model=os.path.join(FIX, "models", "torchvision_script.pt"), lora={"variant": "ssf"})
        two_workers_equal_one_process(self, cfg, one)
        code, text, err = run("plan", "--config", cfg, "--json")
        self.assertEqual(code, 0, err)
        items = {item["name"]: item for item in json.loads(text)["items"]}
        # q and v slices (32 rows each) of 2 blocks, scale and shift, and the head (3 x 32 + 3).
        self.assertIn("parameters: 355 x", items["trainable tensors, gradients, AdamW"]["detail"])


class Vpt(unittest.TestCase):
    """method vpt end to end, shallow and deep: eval gives training's validation loss; the merged file (prompts inside)
    scores the same, loads in Python and exports to ONNX (ONNX Runtime gives its logits); int8 weights, bf16, two
    workers and plan work as for adapters; MobileCLIP's convolutional stages are refused with the reason."""

    def eval_loss(self, name, *args):
        return eval_loss(self, "vpt_" + name, *args)

    def test_train_eval_merge_export(self):
        for deep in (False, True):
            with self.subTest(deep=deep):
                name = "vpt_deep" if deep else "vpt_shallow"
                cfg, out = write_config(name, model=OTHER_BASE, method="vpt", vpt={"tokens": 4, "deep": deep},
                                        epochs=2, optim={"lr": 0.01})
                code, _, err = run("train", "--config", cfg)
                self.assertEqual(code, 0, err)
                self.assertIn(f"VPT-{'deep' if deep else 'shallow'}: 4 prompt tokens before", err)
                adapter = os.path.join(out, "adapter")
                self.assertFalse(os.path.exists(os.path.join(adapter, "adapter_config.json")))
                tensors, _ = safetensors_lite.load(os.path.join(adapter, "adapter_model.safetensors"))
                self.assertEqual(sorted(k for k in tensors if k.startswith("prompt_embeddings")),
                                 ["prompt_embeddings.0", "prompt_embeddings.1"] if deep else ["prompt_embeddings"])
                with open(os.path.join(out, "summary.json")) as f:
                    val = json.load(f)["final_val_loss"]
                self.assertAlmostEqual(self.eval_loss(name, "--model", OTHER_BASE, "--adapter", adapter), val,
                                       delta=1e-5 * max(1.0, val))
                merged_file_scores_and_exports(self, adapter, os.path.join(TMP, name + "_merged.pt"), val,
                                               "prompt set(s) of 4 tokens kept inside the model", 5,
                                               lambda m: self.eval_loss(name + "_merged", "--model", m))
                code, info, err = run("info", adapter)
                self.assertEqual(code, 0, err)
                self.assertIn(f"VPT-{'deep' if deep else 'shallow'}: {2 if deep else 1} set(s) of 4 tokens x 32", info)

    def test_frozen_base_settings_and_refusals(self):
        # 10 tokens x 32 before each of 2 blocks, and the head (3 x 32 + 3).
        frozen_base_settings_train(self, "vpt", "vpt", 739)
        cfg, _ = write_config("vpt_mobileclip", method="vpt", model=os.path.join(FIX, "models", "mobileclip_trace.pt"))
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 3, err)
        self.assertIn("take 4-D inputs", err)
        cfg, _ = write_config("vpt_contrastive", method="vpt", loss="contrastive", head={"init": "zero_shot"})
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 3, err)
        self.assertIn("prompt tokens and AdaptFormer's adapters reach the image tower only", err)


class AdaptFormer(unittest.TestCase):
    """method adaptformer end to end: eval gives training's validation loss; the merged file (adapters inside the
    blocks' code) scores the same and exports to ONNX (ONNX Runtime gives its logits); int8 weights stay quantised
    beside the adapters; bf16, two workers and plan as for adapters; MobileCLIP's stages are refused."""

    def eval_loss(self, name, *args):
        return eval_loss(self, "af_" + name, *args)

    def test_train_eval_merge_export(self):
        cfg, out = write_config("af", model=OTHER_BASE, method="adaptformer", adaptformer={"bottleneck": 4}, epochs=2,
                                optim={"lr": 0.01})
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertIn("AdaptFormer: bottleneck 4, scale 0.1 beside the MLP of each of the 2 blocks", err)
        adapter = os.path.join(out, "adapter")
        self.assertFalse(os.path.exists(os.path.join(adapter, "adapter_config.json")))
        with open(os.path.join(out, "summary.json")) as f:
            val = json.load(f)["final_val_loss"]
        self.assertAlmostEqual(self.eval_loss("af", "--model", OTHER_BASE, "--adapter", adapter), val,
                               delta=1e-5 * max(1.0, val))
        merged_file_scores_and_exports(self, adapter, os.path.join(TMP, "af_merged.pt"), val,
                                       "AdaptFormer adapters of 2 blocks kept inside the model", 6,
                                       lambda m: self.eval_loss("af_merged", "--model", m))
        code, info, err = run("info", adapter)
        self.assertEqual(code, 0, err)
        self.assertIn("AdaptFormer beside the MLP of 2 blocks: bottleneck 4, scale 0.1, 584 parameters", info)
        code, info, err = run("info", OTHER_BASE, "--set", "method=adaptformer", "--set", "adaptformer.bottleneck=4")
        self.assertEqual(code, 0, err)
        self.assertIn("would train AdaptFormer adapters (bottleneck 4, scale 0.1) beside the MLP of each of 2 blocks, "
                      "584 parameters", info)

    def test_frozen_base_settings_and_refusals(self):
        # Down 64 x 32 + 64, Up 32 x 64 + 32 in each of 2 blocks (4192 each), and the head (3 x 32 + 3).
        frozen_base_settings_train(self, "adaptformer", "af", 8483)
        # The sequential form: the merged file scores as the adapter did; transformers' blocks refuse it with the reason.
        cfg, out = write_config("af_seq", method="adaptformer", model=OTHER_BASE, adaptformer={"sequential": True}, epochs=1)
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 0, err)
        self.assertIn("scale 0.1 after the MLP of each of the 2 blocks", err)
        merged = os.path.join(TMP, "af_seq_merged.pt")
        self.assertEqual(run("merge", "--base", OTHER_BASE, "--adapter", os.path.join(out, "adapter"), "--output", merged)[0], 0)
        self.assertAlmostEqual(self.eval_loss("af_seq_merged", "--model", merged),
                               self.eval_loss("af_seq", "--model", OTHER_BASE, "--adapter", os.path.join(out, "adapter")),
                               delta=1e-5)
        cfg, _ = write_config("af_seq_hf", method="adaptformer", adaptformer={"sequential": True})
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 3, err)
        self.assertIn("use the parallel form", err)
        cfg, _ = write_config("af_mobileclip", method="adaptformer", model=os.path.join(FIX, "models", "mobileclip_trace.pt"))
        code, _, err = run("train", "--config", cfg)
        self.assertEqual(code, 3, err)
        self.assertIn("take 4-D inputs", err)


if __name__ == "__main__":
    result = unittest.main(argv=[sys.argv[0], "-v", *sys.argv[3:]], exit=False).result
    shutil.rmtree(TMP, ignore_errors=True)
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
