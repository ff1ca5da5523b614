#include "cli/command_line.h"

#include <CLI/CLI.hpp>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "loratune/captions.h"
#include "common/strings.h"
#include "loratune/errors.h"
#include "loratune/import.h"

namespace loratune {
namespace {

// Every command's options as the parser fills them, and the command line itself.
struct Parsed {
  TrainCommand train;
  bool help_config = false;
  EvalCommand eval;
  PredictCommand predict;
  MergeCommand merge;
  ExportCommand export_;
  InfoCommand info;
  PlanCommand plan;
  ImportCommand import;
  ReportCommand report;
  std::vector<std::string> args;  // argv[1..]
};

// Adds a flag's CLI11 option, bound to its member of `Parsed`.
using Binder = std::function<CLI::Option*(CLI::App&, Parsed&, const std::string& names, const std::string& help)>;

// An option taking a value (a list member: repeatable).
template <typename Command, typename T>
Binder value(Command Parsed::*command, T Command::*member) {
  return [=](CLI::App& app, Parsed& p, const std::string& names, const std::string& help) {
    return app.add_option(names, (p.*command).*member, help);
  };
}

// A switch.
template <typename Command>
Binder on_off(Command Parsed::*command, bool Command::*member) {
  return [=](CLI::App& app, Parsed& p, const std::string& names, const std::string& help) {
    return app.add_flag(names, (p.*command).*member, help);
  };
}

// One flag (or positional argument) of a command: its names, meaning, binding and checks.
struct Flag {
  Flag(std::string names, std::string help, Binder bind)
      : names(std::move(names)), help(std::move(help)), bind(std::move(bind)) {}
  Flag& required() { return is_required = true, *this; }
  Flag& show_default() { return shows_default = true, *this; }
  Flag& type(std::string name) { return type_name = std::move(name), *this; }
  Flag& one_of(std::vector<std::string> values) { return choices = std::move(values), *this; }
  Flag& between(double low, double high) { return min = low, max = high, *this; }
  Flag& one_value_each() { return single_value = true, *this; }  // a list given as --set a --set b

  std::string names, help;
  Binder bind;
  bool is_required = false, shows_default = false, single_value = false;
  std::string type_name;
  std::vector<std::string> choices;
  double min = 0, max = 0;  // a range where min < max
};

struct Command {
  std::string name, summary;
  std::vector<Flag> flags;
  std::vector<std::string> examples;  // command lines, each with an optional "# comment"
  std::vector<std::string> notes;     // lines after the examples
  std::function<int(Parsed&)> run;
};

constexpr const char* kExitCodes =
    "Exit codes: 0 ok, 2 bad command line, 3 bad input (files, config, data), 4 the work failed, 130 interrupted.";

constexpr const char* kThreadsHelp =
    "CPU threads for compute: auto follows the machine's load (fewer threads while other programs are busy), a "
    "number pins it (0: one per core)";

template <typename C>
Flag threads_flag(C Parsed::*c) {
  return Flag("--threads", kThreadsHelp, value(c, &C::threads)).show_default();
}

// Where and how the commands that run a model on images (eval, predict) compute.
template <typename C>
std::vector<Flag> compute_flags(C Parsed::*c) {
  return {Flag("--device", "auto | cpu | cuda[:N]", value(c, &C::device)).show_default(),
          Flag("--precision", "auto | fp32 | bf16 | fp16", value(c, &C::precision)).show_default(),
          Flag("--batch-size", "images per batch", value(c, &C::batch_size)).show_default(), threads_flag(c)};
}

std::vector<Flag> operator+(std::vector<Flag> a, const std::vector<Flag>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

int usage_error(const std::string& message) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  return exit_code::kUsage;
}

// The table: every command, in the order of `loratune --help`.
std::vector<Command> commands() {
  const auto T = &Parsed::train;
  const auto E = &Parsed::eval;
  const auto P = &Parsed::predict;
  const auto M = &Parsed::merge;
  const auto X = &Parsed::export_;
  const auto I = &Parsed::info;
  const auto PL = &Parsed::plan;
  const auto IM = &Parsed::import;
  const auto R = &Parsed::report;
  const Binder help_config = [](CLI::App& app, Parsed& p, const std::string& names, const std::string& help) {
    return app.add_flag(names, p.help_config, help);
  };
  return {
      {"train", "train LoRA adapters (or a full fine-tune / linear probe) on a photo folder",
       {Flag("-c,--config", "JSON configuration (see --help-config for every key and default)", value(T, &TrainCommand::config)),
        Flag("--set", "override a config key: --set lora.rank=16 (repeatable)", value(T, &TrainCommand::overrides))
            .type("KEY=VALUE").one_value_each(),
        Flag("--resume", "continue the interrupted run in the config's output_dir", on_off(T, &TrainCommand::resume)),
        Flag("--help-config", "list every config key with its type, default and meaning", help_config),
        Flag("--nproc", "start N local data-parallel workers (as torchrun --nproc-per-node N would)",
             value(T, &TrainCommand::nproc)).between(1, 1024),
        Flag("--fit-memory", "memory to fit, e.g. 12GB: choose micro-batch, accumulation, checkpointing and precision "
             "(see plan)", value(T, &TrainCommand::fit_memory)).type("SIZE")},
       {"loratune train --config configs/vit_base.json",
        "loratune train --config configs/vit_base.json --set data.train=~/photos --set epochs=5",
        "loratune train --config configs/vit_base.json --resume      # after Ctrl-C",
        "loratune train --config configs/vit_base.json --fit-memory 12GB",
        "loratune train --config configs/vit_base.json --nproc 2      # two data-parallel workers",
        "torchrun --nproc-per-node 2 --no-python loratune train --config configs/vit_base.json"},
       {"Output (output_dir): best/ and adapter/ (adapters), checkpoint.safetensors, metrics.jsonl, config.json,",
        "summary.json, train.log. Ctrl-C finishes the current step, saves a checkpoint and prints how to resume."},
       [](Parsed& p) {
         if (p.help_config) {
           std::printf("Training configuration keys (JSON; nested keys as objects, e.g. {\"lora\": {\"rank\": 16}}):\n\n%s",
                       train_config_help().c_str());
           return exit_code::kOk;
         }
         if (p.train.config.empty() && p.train.overrides.empty())
           return usage_error("train needs --config FILE (or --set model=... --set data.train=...)");
         for (size_t k = 0; k < p.args.size(); ++k) {  // workers started by --nproc get the command line without it
           if (p.args[k] == "--nproc") ++k;
           else if (p.args[k].rfind("--nproc=", 0) != 0) p.train.worker_args.push_back(p.args[k]);
         }
         return run_train(p.train);
       }},
      {"eval", "accuracy, per-class metrics and a confusion matrix on a held-out photo folder",
       std::vector<Flag>{
           Flag("-m,--model", "backbone bundle (with --adapter) or merged classifier", value(E, &EvalCommand::model)).required(),
           Flag("-a,--adapter", "adapter folder or .safetensors from loratune train", value(E, &EvalCommand::adapter)),
           Flag("-d,--data", "held-out photo folder: one subfolder per class (required unless --retrieval)",
                value(E, &EvalCommand::data)),
           Flag("--zero-shot", "classify with a CLIP text encoder's class embeddings of this folder's classes; with "
                "--adapter the adapted towers (the text tower too when trained with loss contrastive)",
                on_off(E, &EvalCommand::zero_shot)),
           Flag("--text-model", "zero-shot: text encoder bundle (default: the one the model names)",
                value(E, &EvalCommand::text_model)),
           Flag("--class-names", "zero-shot: JSON file {\"folder\": \"name\" or [names]}", value(E, &EvalCommand::class_names)),
           Flag("--retrieval", "image <-> text retrieval on a caption file (metadata.jsonl, metadata.csv, CSV/TSV: as "
                "data.captions): recall@1/5/10 and mean rank, of the base and of the adapted towers; with --data "
                "besides the classification",
                value(E, &EvalCommand::retrieval)),
           Flag("--caption-column", "--retrieval: the caption column (default: the first of " +
                join(caption_columns(), ", ") + " the file has)", value(E, &EvalCommand::caption_column)),
           Flag("--frozen-dtype", "score the adapter on the base quantised as a run with that frozen_dtype trained it "
                "(default: the base as stored, as merge folds it)", value(E, &EvalCommand::frozen_dtype))
               .one_of({"int8", "nf4"}),
           Flag("-o,--output", "folder for metrics.json, predictions.csv, misclassified.csv, confusion_matrix.png",
                value(E, &EvalCommand::output)).show_default(),
           Flag("--report", "also write report.html there: numbers, confusion matrix, photos, calibration",
                on_off(E, &EvalCommand::report))} +
           compute_flags(E) +
           std::vector<Flag>{Flag("--workers", "decoding threads (0: one per core)", value(E, &EvalCommand::workers)).show_default()},
       {"loratune eval --model models/vit_base.pt --adapter runs/vit_base/best --data photos/test",
        "loratune eval --model vit_base_photos.pt --data photos/test --output eval_merged",
        "loratune eval --model models/mobileclip_s0_image.pt --zero-shot --data photos/test   # before any training",
        "loratune eval --model vit_base_photos.pt --data photos/test --report   # + eval/report.html",
        "loratune eval --model models/mobileclip_s0_image.pt --adapter runs/captions/best --data photos/test "
        "--retrieval photos/test/metadata.jsonl"},
       {},
       [](Parsed& p) {
         if (p.eval.data.empty() && p.eval.retrieval.empty())
           return usage_error("eval needs --data PHOTOS (or --retrieval CAPTIONS for retrieval alone)");
         return run_eval(p.eval);
       }},
      {"predict", "top-k labels for images, with one or several adapters on one base",
       std::vector<Flag>{
           Flag("-m,--model", "backbone bundle (with --adapter) or merged classifier", value(P, &PredictCommand::model)).required(),
           Flag("-a,--adapter", "adapter(s); several are switched on one loaded base (repeatable)",
                value(P, &PredictCommand::adapters)).one_value_each(),
           Flag("inputs", "image files or folders", value(P, &PredictCommand::inputs)).required(),
           Flag("-k,--top-k", "labels per image", value(P, &PredictCommand::top_k)).show_default(),
           Flag("-f,--format", "output format", value(P, &PredictCommand::format)).show_default().one_of({"table", "json", "csv"}),
           Flag("-o,--output", "write to this file instead of the terminal", value(P, &PredictCommand::output))} +
           compute_flags(P),
       {"loratune predict --model models/vit_base.pt --adapter runs/cats/best photo1.jpg photo2.jpg",
        "loratune predict --model models/vit_base.pt --adapter runs/cats/best --adapter runs/styles/best photos/ -f json"},
       {},
       [](Parsed& p) { return run_predict(p.predict); }},
      {"merge", "fold an adapter into its base: a drop-in TorchScript classifier",
       {Flag("-b,--base", "the base model bundle the adapter was trained on", value(M, &MergeCommand::base)).required(),
        Flag("-a,--adapter", "adapter folder or .safetensors", value(M, &MergeCommand::adapter)).required(),
        Flag("-o,--output", "TorchScript file to write", value(M, &MergeCommand::output)).required(),
        Flag("-s,--strength", "0..1: share of the weight update kept; a head trained from zero-shot moves by the same "
             "share (WiSE-FT: 0 is the zero-shot model)", value(M, &MergeCommand::strength)).show_default(),
        Flag("--features-only", "write a backbone bundle (images -> features) instead of a classifier",
             on_off(M, &MergeCommand::features_only)),
        Flag("--text-model", "an adapter trained with loss contrastive: the text tower it adapted (default: the one "
             "the base names); its merged copy is written as <output>_text.pt", value(M, &MergeCommand::text_model)),
        threads_flag(M)},
       {"loratune merge --base models/vit_base.pt --adapter runs/vit_base/best --output vit_base_photos.pt",
        "loratune merge --base models/vit_base.pt --adapter runs/vit_base/best --output half.pt --strength 0.5"},
       {"The merged file loads in Python with torch.jit.load(path) and maps normalised images [N,3,H,W] to logits."},
       [](Parsed& p) { return run_merge(p.merge); }},
      {"export", "write the model for other runtimes: ONNX (ONNX Runtime, phones, browsers), no Python",
       {Flag("-m,--model", "a merged classifier, a backbone bundle, or the base of --adapter",
             value(X, &ExportCommand::model)).required(),
        Flag("-a,--adapter", "adapter folder or .safetensors, merged into --model on the way",
             value(X, &ExportCommand::adapter)),
        Flag("-o,--output", "the .onnx file to write (--format web: the folder)", value(X, &ExportCommand::output))
            .required(),
        Flag("-f,--format", "onnx: one ONNX file; web: a folder with it and a page that classifies dropped photos in "
             "the browser (onnxruntime-web)", value(X, &ExportCommand::format)).show_default().one_of({"onnx", "web"}),
        Flag("--web-runtime", "--format web: onnxruntime-web's dist folder (default: $LORATUNE_ONNXRUNTIME_WEB or the "
             "one installed beside loratune)", value(X, &ExportCommand::web_runtime)),
        Flag("--features-only", "with --adapter: the backbone (images -> features) instead of the classifier",
             on_off(X, &ExportCommand::features_only)),
        Flag("--external-data", "tensors in <output>.data beside the model (needed over 2 GB)",
             on_off(X, &ExportCommand::external_data)),
        Flag("--precision", "fp32, or fp16: half the file, weights and computation in float16 (input and output stay "
             "float32)", value(X, &ExportCommand::precision)).show_default().one_of({"fp32", "fp16"}),
        threads_flag(X)},
       {"loratune export --model vit_base_photos.pt --output vit_base_photos.onnx",
        "loratune export --model models/vit_base.pt --adapter runs/vit_base/best --output photos.onnx",
        "loratune export --model vit_base_photos.pt --format web --output photos_page/   # then serve the folder"},
       {"The ONNX file maps normalised images [N,3,S,S] (N free) to logits or features; its metadata_props hold the "
        "preprocessing (mean, std, image_size, resize_size, interpolation) and the class names."},
       [](Parsed& p) { return run_export(p.export_); }},
      {"info", "describe a model bundle or an adapter; show what a config would adapt",
       {Flag("path", "model bundle (.pt), merged classifier, or adapter (folder or .safetensors)",
             value(I, &InfoCommand::path)).required(),
        Flag("-c,--config", "training config whose LoRA settings to resolve on this model", value(I, &InfoCommand::config)),
        Flag("--set", "config overrides, e.g. --set lora.targets='[\"qkv:q,k,v\"]'", value(I, &InfoCommand::overrides))
            .type("KEY=VALUE").one_value_each(),
        threads_flag(I)},
       {"loratune info models/vit_base.pt",
        "loratune info models/vit_base.pt --set lora.rank=16 --set 'lora.targets=[\"query\",\"value\",\"dense\"]'",
        "loratune info runs/vit_base/best"},
       {},
       [](Parsed& p) { return run_info(p.info); }},
      {"report", "one HTML page of runs and evaluations (curves, per-class table, confusion matrix, misclassified "
       "photos, calibration), two side by side; a run's PNG plots",
       {Flag("sources", "training run folders (output_dir) and evaluation folders (eval --output); two are compared "
             "side by side", value(R, &ReportCommand::sources)).required(),
        Flag("-e,--eval", "an evaluation folder of the run's adapter (repeatable)", value(R, &ReportCommand::evals)),
        Flag("-o,--output", "a .html file, or a folder for report.html and one run's PNG plots (default: the first "
             "source)", value(R, &ReportCommand::output))},
       {"loratune report runs/vit_base                                   # runs/vit_base/report.html + PNG plots",
        "loratune eval --model models/vit_base.pt --adapter runs/vit_base/best --data photos/test --output eval/vit",
        "loratune report runs/vit_base --eval eval/vit --output vit_base.html",
        "loratune report eval/lora eval/full --output compare.html        # two adapters on the same photos"},
       {},
       [](Parsed& p) { return run_report(p.report); }},
      {"plan", "predict a run's peak memory; choose the settings that fit a memory size",
       {Flag("-c,--config", "training config to plan", value(PL, &PlanCommand::config)),
        Flag("--set", "override a config key (repeatable)", value(PL, &PlanCommand::overrides)).type("KEY=VALUE").one_value_each(),
        Flag("--memory", "memory you have, e.g. 12GB (GB = 2^30 bytes): print the --set overrides that fit",
             value(PL, &PlanCommand::memory)).type("SIZE"),
        Flag("--table", "largest batches for standard ViT and MobileCLIP shapes (no model file needed)",
             on_off(PL, &PlanCommand::table)),
        Flag("--json", "machine-readable prediction", on_off(PL, &PlanCommand::json)),
        Flag("--classes", "head size (default: the class folders of data.train, else 10)",
             value(PL, &PlanCommand::classes)).between(1, 1000000),
        threads_flag(PL)},
       {"loratune plan --config configs/vit_base.json", "loratune plan --config configs/vit_base.json --memory 12GB",
        "loratune plan --table --memory 12GB"},
       {"The prediction measures two small training steps (2 and 4 images) on the config's device and extends them",
        "linearly; --table computes from standard shapes for a CUDA GPU."},
       [](Parsed& p) {
         if (!p.plan.table && p.plan.config.empty() && p.plan.overrides.empty())
           return usage_error("plan needs --config FILE (or --table)");
         return run_plan(p.plan);
       }},
      {"import", "turn a downloaded checkpoint folder (transformers, timm, open_clip) into a model bundle, without Python",
       {Flag("source", "checkpoint folder, or hf:ORG/NAME[@REVISION] from the local hub cache",
             value(IM, &ImportCommand::source)).required(),
        Flag("-o,--output", "bundle file to write (a CLIP's text tower: <name>_text.pt beside it)",
             value(IM, &ImportCommand::output)).required(),
        Flag("--image-size", "input size (default: the checkpoint's); position tables are resampled",
             value(IM, &ImportCommand::image_size)),
        Flag("--no-text", "skip a CLIP's text tower", on_off(IM, &ImportCommand::no_text)), threads_flag(IM)},
       {"hf download google/vit-base-patch16-224-in21k        # once, with the hub's own tool",
        "loratune import hf:google/vit-base-patch16-224-in21k --output models/vit_base.pt",
        "loratune import ~/models/dinov2-small --output models/dinov2_small.pt --image-size 224",
        "loratune import hf:openai/clip-vit-base-patch32 --output models/clip_b32.pt   # + clip_b32_text.pt"},
       {"Every command that takes a model file also takes the folder or hf: id directly (imported in memory).",
        "Families: " + supported_checkpoint_families()},
       [](Parsed& p) { return run_import(p.import); }},
  };
}

std::string footer(const std::vector<std::string>& examples, const std::vector<std::string>& notes) {
  std::string out = "\nExamples:\n";
  for (const auto& e : examples) out += "  " + e + "\n";
  for (const auto& n : notes) out += n + "\n";
  return out + kExitCodes;
}

void add_flag(CLI::App& app, Parsed& parsed, const Flag& f) {
  CLI::Option* o = f.bind(app, parsed, f.names, f.help);
  if (f.is_required) o->required();
  if (f.shows_default) o->capture_default_str();
  if (!f.type_name.empty()) o->type_name(f.type_name);
  if (!f.choices.empty()) o->check(CLI::IsMember(f.choices));
  if (f.min < f.max) o->check(CLI::Range(f.min, f.max));
  if (f.single_value) o->allow_extra_args(false);
}

// The option's names as a user types them ("-m, --model"), or a positional's name.
std::string shown_names(const CLI::Option& o) {
  if (o.nonpositional()) {
    std::vector<std::string> names;
    for (const auto& s : o.get_snames()) names.push_back("-" + s);
    for (const auto& l : o.get_lnames()) names.push_back("--" + l);
    return join(names, ", ");
  }
  return o.get_name(true);
}

// The flags of a subcommand, --help left out.
std::vector<const CLI::Option*> flags_of(const CLI::App& sub) {
  std::vector<const CLI::Option*> out;
  for (const CLI::Option* o : sub.get_options())
    if (o != sub.get_help_ptr()) out.push_back(o);
  return out;
}

// "-f,--format" -> {"-f", "--format"}.
std::vector<std::string> flag_names(const std::string& names) {
  std::vector<std::string> out(1);
  for (char c : names) {
    if (c == ',') out.emplace_back();
    else out.back().push_back(c);
  }
  return out;
}

std::string markdown_cell(const std::string& s) {
  std::string out;
  for (char c : s) out += c == '|' ? std::string("\\|") : std::string(1, c);
  return out;
}

// docs/commands.md: every command, its flags (with defaults and allowed values) and examples.
std::string reference(const CLI::App& app, const std::vector<Command>& table) {
  std::string out = "# loratune commands\n\nGenerated by `loratune --reference` from the command table "
                    "(src/cli/command_line.cpp); the `command_reference_is_current` test keeps it so.\n";
  for (const Command& c : table) {
    const auto options = flags_of(*app.get_subcommand(c.name));  // in the order of c.flags
    out += "\n## loratune " + c.name + "\n\n" + c.summary + ".\n\n| flag | meaning | default |\n|---|---|---|\n";
    for (size_t k = 0; k < c.flags.size(); ++k) {
      const Flag& f = c.flags[k];
      std::string meaning = f.help;
      if (!f.choices.empty()) meaning += "; one of: " + join(f.choices, ", ");
      if (f.min < f.max)
        meaning += "; " + std::to_string(static_cast<long long>(f.min)) + " to " + std::to_string(static_cast<long long>(f.max));
      if (f.is_required) meaning += " (required)";
      out += "| `" + shown_names(*options[k]) + "` | " + markdown_cell(meaning) + " | " +
             markdown_cell(options[k]->get_default_str()) + " |\n";
    }
    out += "\n```\n";
    for (const auto& e : c.examples) out += e + "\n";
    out += "```\n";
    for (const auto& n : c.notes) out += "\n" + n;
    if (!c.notes.empty()) out += "\n";
  }
  return out;
}

// A bash completion script: commands, each command's flags, the values of flags with a fixed set, files otherwise.
std::string bash_completion(const CLI::App& app, const std::vector<Command>& table) {
  std::vector<std::string> names;
  for (const Command& c : table) names.push_back(c.name);
  std::string cases, values;
  for (const Command& c : table) {
    std::vector<std::string> flags;
    for (const CLI::Option* o : flags_of(*app.get_subcommand(c.name))) {
      if (!o->nonpositional()) continue;
      for (const auto& l : o->get_lnames()) flags.push_back("--" + l);
    }
    for (const Flag& f : c.flags)
      if (!f.choices.empty())
        for (const std::string& name : flag_names(f.names))
          values += "    \"" + c.name + " " + name + "\") COMPREPLY=($(compgen -W \"" + join(f.choices, " ") +
                    "\" -- \"$cur\")); return ;;\n";
    cases += "    " + c.name + ") opts=\"" + join(flags, " ") + " --help\" ;;\n";
  }
  return "# bash completion for loratune: source <(loratune --completion bash)\n"
         "_loratune() {\n"
         "  local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} opts=\"\"\n"
         "  if [ \"$COMP_CWORD\" -eq 1 ]; then\n"
         "    COMPREPLY=($(compgen -W \"" + join(names, " ") + " --help --version --completion --reference\" -- \"$cur\"))\n"
         "    return\n"
         "  fi\n"
         "  case \"${COMP_WORDS[1]} $prev\" in\n" + values +
         "  esac\n"
         "  case \"${COMP_WORDS[1]}\" in\n" + cases +
         "  esac\n"
         "  if [[ \"$cur\" == -* ]]; then COMPREPLY=($(compgen -W \"$opts\" -- \"$cur\")); else COMPREPLY=($(compgen -f -- \"$cur\")); fi\n"
         "}\n"
         "complete -o filenames -F _loratune loratune\n";
}

}  // namespace

int run_command_line(int argc, char** argv) {
  const std::vector<Command> table = commands();
  Parsed parsed;
  for (int k = 1; k < argc; ++k) parsed.args.push_back(argv[k]);

  CLI::App app{"loratune " LORATUNE_VERSION
               ": adapt pretrained vision models (ViT, MobileCLIP) to your own photos with LoRA, on one consumer GPU or "
               "a CPU."};
  app.set_version_flag("--version", std::string("loratune ") + LORATUNE_VERSION);
  app.require_subcommand(0, 1);
  std::string completion;
  bool show_reference = false;
  app.add_option("--completion", completion, "print a completion script: source <(loratune --completion bash)")
      ->check(CLI::IsMember({"bash"}));
  app.add_flag("--reference", show_reference, "print every command and flag as Markdown (docs/commands.md)");
  app.footer(footer({"loratune train --config configs/vit_base.json",
                     "loratune eval --model models/vit_base.pt --adapter runs/vit_base/best --data photos/test",
                     "loratune merge --base models/vit_base.pt --adapter runs/vit_base/best --output vit_base_photos.pt"},
                    {"Run `loratune <command> --help` for the options of each command."}));

  // Each subcommand runs its own handler; one without a handler leaves `exit_code` unset and is reported.
  int status = -1;
  for (const Command& c : table) {
    CLI::App* sub = app.add_subcommand(c.name, c.summary);
    for (const Flag& f : c.flags) add_flag(*sub, parsed, f);
    sub->footer(footer(c.examples, c.notes));
    sub->callback([&parsed, &status, run = c.run] { status = run(parsed); });
  }

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
    return exit_code::kUsage;
  }
  if (!completion.empty() || show_reference) {
    std::fputs((show_reference ? reference(app, table) : bash_completion(app, table)).c_str(), stdout);
    return exit_code::kOk;
  }
  if (app.get_subcommands().empty())
    return usage_error("a command is required\nRun `loratune --help` for the commands.");
  if (status < 0) {
    std::fprintf(stderr, "error: internal: the command has no handler\n");
    return exit_code::kRuntime;
  }
  return status;
}

}  // namespace loratune
