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
    std::string e = p.extension().string();
    std::transform(e.begin(), e.end(), e.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
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

}  // namespace

int run_predict(const PredictCommand& command) {
  return guarded([&] {
    cli::setup_logging();
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
    ThreadTuner threads(parse_threads(command.threads));
    const c10::Device device = resolve_device(command.device);
    const Precision precision = resolve_precision(command.precision, device);
    const ImageFolder inputs = collect_inputs(command.inputs);
    log_skipped(inputs.skipped, "inputs");

    // Each prediction pass: (name of the adapter, its classes, forward).
    struct Pass {
      std::string name;
      std::vector<std::string> classes;
      Predictions predictions;
    };
    std::vector<Pass> passes;
    Bundle bundle = load_bundle(command.model);
    const Preprocess preprocess = Preprocess::from_bundle(bundle.info);
    LoaderOptions options;
    options.batch_size = command.batch_size;
    options.pin_memory = device.is_cuda();
    ImageBatchSource source(inputs, preprocess, options);

    if (bundle.info.kind == "classifier") {
      if (!command.adapters.empty()) throw InputError(command.model + " is a merged classifier; drop --adapter");
      auto module = bundle.module;
      module.to(device);
      passes.push_back({fs::path(command.model).filename().string(), bundle.info.classes,
                        predict_all([&](const at::Tensor& x) { return module.forward({x}).toTensor(); }, source, device, precision,
                                    "", &threads)});
    } else {
      if (command.adapters.empty())
        throw InputError(command.model + " is a backbone without a head; pass one or more --adapter");
      // The base is loaded once; every adapter's module types are prepared before the first forward, then adapters
      // are switched by rebinding their tensors. Adapters that replace base weights (method full) are undone after.
      std::vector<Adapter> adapters;
      for (const auto& path : command.adapters) adapters.push_back(load_adapter(path));
      Model model(std::move(bundle));
      for (size_t i = 0; i < adapters.size(); ++i) {
        check_adapter_base(adapters[i], model.bundle(), command.adapters[i]);
        model.prepare_adapters(bind_targets(adapters[i], model.bundle(), command.adapters[i]));
      }
      std::map<std::string, at::Tensor> original;
      for (const auto& p : model.module().named_parameters()) original[p.name] = p.value.detach().clone();
      model.to(device);
      for (size_t i = 0; i < adapters.size(); ++i) {
        apply_adapter(model, adapters[i], command.adapters[i]);
        model.set_training(false);
        passes.push_back({command.adapters[i], adapters[i].classes,
                          predict_all([&](const at::Tensor& x) { return model.logits(x); }, source, device, precision,
                                      "", &threads)});
        if (!adapters[i].full_weights.empty()) {
          at::NoGradGuard no_grad;
          for (const auto& p : model.module().named_parameters()) p.value.copy_(original.at(p.name));
        }
      }
    }

    for (const auto& pass : passes) require_finite(pass.predictions, pass.name, precision);

    // Output.
    json all = json::array();
    std::vector<std::vector<std::string>> rows;
    std::string csv = "adapter,path,rank,label,probability\n";
    for (const auto& pass : passes) {
      const at::Tensor probs = pass.predictions.logits.softmax(1);
      const int64_t k = std::min<int64_t>(command.top_k, probs.size(1));
      const auto top = probs.topk(k, 1);
      for (int64_t i = 0; i < probs.size(0); ++i) {
        const std::string path = inputs.samples[pass.predictions.indices[i]].path.string();
        json preds = json::array();
        std::string cell;
        for (int64_t r = 0; r < k; ++r) {
          const int64_t label = std::get<1>(top)[i][r].item<int64_t>();
          const double p = std::get<0>(top)[i][r].item<double>();
          preds.push_back({{"label", pass.classes[label]}, {"probability", p}});
          cell += (r ? ", " : "") + pass.classes[label] + " " + cli::percent(p, 1);
          char prob[16];
          std::snprintf(prob, sizeof prob, "%.6f", p);
          csv += pass.name + "," + path + "," + std::to_string(r + 1) + "," + pass.classes[label] + "," + prob + "\n";
        }
        all.push_back({{"adapter", pass.name}, {"path", path}, {"top", preds}});
        rows.push_back(passes.size() > 1 ? std::vector<std::string>{pass.name, path, cell} : std::vector<std::string>{path, cell});
      }
    }
    std::string text;
    if (command.format == "json") text = all.dump(2) + "\n";
    else if (command.format == "csv") text = csv;
    else text = cli::format_table(passes.size() > 1 ? std::vector<std::string>{"adapter", "image", "prediction"}
                                                     : std::vector<std::string>{"image", "prediction"},
                                  rows);
    if (command.output.empty()) std::fputs(text.c_str(), stdout);
    else write_file_atomic(command.output, text);
    return exit_code::kOk;
  });
}

}  // namespace loratune
