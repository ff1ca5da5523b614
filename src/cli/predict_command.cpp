#include <ATen/core/grad_mode.h>
#include <spdlog/spdlog.h>

#include <sstream>

#include "cli/common.h"
#include "cli/commands.h"
#include "loratune/device.h"
#include "loratune/threads.h"
#include "loratune/errors.h"
#include "common/files.h"
#include "common/output_paths.h"
#include "loratune/memory.h"
#include "common/strings.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace loratune {
namespace {

// Image files named on the command line, folders expanded (sorted, recursive).
ImageFolder collect_inputs(const std::vector<std::string>& inputs) {
  ImageFolder f;
  f.classes = {""};
  const auto& ext = image_extensions();
  auto add = [&](const fs::path& p) {
    const std::string e = to_lower(p.extension().string());
    if (std::find(ext.begin(), ext.end(), e) == ext.end()) return f.skipped.push_back({p.string(), "not an image (extension)"});
    const std::string problem = quick_image_check(p);
    if (problem.empty()) f.samples.push_back({p, 0});
    else f.skipped.push_back({p.string(), problem});
  };
  for (const auto& in : inputs) {
    if (fs::is_directory(in)) {
      std::vector<fs::path> files;
      for (const auto& e : fs::recursive_directory_iterator(in))
        if (e.is_regular_file()) files.push_back(e.path());
      std::sort(files.begin(), files.end());
      for (const auto& p : files) add(p);
    } else if (fs::exists(in)) {
      add(in);
    } else {
      throw InputError("input " + in + " does not exist");
    }
  }
  if (f.samples.empty()) throw InputError("no readable images among the inputs");
  return f;
}

// One prediction pass: the adapter (or merged model) it ran, its classes and its predictions.
struct Pass {
  std::string name;
  std::vector<std::string> classes;
  Predictions predictions;
};

// A merged classifier: one pass.
Pass predict_merged(Bundle bundle, const std::string& path, ImageBatchSource& source, const c10::Device& device,
                    Precision precision, ThreadTuner& threads) {
  auto module = bundle.module;
  module.to(device);
  return {fs::path(path).filename().string(), bundle.info.classes,
          predict_all([&](const at::Tensor& x) { return module.forward({x}).toTensor(); }, source, device, precision, "",
                      &threads)};
}

// A backbone and its adapters: the base is loaded once; every adapter's module types are prepared before the first
// forward, then adapters are switched by rebinding their tensors. Adapters that replace base weights (method full)
// are undone after their pass.
std::vector<Pass> predict_adapters(Bundle bundle, const std::vector<std::string>& paths, ImageBatchSource& source,
                                   const c10::Device& device, Precision precision, ThreadTuner& threads) {
  std::vector<Adapter> adapters;
  for (const auto& path : paths) adapters.push_back(load_adapter(path));
  Model model(std::move(bundle));
  for (size_t i = 0; i < adapters.size(); ++i) {
    check_adapter_base(adapters[i], model.bundle(), paths[i]);
    model.prepare_adapters(bind_targets(adapters[i], model.bundle(), paths[i]));
  }
  std::map<std::string, at::Tensor> original;
  for (const auto& p : model.module().named_parameters()) original[p.name] = p.value.detach().clone();
  model.to(device);
  std::vector<Pass> passes;
  for (size_t i = 0; i < adapters.size(); ++i) {
    apply_adapter(model, adapters[i], paths[i]);
    model.set_training(false);
    passes.push_back({paths[i], adapters[i].classes,
                      predict_all([&](const at::Tensor& x) { return model.logits(x); }, source, device, precision, "",
                                  &threads)});
    if (!adapters[i].full_weights.empty()) {
      at::NoGradGuard no_grad;
      for (const auto& p : model.module().named_parameters()) p.value.copy_(original.at(p.name));
    }
  }
  return passes;
}

// The top-k classes of every image of every pass, as a table, JSON or CSV.
std::string format_predictions(const std::vector<Pass>& passes, const ImageFolder& inputs, int64_t top_k,
                               const std::string& format) {
  json all = json::array();
  std::vector<std::vector<std::string>> rows;
  std::string csv = "adapter,path,rank,label,probability\n";
  for (const auto& pass : passes) {
    const at::Tensor probs = pass.predictions.logits.softmax(1);
    const int64_t k = std::min<int64_t>(top_k, probs.size(1));
    const auto [top_p, top_label] = probs.topk(k, 1);
    const at::Tensor top_p64 = top_p.to(at::kDouble);
    const auto p = top_p64.accessor<double, 2>();
    const auto label = top_label.accessor<int64_t, 2>();
    for (int64_t i = 0; i < probs.size(0); ++i) {
      const std::string path = inputs.samples[pass.predictions.indices[i]].path.string();
      json preds = json::array();
      std::string cell;
      for (int64_t r = 0; r < k; ++r) {
        const std::string& name = pass.classes[label[i][r]];
        preds.push_back({{"label", name}, {"probability", p[i][r]}});
        cell += (r ? ", " : "") + name + " " + percent(p[i][r], 1);
        char prob[16];
        std::snprintf(prob, sizeof prob, "%.6f", p[i][r]);
        csv += csv_field(pass.name) + "," + csv_field(path) + "," + std::to_string(r + 1) + "," + csv_field(name) + "," +
               prob + "\n";
      }
      all.push_back({{"adapter", pass.name}, {"path", path}, {"top", preds}});
      rows.push_back(passes.size() > 1 ? std::vector<std::string>{pass.name, path, cell} : std::vector<std::string>{path, cell});
    }
  }
  if (format == "json") return all.dump(2) + "\n";
  if (format == "csv") return csv;
  return cli::format_table(passes.size() > 1 ? std::vector<std::string>{"adapter", "image", "prediction"}
                                             : std::vector<std::string>{"image", "prediction"},
                           rows);
}

void check_command(const PredictCommand& command) {
  if (command.inputs.empty()) throw InputError("give image files or folders to predict");
  if (command.format != "table" && command.format != "json" && command.format != "csv")
    throw InputError("--format must be table, json or csv");
  if (command.top_k < 1) throw InputError("--top-k must be at least 1");
  if (!command.output.empty()) {
    std::vector<fs::path> read = {command.model};
    read.insert(read.end(), command.adapters.begin(), command.adapters.end());
    read.insert(read.end(), command.inputs.begin(), command.inputs.end());
    refuse_output_over_inputs(command.output, "-o", read);
    refuse_replacing_other_kind(command.output, "-o", OutputKind::kText);
  }
}

}  // namespace

int run_predict(const PredictCommand& command) {
  return guarded([&] {
    cli::setup_logging();
    check_command(command);
    ThreadTuner threads(parse_threads(command.threads));
    const c10::Device device = resolve_device(command.device);
    const Precision precision = resolve_precision(command.precision, device);
    const ImageFolder inputs = collect_inputs(command.inputs);
    log_skipped(inputs.skipped, "inputs");

    Bundle bundle = load_bundle(command.model);
    LoaderOptions options;
    options.batch_size = command.batch_size;
    options.pin_memory = device.is_cuda();
    ImageBatchSource source(inputs, Preprocess::from_bundle(bundle.info), options);
    std::vector<Pass> passes;
    if (bundle.info.kind == "classifier") {
      if (!command.adapters.empty()) throw InputError(command.model + " is a merged classifier; drop --adapter");
      passes.push_back(predict_merged(std::move(bundle), command.model, source, device, precision, threads));
    } else {
      if (command.adapters.empty())
        throw InputError(command.model + " is a backbone without a head; pass one or more --adapter");
      passes = predict_adapters(std::move(bundle), command.adapters, source, device, precision, threads);
    }
    for (const auto& pass : passes) require_finite(pass.predictions, pass.name, precision);

    const std::string text = format_predictions(passes, inputs, command.top_k, command.format);
    if (command.output.empty()) std::fputs(text.c_str(), stdout);
    else write_file_atomic(command.output, text);
    return exit_code::kOk;
  });
}

}  // namespace loratune
