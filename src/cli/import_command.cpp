#include <ATen/core/grad_mode.h>

#include <chrono>

#include "cli/common.h"
#include "cli/commands.h"
#include "common/output_paths.h"
#include "loratune/threads.h"
#include "common/files.h"
#include "common/strings.h"
#include "loratune/bundle.h"
#include "loratune/errors.h"
#include "loratune/import.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

// Saves one imported tower, checked: the file as written must give the in-memory module's output on a probe input.
// The module is released once written, so that the check holds one copy of the weights, not two.
void save_checked(ImportedModel& m, const BundleInfo& info, const fs::path& output, const at::Tensor& probe) {
  at::Tensor expected;
  {
    at::NoGradGuard no_grad;
    expected = m.module.forward({probe}).toTensor();
  }
  if (!expected.isfinite().all().item<bool>())
    throw InputError(output.string() + " was not written: the imported model gives inf or NaN on a test input; the "
                     "checkpoint's weights or a config value (an eps, a scale) are not usable");
  save_bundle(m.module, info, output, [&](const fs::path& written) {
    m.module = torch::jit::Module();
    at::NoGradGuard no_grad;
    auto loaded = torch::jit::load(written.string());
    loaded.eval();
    const double diff = (loaded.forward({probe}).toTensor() - expected).abs().max().item<double>();
    if (!(diff == 0.0)) throw RuntimeFailure("the written file differs from the imported model by " +
                                             std::to_string(diff) + "; " + output.string() + " was not written");
  }, m.extra_files);
}

// A probe input for a tower: an image batch, or token rows for a text tower.
at::Tensor probe_input(const BundleInfo& info) {
  if (info.kind == "text_encoder")
    return at::randint(1, info.extra.value("vocab_size", int64_t{1000}), {2, info.extra.value("context_length", int64_t{77})},
                       at::kLong);
  return at::randn({2, 3, info.image_size, info.image_size});
}

void save_text_tower(ImportedModel& text, const std::string& source, const fs::path& output) {
  const BundleInfo info = BundleInfo::from_json(text.metadata, source + " (text tower)");
  save_checked(text, info, output, probe_input(info));
  std::printf("wrote %s: text tower, %lld-d embeddings\n", output.string().c_str(),
              static_cast<long long>(info.feature_dim));
}

}  // namespace

int run_import(const ImportCommand& command) {
  return guarded([&] {
    cli::setup_logging();
    set_compute_threads(parse_threads(command.threads));  // one pass over fixed work: auto is the load-aware start
    if (command.image_size < 0 || command.image_size > kMaxBundleImageSize)
      throw InputError("--image-size must be between 1 and " + std::to_string(kMaxBundleImageSize) +
                       " (0: the checkpoint's own)");
    const fs::path output = expand_home(command.output);
    // The checkpoint folder may be the shared hub cache: nothing goes into it.
    const fs::path source_folder = resolve_checkpoint_folder(command.source);
    refuse_output_over_inputs(output, "--output", {source_folder});
    std::error_code ec;
    if (fs::is_directory(output, ec)) throw InputError("--output " + output.string() + " is a folder; give a file name");
    const auto start = std::chrono::steady_clock::now();
    ImportOptions options;
    options.image_size = command.image_size;
    ImportedModel image = import_checkpoint(command.source, Tower::image, options);
    if (image.metadata.value("kind", "") == "text_encoder") {  // FOLDER#text: the text tower alone
      save_text_tower(image, command.source, output);
      return exit_code::kOk;
    }
    const bool with_text = image.metadata.contains("text_model") && !command.no_text;
    fs::path text_output = output;
    text_output.replace_filename(output.stem().string() + "_text" + output.extension().string());
    if (with_text) {
      refuse_output_over_inputs(text_output, "the text tower's file", {source_folder});
      image.metadata["text_model"] = text_output.filename().string();
    } else {
      image.metadata.erase("text_model");
    }
    const BundleInfo info = BundleInfo::from_json(image.metadata, command.source);
    int64_t blocks = 0;
    if (!info.blocks.empty()) blocks = static_cast<int64_t>(submodule_at(image.module, info.blocks).children().size());
    save_checked(image, info, output, probe_input(info));
    std::printf("wrote %s: %s, %lld blocks, %lld-d features, %lldpx (resize %lld, %s)\n", output.string().c_str(),
                info.architecture.c_str(), static_cast<long long>(blocks), static_cast<long long>(info.feature_dim),
                static_cast<long long>(info.image_size), static_cast<long long>(info.resize_size),
                info.interpolation.c_str());
    if (with_text) {
      ImportedModel text = import_checkpoint(command.source, Tower::text);
      save_text_tower(text, command.source, text_output);
      std::printf("zero-shot: loratune eval --model %s --zero-shot ...\n", output.string().c_str());
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("imported %s in %s\n", command.source.c_str(), human_duration(seconds).c_str());
    return exit_code::kOk;
  });
}

}  // namespace loratune
