#include <cstdlib>
#include <filesystem>

#include "common/files.h"
#include "common/html_text.h"
#include "export/web_page.h"
#include "loratune/errors.h"
#include "loratune/onnx_export.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

constexpr int64_t kTopK = 5;

std::string replaced(std::string text, const std::string& key, const std::string& value) {
  for (size_t at = text.find(key); at != std::string::npos; at = text.find(key, at + value.size()))
    text.replace(at, key.size(), value);
  return text;
}

bool has_runtime(const fs::path& dir) {
  std::error_code ec;
  return fs::is_regular_file(dir / web::kOrtScript, ec) && fs::is_regular_file(dir / web::kOrtWasm, ec);
}

}  // namespace

fs::path find_web_runtime(const fs::path& executable) {
  if (const char* env = std::getenv("LORATUNE_ONNXRUNTIME_WEB")) return env;
  const fs::path prefix = executable.parent_path().parent_path();
  for (const fs::path& dir : {prefix / "share" / "loratune" / "onnxruntime-web",
                              prefix / "onnx_runtime" / "node_modules" / "onnxruntime-web" / "dist"})
    if (has_runtime(dir)) return dir;
  return {};
}

OnnxExportReport export_web_page(const Bundle& bundle, const fs::path& folder, const fs::path& web_runtime,
                                 const OnnxExportOptions& options) {
  if (bundle.info.kind != "classifier" && bundle.info.kind != "backbone")
    throw InputError("the web page classifies photos: export an image classifier (a merged model, or --model with "
                     "--adapter), not a " + bundle.info.kind);
  if (!has_runtime(web_runtime))
    throw InputError("--format web needs onnxruntime-web's " + std::string(web::kOrtScript) + " and " + web::kOrtWasm +
                     (web_runtime.empty() ? std::string(" (none found)") : " in " + web_runtime.string()) +
                     ": npm install onnxruntime-web@1.31.1 and pass --web-runtime node_modules/onnxruntime-web/dist");
  const BundleInfo& info = bundle.info;
  nlohmann::json classes = info.classes;
  if (classes.empty())
    for (int64_t i = 0; i < info.feature_dim; ++i) classes.push_back("feature " + std::to_string(i));
  const nlohmann::json page_info = {{"classes", classes},       {"mean", info.mean},
                                    {"std", info.std},           {"image_size", info.image_size},
                                    {"resize_size", info.resize_size}, {"top_k", kTopK}};
  const std::string title = info.name.empty() ? bundle.path.stem().string() : info.name;
  OnnxExportReport report;
  write_directory_atomic(folder, [&](const fs::path& dir) {
    report = export_onnx(bundle, dir / "model.onnx", options);
    write_file_atomic(dir / "index.html", replaced(replaced(web::kPage, "{{TITLE}}", html::escape(title)), "{{INFO}}",
                                                   html::script_json(page_info)));
    fs::create_directories(dir / "ort");
    for (const char* file : {web::kOrtScript, web::kOrtWasm}) fs::copy_file(web_runtime / file, dir / "ort" / file);
  });
  return report;
}

}  // namespace loratune
