// loratune: LoRA fine-tuning of pretrained vision models on your own photos. This file only maps command-line flags
// onto the command structs of src/cli/commands.h; defaults live there.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "loratune/cpu_allocator.h"
#include "loratune/errors.h"
#include "loratune/import.h"

namespace {

constexpr const char* kExitCodes =
    "\nExit codes: 0 ok, 2 bad command line, 3 bad input (files, config, data), 4 the work failed, 130 interrupted.";

std::string footer(const std::string& examples) { return "\nExamples:\n" + examples + kExitCodes; }

constexpr const char* kThreadsHelp =
    "CPU threads for compute: auto follows the machine's load (fewer threads while other programs are busy), a "
    "number pins it (0: one per core)";

// Where and how the commands that run a model on images (eval, predict) compute.
template <typename Command>
void add_compute_options(CLI::App* command, Command& options) {
  command->add_option("--device", options.device, "auto | cpu | cuda[:N]")->capture_default_str();
  command->add_option("--precision", options.precision, "auto | fp32 | bf16 | fp16")->capture_default_str();
  command->add_option("--batch-size", options.batch_size, "images per batch")->capture_default_str();
  command->add_option("--threads", options.threads, kThreadsHelp)->capture_default_str();
}

}  // namespace

int main(int argc, char** argv) {
  loratune::install_caching_cpu_allocator();
  CLI::App app{"loratune " LORATUNE_VERSION
               ": adapt pretrained vision models (ViT, MobileCLIP) to your own photos with LoRA, on one consumer GPU or "
               "a CPU."};
  app.set_version_flag("--version", std::string("loratune ") + LORATUNE_VERSION);
  app.require_subcommand(1);
  app.footer(footer(
      "  loratune train --config configs/vit_base.json\n"
      "  loratune eval --model models/vit_base.pt --adapter runs/vit_base/best --data photos/test\n"
      "  loratune merge --base models/vit_base.pt --adapter runs/vit_base/best --output vit_base_photos.pt\n"
      "Run `loratune <command> --help` for the options of each command."));

  loratune::TrainCommand train;
  bool help_config = false;
  auto* t = app.add_subcommand("train", "train LoRA adapters (or a full fine-tune / linear probe) on a photo folder");
  t->add_option("-c,--config", train.config, "JSON configuration (see --help-config for every key and default)");
  t->add_option("--set", train.overrides, "override a config key: --set lora.rank=16 (repeatable)")->type_name("KEY=VALUE")->allow_extra_args(false);
  t->add_flag("--resume", train.resume, "continue the interrupted run in the config's output_dir");
  t->add_flag("--help-config", help_config, "list every config key with its type, default and meaning");
  t->add_option("--nproc", train.nproc, "start N local data-parallel workers (as torchrun --nproc-per-node N would)")
      ->check(CLI::Range(1, 1024));
  t->add_option("--fit-memory", train.fit_memory,
                "memory to fit, e.g. 12GB: choose micro-batch, accumulation, checkpointing and precision (see plan)")
      ->type_name("SIZE");
  t->footer(footer(
      "  loratune train --config configs/vit_base.json\n"
      "  loratune train --config configs/vit_base.json --set data.train=~/photos --set epochs=5\n"
      "  loratune train --config configs/vit_base.json --resume      # after Ctrl-C\n"
      "  loratune train --config configs/vit_base.json --fit-memory 12GB\n"
      "  loratune train --config configs/vit_base.json --nproc 2      # two data-parallel workers\n"
      "  torchrun --nproc-per-node 2 --no-python loratune train --config configs/vit_base.json\n"
      "Output (output_dir): best/ and adapter/ (adapters), checkpoint.safetensors, metrics.jsonl, config.json,\n"
      "summary.json, train.log. Ctrl-C finishes the current step, saves a checkpoint and prints how to resume."));

  loratune::EvalCommand eval;
  auto* e = app.add_subcommand("eval", "accuracy, per-class metrics and a confusion matrix on a held-out photo folder");
  e->add_option("-m,--model", eval.model, "backbone bundle (with --adapter) or merged classifier")->required();
  e->add_option("-a,--adapter", eval.adapter, "adapter folder or .safetensors from loratune train");
  e->add_option("-d,--data", eval.data, "held-out photo folder: one subfolder per class")->required();
  e->add_flag("--zero-shot", eval.zero_shot, "classify with a CLIP text encoder's class embeddings of this folder's "
              "classes; with --adapter the adapted towers (the text tower too when trained with loss contrastive)");
  e->add_option("--text-model", eval.text_model, "zero-shot: text encoder bundle (default: the one the model names)");
  e->add_option("--class-names", eval.class_names, "zero-shot: JSON file {\"folder\": \"name\" or [names]}");
  e->add_option("--frozen-dtype", eval.frozen_dtype,
                "int8 | nf4: score the adapter on the base quantised as a run with that frozen_dtype trained it "
                "(default: the base as stored, as merge folds it)")
      ->check(CLI::IsMember({"int8", "nf4"}));
  e->add_option("-o,--output", eval.output,
                "folder for metrics.json, predictions.csv, misclassified.csv, confusion_matrix.png")->capture_default_str();
  e->add_flag("--report", eval.report, "also write report.html there: numbers, confusion matrix, photos, calibration");
  add_compute_options(e, eval);
  e->add_option("--workers", eval.workers, "decoding threads (0: one per core)")->capture_default_str();
  e->footer(footer(
      "  loratune eval --model models/vit_base.pt --adapter runs/vit_base/best --data photos/test\n"
      "  loratune eval --model vit_base_photos.pt --data photos/test --output eval_merged\n"
      "  loratune eval --model models/mobileclip_s0_image.pt --zero-shot --data photos/test   # before any training\n"
      "  loratune eval --model vit_base_photos.pt --data photos/test --report   # + eval/report.html"));

  loratune::PredictCommand predict;
  auto* p = app.add_subcommand("predict", "top-k labels for images, with one or several adapters on one base");
  p->add_option("-m,--model", predict.model, "backbone bundle (with --adapter) or merged classifier")->required();
  p->add_option("-a,--adapter", predict.adapters, "adapter(s); several are switched on one loaded base (repeatable)")->allow_extra_args(false);
  p->add_option("inputs", predict.inputs, "image files or folders")->required();
  p->add_option("-k,--top-k", predict.top_k, "labels per image")->capture_default_str();
  p->add_option("-f,--format", predict.format, "table | json | csv")->capture_default_str();
  p->add_option("-o,--output", predict.output, "write to this file instead of the terminal");
  add_compute_options(p, predict);
  p->footer(footer(
      "  loratune predict --model models/vit_base.pt --adapter runs/cats/best photo1.jpg photo2.jpg\n"
      "  loratune predict --model models/vit_base.pt --adapter runs/cats/best --adapter runs/styles/best photos/ -f json"));

  loratune::MergeCommand merge;
  auto* m = app.add_subcommand("merge", "fold an adapter into its base: a drop-in TorchScript classifier");
  m->add_option("-b,--base", merge.base, "the base model bundle the adapter was trained on")->required();
  m->add_option("-a,--adapter", merge.adapter, "adapter folder or .safetensors")->required();
  m->add_option("-o,--output", merge.output, "TorchScript file to write")->required();
  m->add_option("-s,--strength", merge.strength, "0..1: share of the weight update kept; a head trained from zero-shot moves by the same share (WiSE-FT: 0 is the zero-shot model)")
      ->capture_default_str();
  m->add_flag("--features-only", merge.features_only, "write a backbone bundle (images -> features) instead of a classifier");
  m->add_option("--text-model", merge.text_model, "an adapter trained with loss contrastive: the text tower it adapted "
                "(default: the one the base names); its merged copy is written as <output>_text.pt");
  m->add_option("--threads", merge.threads, kThreadsHelp)->capture_default_str();
  m->footer(footer(
      "  loratune merge --base models/vit_base.pt --adapter runs/vit_base/best --output vit_base_photos.pt\n"
      "  loratune merge --base models/vit_base.pt --adapter runs/vit_base/best --output half.pt --strength 0.5\n"
      "The merged file loads in Python with torch.jit.load(path) and maps normalised images [N,3,H,W] to logits."));

  loratune::InfoCommand info;
  auto* i = app.add_subcommand("info", "describe a model bundle or an adapter; show what a config would adapt");
  i->add_option("path", info.path, "model bundle (.pt), merged classifier, or adapter (folder or .safetensors)")->required();
  i->add_option("-c,--config", info.config, "training config whose LoRA settings to resolve on this model");
  i->add_option("--set", info.overrides, "config overrides, e.g. --set lora.targets='[\"qkv:q,k,v\"]'")->type_name("KEY=VALUE")->allow_extra_args(false);
  i->add_option("--threads", info.threads, kThreadsHelp)->capture_default_str();
  i->footer(footer(
      "  loratune info models/vit_base.pt\n"
      "  loratune info models/vit_base.pt --set lora.rank=16 --set 'lora.targets=[\"query\",\"value\",\"dense\"]'\n"
      "  loratune info runs/vit_base/best"));

  loratune::PlanCommand plan;
  auto* pl = app.add_subcommand("plan", "predict a run's peak memory; choose the settings that fit a memory size");
  pl->add_option("-c,--config", plan.config, "training config to plan");
  pl->add_option("--set", plan.overrides, "override a config key (repeatable)")->type_name("KEY=VALUE")->allow_extra_args(false);
  pl->add_option("--memory", plan.memory, "memory you have, e.g. 12GB (GB = 2^30 bytes): print the --set overrides that fit")
      ->type_name("SIZE");
  pl->add_flag("--table", plan.table, "largest batches for standard ViT and MobileCLIP shapes (no model file needed)");
  pl->add_flag("--json", plan.json, "machine-readable prediction");
  pl->add_option("--classes", plan.classes, "head size (default: the class folders of data.train, else 10)")
      ->check(CLI::Range(int64_t{1}, int64_t{1000000}));
  pl->add_option("--threads", plan.threads, kThreadsHelp)->capture_default_str();
  pl->footer(footer(
      "  loratune plan --config configs/vit_base.json\n"
      "  loratune plan --config configs/vit_base.json --memory 12GB\n"
      "  loratune plan --table --memory 12GB\n"
      "The prediction measures two small training steps (2 and 4 images) on the config's device and extends them\n"
      "linearly; --table computes from standard shapes for a CUDA GPU."));

  loratune::ImportCommand import;
  auto* im = app.add_subcommand("import", "turn a downloaded checkpoint folder (transformers, timm, open_clip) into a "
                                          "model bundle, without Python");
  im->add_option("source", import.source, "checkpoint folder, or hf:ORG/NAME[@REVISION] from the local hub cache")
      ->required();
  im->add_option("-o,--output", import.output, "bundle file to write (a CLIP's text tower: <name>_text.pt beside it)")
      ->required();
  im->add_option("--image-size", import.image_size, "input size (default: the checkpoint's); position tables are resampled");
  im->add_flag("--no-text", import.no_text, "skip a CLIP's text tower");
  im->add_option("--threads", import.threads, kThreadsHelp)->capture_default_str();
  im->footer(footer(
      "  hf download google/vit-base-patch16-224-in21k        # once, with the hub's own tool\n"
      "  loratune import hf:google/vit-base-patch16-224-in21k --output models/vit_base.pt\n"
      "  loratune import ~/models/dinov2-small --output models/dinov2_small.pt --image-size 224\n"
      "  loratune import hf:openai/clip-vit-base-patch32 --output models/clip_b32.pt   # + clip_b32_text.pt\n"
      "Every command that takes a model file also takes the folder or hf: id directly (imported in memory).\n"
      "Families: " + loratune::supported_checkpoint_families()));

  loratune::ReportCommand report;
  auto* r = app.add_subcommand("report", "one HTML page of runs and evaluations (curves, per-class table, confusion "
                               "matrix, misclassified photos, calibration), two side by side; a run's PNG plots");
  r->add_option("sources", report.sources, "training run folders (output_dir) and evaluation folders (eval --output); "
                "two are compared side by side")->required();
  r->add_option("-e,--eval", report.evals, "an evaluation folder of the run's adapter (repeatable)");
  r->add_option("-o,--output", report.output, "a .html file, or a folder for report.html and one run's PNG plots "
                "(default: the first source)");
  r->footer(footer(
      "  loratune report runs/vit_base                                   # runs/vit_base/report.html + PNG plots\n"
      "  loratune eval --model models/vit_base.pt --adapter runs/vit_base/best --data photos/test --output eval/vit\n"
      "  loratune report runs/vit_base --eval eval/vit --output vit_base.html\n"
      "  loratune report eval/lora eval/full --output compare.html        # two adapters on the same photos"));

  // Each subcommand runs its own handler; one without a handler leaves `exit_code` unset and is reported.
  int exit_code = -1;
  t->callback([&] {
    if (help_config) {
      std::printf("Training configuration keys (JSON; nested keys as objects, e.g. {\"lora\": {\"rank\": 16}}):\n\n%s",
                  loratune::train_config_help().c_str());
      exit_code = loratune::exit_code::kOk;
    } else if (train.config.empty() && train.overrides.empty()) {
      std::fprintf(stderr, "error: train needs --config FILE (or --set model=... --set data.train=...)\n");
      exit_code = loratune::exit_code::kUsage;
    } else {
      // Workers started by --nproc get the same command line without it.
      for (int k = 1; k < argc; ++k) {
        const std::string arg = argv[k];
        if (arg == "--nproc") ++k;
        else if (arg.rfind("--nproc=", 0) != 0) train.worker_args.push_back(arg);
      }
      exit_code = loratune::run_train(train);
    }
  });
  e->callback([&] { exit_code = loratune::run_eval(eval); });
  p->callback([&] { exit_code = loratune::run_predict(predict); });
  m->callback([&] { exit_code = loratune::run_merge(merge); });
  i->callback([&] { exit_code = loratune::run_info(info); });
  r->callback([&] { exit_code = loratune::run_report(report); });
  im->callback([&] { exit_code = loratune::run_import(import); });
  pl->callback([&] {
    if (!plan.table && plan.config.empty() && plan.overrides.empty()) {
      std::fprintf(stderr, "error: plan needs --config FILE (or --table)\n");
      exit_code = loratune::exit_code::kUsage;
    } else {
      exit_code = loratune::run_plan(plan);
    }
  });

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& ex) {
    return app.exit(ex);
  } catch (const CLI::CallForAllHelp& ex) {
    return app.exit(ex);
  } catch (const CLI::CallForVersion& ex) {
    return app.exit(ex);
  } catch (const CLI::ParseError& ex) {
    std::fprintf(stderr, "error: %s\nRun `loratune --help` or `loratune <command> --help` for usage.\n", ex.what());
    return loratune::exit_code::kUsage;
  }
  if (exit_code < 0) {
    std::fprintf(stderr, "error: internal: the command has no handler\n");
    return loratune::exit_code::kRuntime;
  }
  return exit_code;
}
