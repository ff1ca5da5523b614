#include <spdlog/spdlog.h>

#include <algorithm>
#include <iterator>

#include "cli/common.h"
#include "loratune/zero_shot.h"
#include "cli/commands.h"
#include "loratune/device.h"
#include "loratune/threads.h"
#include "loratune/errors.h"
#include "common/files.h"
#include "common/output_paths.h"
#include "loratune/memory.h"
#include "loratune/metrics.h"
#include "plot/plot.h"
#include "report/report.h"
#include "common/strings.h"

namespace fs = std::filesystem;

namespace loratune {

namespace {

// The model --model/--adapter/--zero-shot name, on `device`, its base quantised when --frozen-dtype asks.
cli::InferenceModel load_eval_model(const EvalCommand& command, const c10::Device& device) {
  cli::InferenceModel model;
  if (command.zero_shot) {
    model.adapted = std::make_unique<Model>(load_bundle(command.model));
    model.info = model.adapted->bundle().info;
    model.classes = scan_image_folder(command.data).classes;
    if (!command.adapter.empty()) {  // the adapted towers; the head comes from the (adapted) text tower
      const Adapter adapter = load_adapter(command.adapter);
      const auto& bundle = model.adapted->bundle();
      model.adapted->set_text_tower(load_bundle(command.text_model.empty() ? text_model_for(bundle)
                                                                           : text_tower_path(command.text_model)));
      apply_adapter(*model.adapted, adapter, command.adapter);
    }
    apply_zero_shot_head(*model.adapted, model.classes, command.text_model, command.class_names, {});
    model.adapted->to(device);
  } else {
    model = cli::load_inference_model(command.model, command.adapter, device);
  }
  if (!command.frozen_dtype.empty()) {
    if (!model.adapted)
      throw InputError(command.model + " is a merged classifier: --frozen-dtype quantises a base under an adapter; "
                       "pass the base model and --adapter");
    model.adapted->to(device, at::kFloat, parse_quant_format(command.frozen_dtype, "--frozen-dtype"));
    spdlog::info("{}", quantization_note(model.adapted->frozen_quantization()));
  }
  return model;
}

// Per-class precision / recall / F1 and the totals, on the console.
void print_metrics(const ClassificationMetrics& m, const std::vector<std::string>& classes, const std::string& how) {
  std::vector<std::vector<std::string>> rows;
  for (size_t k = 0; k < m.per_class.size(); ++k) {
    const auto& c = m.per_class[k];
    rows.push_back({classes[k], percent(c.precision, 1), percent(c.recall, 1), percent(c.f1, 1),
                    std::to_string(c.support)});
  }
  rows.push_back({"macro average", percent(m.macro_precision, 1), percent(m.macro_recall, 1),
                  percent(m.macro_f1, 1), std::to_string(m.count)});
  std::printf("\n%s", cli::format_table({"class", "precision", "recall", "F1", "support"}, rows).c_str());
  std::printf("\ntop-1 %s", percent(m.top1).c_str());
  if (m.top5 >= 0) std::printf(", top-5 %s", percent(m.top5).c_str());
  std::printf(", loss %.4f over %lld images (%s)\n", m.loss, static_cast<long long>(m.count), how.c_str());
}

// Every photo with its true class, the predicted one and its probability, in the order predicted.
std::vector<EvaluatedPhoto> evaluated_photos(const Predictions& pr, const ImageFolder& folder) {
  const at::Tensor probs = pr.logits.softmax(1).to(at::kDouble);
  const at::Tensor predicted = probs.argmax(1);
  const auto p = probs.accessor<double, 2>();
  const auto label = pr.labels.accessor<int64_t, 1>();
  const auto top = predicted.accessor<int64_t, 1>();
  std::vector<EvaluatedPhoto> photos;
  for (int64_t i = 0; i < probs.size(0); ++i)
    photos.push_back({fs::absolute(folder.samples[pr.indices[i]].path).lexically_normal().string(), label[i], top[i],
                      p[i][top[i]]});
  return photos;
}

}  // namespace

int run_eval(const EvalCommand& command) {
  return guarded([&] {
    cli::setup_logging();
    if (command.data.empty()) throw InputError("--data is required: the held-out photo folder");
    refuse_output_over_inputs(command.output, "--output",
                              {command.model, command.adapter, command.data, command.text_model, command.class_names});
    ThreadTuner threads(parse_threads(command.threads));
    const c10::Device device = resolve_device(command.device);
    const Precision precision = resolve_precision(command.precision, device);
    cli::InferenceModel model = load_eval_model(command, device);

    const ImageFolder folder = scan_image_folder_for(command.data, model.classes);
    log_skipped(folder.skipped, command.data);
    const auto counts = folder.class_counts();
    std::vector<std::string> missing;
    for (size_t k = 0; k < counts.size(); ++k)
      if (counts[k] == 0) missing.push_back(model.classes[k]);
    if (!missing.empty()) spdlog::warn("no images for {} class(es) in {}: {}", missing.size(), command.data, join(missing, ", ", 20));

    LoaderOptions options;
    options.batch_size = command.batch_size;
    options.workers = command.workers;
    options.pin_memory = device.is_cuda();
    ImageBatchSource source(folder, Preprocess::from_bundle(model.info), options);
    const Predictions pr = predict_all(model.forward(), source, device, precision, "eval", &threads);
    require_finite(pr, command.adapter.empty() ? command.model : command.adapter, precision);
    const ClassificationMetrics m = compute_metrics(pr.logits, pr.labels);
    print_metrics(m, model.classes, command.zero_shot ? "zero-shot" : model.merged ? "merged model" : "base + adapter");

    // Files: metrics.json, predictions.csv, misclassified.csv, confusion_matrix.png (and report.html).
    const fs::path out = command.output;
    fs::create_directories(out);
    nlohmann::json j = m.to_json(model.classes);
    j["model"] = command.model;
    j["adapter"] = command.adapter;
    j["data"] = command.data;
    j["classes_without_images"] = missing;
    j["skipped_files"] = source.skipped().size();
    write_file_atomic(out / EvalFiles::kMetrics, j.dump(2) + "\n");
    const auto legend = write_confusion_matrix(out / EvalFiles::kConfusionPng, m.confusion, model.classes,
                                               "confusion matrix: " + fs::path(command.data).filename().string());
    if (!legend.empty()) write_file_atomic(out / "confusion_matrix_legend.txt", join(legend, "\n") + "\n");
    const std::vector<EvaluatedPhoto> photos = evaluated_photos(pr, folder);
    std::vector<EvaluatedPhoto> wrong;
    std::copy_if(photos.begin(), photos.end(), std::back_inserter(wrong), [](const auto& p) { return p.truth != p.predicted; });
    write_file_atomic(out / EvalFiles::kPredictions, predictions_csv(photos, model.classes));
    write_file_atomic(out / EvalFiles::kMisclassified, predictions_csv(wrong, model.classes));
    std::printf("wrote %s, %s, %s, %s (%zu misclassified)\n", (out / EvalFiles::kMetrics).c_str(),
                (out / EvalFiles::kPredictions).c_str(), (out / EvalFiles::kMisclassified).c_str(),
                (out / EvalFiles::kConfusionPng).c_str(), wrong.size());
    if (command.report) {
      const std::string html = render_report({}, {read_eval(out)});
      write_file_atomic(out / EvalFiles::kReport, html);
      std::printf("report: %s (%s)\n", (out / EvalFiles::kReport).c_str(), human_bytes(static_cast<double>(html.size())).c_str());
    }
    return exit_code::kOk;
  });
}

}  // namespace loratune
