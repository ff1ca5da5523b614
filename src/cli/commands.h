// The commands behind `loratune <command>`: each takes its options as a struct (defaults here) and returns the
// process exit code (see errors.h). apps/loratune/main.cpp only maps command-line flags onto these structs.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace loratune {

struct TrainCommand {
  std::string config;                 // JSON config (may be empty when --set gives everything)
  std::vector<std::string> overrides; // --set key=value
  bool resume = false;
  std::string fit_memory;             // e.g. 12GB: choose batch, accumulation, checkpointing, precision to fit
  int nproc = 1;                      // > 1: start this many local data-parallel workers (as torchrun would)
  std::vector<std::string> worker_args;  // the command line each worker gets (without --nproc)
};

struct PlanCommand {
  std::string config;
  std::vector<std::string> overrides;
  std::string memory;      // budget, e.g. 12GB: also choose the settings that fit
  bool table = false;      // standard architectures instead of a config
  bool json = false;
  int64_t classes = 0;     // head size; 0: the class folders of data.train (10 without one)
  std::string threads = "auto";  // CPU threads: auto (follow the load) or a count (0: one per core)
};

struct EvalCommand {
  std::string model;    // backbone bundle (with --adapter) or merged classifier
  std::string adapter;  // adapter directory or .safetensors
  std::string data;     // held-out photo folder
  bool zero_shot = false;       // no adapter: classify with the text encoder's class embeddings (CLIP models)
  std::string text_model;       // zero-shot: text encoder bundle (default: the one the model names)
  std::string class_names;      // zero-shot: JSON file mapping folder names to prompt names
  std::string retrieval;        // caption file: also image <-> text retrieval, base and adapted
  std::string caption_column;   // its text column (empty: the first of caption_columns())
  std::string frozen_dtype;     // int8 | nf4: the base's block Linear weights quantised, as a run trained them
  std::string output = "eval";
  bool report = false;          // also write report.html (the evaluation part of `loratune report`)
  std::string device = "auto", precision = "auto";
  int64_t batch_size = 32;
  int workers = 0;
  std::string threads = "auto";
};

struct PredictCommand {
  std::string model;
  std::vector<std::string> adapters;  // several: the base is loaded once and adapters are switched
  std::vector<std::string> inputs;    // image files or folders
  int64_t top_k = 3;
  std::string format = "table";       // table | json | csv
  std::string output;                 // file; empty: standard output
  std::string device = "auto", precision = "auto";
  int64_t batch_size = 32;
  std::string threads = "auto";
};

struct MergeCommand {
  std::string base, adapter, output;
  double strength = 1.0;
  bool features_only = false;
  std::string text_model;  // the text tower of an adapter trained with loss contrastive
  std::string threads = "auto";
};

struct ExportCommand {
  std::string model;    // a bundle: merged classifier, backbone, or the base of `adapter`
  std::string adapter;  // optional: merged into `model` on the fly
  std::string output;
  std::string format = "onnx";  // or "web": a folder with the ONNX file and a page that runs it in the browser
  bool features_only = false;  // with an adapter: the backbone (images -> features) instead of the classifier
  bool external_data = false;
  std::string precision = "fp32";  // or "fp16": weights and computation in float16
  std::string web_runtime;  // onnxruntime-web's dist folder (default: find_web_runtime)
  std::string threads = "auto";
};

struct InfoCommand {
  std::string path;                   // model bundle, merged classifier or adapter
  std::string config;                 // optional: show what this config would adapt
  std::vector<std::string> overrides;
  std::string threads = "auto";
};

struct ImportCommand {
  std::string source;      // checkpoint folder or hf:ORG/NAME[@REVISION] (local hub cache)
  std::string output;      // bundle file; a CLIP's text tower goes beside it as <stem>_text.pt
  int64_t image_size = 0;  // 0: the checkpoint's own
  bool no_text = false;    // skip a CLIP's text tower
  std::string threads = "auto";
};

struct ReportCommand {
  std::vector<std::string> sources;  // training run folders and evaluation folders (two: side by side)
  std::vector<std::string> evals;    // --eval: evaluation folders of the runs' adapters
  std::string output;  // a .html file, or a folder for report.html (+ PNG plots of one run); default: sources[0]
};

int run_train(const TrainCommand& command);
int run_eval(const EvalCommand& command);
int run_predict(const PredictCommand& command);
int run_merge(const MergeCommand& command);
int run_export(const ExportCommand& command);
int run_info(const InfoCommand& command);
int run_report(const ReportCommand& command);
int run_plan(const PlanCommand& command);
int run_import(const ImportCommand& command);

// Starts `workers` copies of this program with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
// MASTER_PORT) and `args`, waits for them, passes Ctrl-C on, stops the rest when one fails; returns the first failure.
int launch_local_workers(int workers, const std::vector<std::string>& args);

// Runs `body` and turns exceptions into one line on stderr and the documented exit code.
int guarded(const std::function<int()>& body);

// Reference of every training config key, for `loratune train --help-config`.
std::string train_config_help();

}  // namespace loratune
