#include <spdlog/spdlog.h>

#include <algorithm>
#include <iterator>

#include "cli/common.h"
#include "loratune/captions.h"
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

// One model for retrieval: the bundle and its text tower, with `adapter` on both when given.
std::unique_ptr<Model> retrieval_model(const EvalCommand& command, const std::string& adapter, const c10::Device& device) {
  auto model = std::make_unique<Model>(load_bundle(command.model));
  const auto& bundle = model->bundle();
  model->set_text_tower(load_bundle(command.text_model.empty() ? text_model_for(bundle)
                                                               : text_tower_path(command.text_model)));
  if (!adapter.empty()) apply_adapter(*model, load_adapter(adapter), adapter);
  model->to(device);
  return model;
}

// eval --retrieval: image <-> caption retrieval of the base and (with --adapter) the adapted towers, printed and
// returned for metrics.json.
nlohmann::json evaluate_retrieval_of(const EvalCommand& command, const c10::Device& device, Precision precision) {
  const CaptionFile captions = read_captions(command.retrieval, command.caption_column);
  log_skipped(captions.skipped, command.retrieval + " (rows)");
  ImageFolder photos = caption_photos(captions);
  const auto photo_captions = attach_captions(photos, captions);
  log_skipped(photos.skipped, command.retrieval);
  std::vector<std::string> texts;
  std::vector<int64_t> text_image;
  for (size_t i = 0; i < photo_captions.size(); ++i)
    for (const auto& caption : photo_captions[i]) {
      texts.push_back(caption);
      text_image.push_back(static_cast<int64_t>(i));
    }
  LoaderOptions options;
  options.batch_size = command.batch_size;
  options.workers = command.workers;
  options.pin_memory = device.is_cuda();

  nlohmann::json out = {{"captions", command.retrieval}, {"column", captions.column}};
  std::vector<std::vector<std::string>> rows;
  std::vector<std::pair<std::string, std::string>> variants = {{"base", ""}};
  if (!command.adapter.empty()) variants.emplace_back("adapted", command.adapter);
  for (const auto& [name, adapter] : variants) {
    auto model = retrieval_model(command, adapter, device);
    const TokenizedTexts tokens = tokenize_texts(text_encoder_of(model->text_bundle()), texts);
    if (name == "base" && tokens.truncated > 0)
      spdlog::warn("{} of {} captions are longer than the text tower's {} tokens and were cut", tokens.truncated,
                   texts.size(), tokens.tokens.size(1));
    ImageBatchSource source(photos, Preprocess::from_bundle(model->bundle().info), options);
    const RetrievalMetrics r = evaluate_retrieval(*model, source, tokens.tokens, text_image, device, precision,
                                                  adapter.empty() ? command.model : adapter);
    out[name] = r.to_json();
    out["images"] = r.images;
    out["texts"] = r.texts;
    std::vector<std::string> row = {name};
    for (const RetrievalDirection* d : {&r.image_to_text, &r.text_to_image}) {
      for (double recall : d->recall) row.push_back(percent(recall, 1));
      row.push_back(fmt::format("{:.2f}", d->mean_rank));
    }
    rows.push_back(row);
  }
  std::vector<std::string> header = {""};
  for (const char* direction : {"image->text", "text->image"}) {
    for (int64_t k : retrieval_recall_ks()) header.push_back(std::string(direction) + " R@" + std::to_string(k));
    header.push_back(std::string(direction) + " mean rank");
  }
  std::printf("\nretrieval on %s (%lld photos, %lld captions):\n%s", command.retrieval.c_str(),
              static_cast<long long>(out["images"].get<int64_t>()), static_cast<long long>(out["texts"].get<int64_t>()),
              cli::format_table(header, rows).c_str());
  return out;
}

// The report of an evaluation folder, beside its metrics.json (eval --report).
void write_eval_report(const fs::path& out) {
  const std::string html = render_report({}, {read_eval(out)});
  write_file_atomic(out / EvalFiles::kReport, html);
  std::printf("report: %s (%s)\n", (out / EvalFiles::kReport).c_str(), human_bytes(static_cast<double>(html.size())).c_str());
}

// eval --retrieval without --data: the caption file's photos only, no classification.
int run_retrieval_alone(const EvalCommand& command, const c10::Device& device, Precision precision) {
  nlohmann::json j = {{"model", command.model}, {"adapter", command.adapter},
                      {"retrieval", evaluate_retrieval_of(command, device, precision)}};
  const fs::path out = command.output;
  fs::create_directories(out);
  write_file_atomic(out / EvalFiles::kMetrics, j.dump(2) + "\n");
  std::printf("wrote %s\n", (out / EvalFiles::kMetrics).c_str());
  if (command.report) write_eval_report(out);
  return exit_code::kOk;
}

}  // namespace

int run_eval(const EvalCommand& command) {
  return guarded([&] {
    cli::setup_logging();
    refuse_output_over_inputs(command.output, "--output", {command.model, command.adapter, command.data,
                                                           command.text_model, command.class_names, command.retrieval});
    ThreadTuner threads(parse_threads(command.threads));
    const c10::Device device = resolve_device(command.device);
    const Precision precision = resolve_precision(command.precision, device);
    if (command.data.empty()) return run_retrieval_alone(command, device, precision);
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
    if (!command.retrieval.empty()) j["retrieval"] = evaluate_retrieval_of(command, device, precision);
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
    if (command.report) write_eval_report(out);
    return exit_code::kOk;
  });
}

}  // namespace loratune
