#include "cli/common.h"

#include <ATen/Parallel.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <thread>

#include "cli/commands.h"
#include "loratune/errors.h"
#include "common/strings.h"
#include "loratune/zero_shot.h"

namespace fs = std::filesystem;

namespace loratune {

int guarded(const std::function<int()>& body) {
  try {
    return body();
  } catch (const InputError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return exit_code::kInput;
  } catch (const Interrupted& e) {
    std::fprintf(stderr, "interrupted: %s\n", e.what());
    return exit_code::kInterrupted;
  } catch (const RuntimeFailure& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return exit_code::kRuntime;
  } catch (const std::filesystem::filesystem_error& e) {
    // A path that cannot be used is bad input; a full disk or an I/O error is a failure of the work.
    const auto code = e.code();
    const bool input = code == std::errc::no_such_file_or_directory || code == std::errc::too_many_symbolic_link_levels ||
                       code == std::errc::not_a_directory || code == std::errc::is_a_directory ||
                       code == std::errc::permission_denied || code == std::errc::filename_too_long ||
                       code == std::errc::file_exists || code == std::errc::invalid_argument;
    std::fprintf(stderr, "error: %s\n", e.what());
    return input ? exit_code::kInput : exit_code::kRuntime;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: LibTorch: %s\n", e.what_without_backtrace());
    return exit_code::kRuntime;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return exit_code::kRuntime;
  }
}

std::string train_config_help() { return config_reference(); }

namespace cli {

void setup_logging(const fs::path& log_file) {
  std::vector<spdlog::sink_ptr> sinks{std::make_shared<spdlog::sinks::stderr_color_sink_mt>()};
  if (!log_file.empty()) {
    fs::create_directories(log_file.parent_path());
    sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_mt>(log_file.string()));
  }
  auto logger = std::make_shared<spdlog::logger>("loratune", sinks.begin(), sinks.end());
  logger->set_pattern("%^%l%$: %v");
  logger->set_level(spdlog::level::info);
  spdlog::set_default_logger(logger);
}

ForwardFn InferenceModel::forward() {
  if (merged) return [this](const at::Tensor& x) { return classifier.forward({x}).toTensor(); };
  return [this](const at::Tensor& x) { return adapted->logits(x); };
}

InferenceModel load_inference_model(const std::string& model, const std::string& adapter, const c10::Device& device) {
  InferenceModel m;
  Bundle bundle = load_bundle(model);
  m.info = bundle.info;
  if (bundle.info.kind == "classifier") {
    if (!adapter.empty())
      throw InputError(model + " is a merged classifier (its adapter is already inside); drop --adapter, or pass the "
                       "original base model");
    m.merged = true;
    m.classes = bundle.info.classes;
    m.classifier = bundle.module;
    m.classifier.to(device);
    m.classifier.eval();
    return m;
  }
  if (adapter.empty())
    throw InputError(model + " is a backbone without a classification head; pass --adapter (from loratune train) or "
                     "a merged classifier from loratune merge");
  const Adapter a = load_adapter(adapter);
  if (!a.head_weight.defined()) throw InputError(adapter + " has no classification head");
  m.adapted = std::make_unique<Model>(std::move(bundle));
  apply_adapter(*m.adapted, a, adapter);
  m.adapted->to(device);
  m.adapted->set_training(false);
  m.classes = a.classes;
  return m;
}

std::string format_table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width(header.size(), 0);
  for (size_t c = 0; c < header.size(); ++c) width[c] = display_width(header[c]);
  for (const auto& r : rows)
    for (size_t c = 0; c < r.size() && c < width.size(); ++c) width[c] = std::max(width[c], display_width(r[c]));
  auto line = [&](const std::vector<std::string>& cells) {
    std::string out;
    for (size_t c = 0; c < cells.size(); ++c) {
      const std::string& cell = cells[c];
      const size_t pad = width[c] - std::min(width[c], display_width(cell));
      const bool numeric = !cell.empty() && (std::isdigit(static_cast<unsigned char>(cell[0])) || cell[0] == '-') && c > 0;
      out += (c ? "  " : "") + (numeric ? std::string(pad, ' ') + cell : cell + std::string(c + 1 < cells.size() ? pad : 0, ' '));
    }
    return out + "\n";
  };
  std::string out = line(header);
  size_t total = 0;
  for (size_t w : width) total += w + 2;
  out += std::string(total > 2 ? total - 2 : 0, '-') + "\n";
  for (const auto& r : rows) out += line(r);
  return out;
}

}  // namespace cli
}  // namespace loratune
