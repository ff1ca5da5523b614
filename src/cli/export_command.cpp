#include <cstdio>
#include <filesystem>

#include "cli/common.h"
#include "cli/commands.h"
#include "common/files.h"
#include "common/output_paths.h"
#include "common/strings.h"
#include "loratune/errors.h"
#include "loratune/merge.h"
#include "loratune/onnx_export.h"
#include "loratune/threads.h"
#include "loratune/zero_shot.h"

namespace fs = std::filesystem;

namespace loratune {

namespace {

// An existing --output is replaced only when it is an earlier export: a .onnx file, or a folder holding exactly what
// --format web writes (never a photo folder or anything else that happens to have that name).
void refuse_replacing_other_output(const fs::path& output, const std::string& format) {
  std::error_code ec;
  if (!fs::exists(output, ec)) return;
  if (format == "onnx") {
    if (fs::is_regular_file(output, ec) && output.extension() == ".onnx") return;
    throw InputError("--output " + output.string() + " exists and is not an .onnx file; choose another path");
  }
  bool earlier_page = fs::is_directory(output, ec);
  if (earlier_page)
    for (const auto& entry : fs::directory_iterator(output, ec)) {
      const std::string name = entry.path().filename().string();
      earlier_page = earlier_page && (name == "index.html" || name == "model.onnx" || name == "ort");
    }
  if (!earlier_page)
    throw InputError("--output " + output.string() + " exists and is not a folder export --format web wrote (it is "
                     "replaced as a whole); choose a new folder");
}

}  // namespace

int run_export(const ExportCommand& command) {
  return guarded([&] {
    cli::setup_logging();
    set_compute_threads(parse_threads(command.threads));
    if (command.features_only && command.adapter.empty())
      throw InputError("--features-only applies with --adapter (a backbone bundle exports as features already)");
    refuse_output_over_inputs(command.output, "--output", {command.model, command.adapter, command.web_runtime});
    refuse_replacing_other_output(command.output, command.format);
    OnnxExportOptions options;
    options.external_data = command.external_data;
    options.fp16 = command.precision == "fp16";
    OnnxExportReport report;
    const auto write = [&](const Bundle& bundle) {
      if (command.format == "onnx") return export_onnx(bundle, command.output, options);
      const fs::path runtime = command.web_runtime.empty() ? find_web_runtime(fs::read_symlink("/proc/self/exe"))
                                                           : fs::path(command.web_runtime);
      return export_web_page(bundle, command.output, runtime, options);
    };
    if (command.adapter.empty()) {
      report = write(load_bundle(command.model));
    } else {
      // Merged into a private temporary file first, checked as `merge` checks it.
      const PrivateFolder folder("loratune-export");
      MergeOptions merge;
      merge.features_only = command.features_only;
      merge.text_head = prompt_head_maker();
      const fs::path merged = folder.path() / "merged.pt";
      merge_adapter(command.model, command.adapter, merged, merge);
      report = write(load_bundle(merged));
    }
    if (command.format == "web")
      std::printf("wrote %s/ (index.html, model.onnx, ort/): serve the folder and open index.html\n",
                  command.output.c_str());
    std::printf("wrote %s (ONNX opset %lld: %lld nodes, %lld tensors, %s; %s -> %s, batch size free)\n",
                (command.format == "web" ? (fs::path(command.output) / "model.onnx").string() : command.output).c_str(),
                static_cast<long long>(options.opset), static_cast<long long>(report.nodes),
                static_cast<long long>(report.initializers), human_bytes(static_cast<double>(report.bytes)).c_str(),
                report.input.c_str(), report.output.c_str());
    return exit_code::kOk;
  });
}

}  // namespace loratune
