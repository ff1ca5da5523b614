#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <tuple>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/strings.h"
#include "loratune/device.h"
#include "loratune/errors.h"
#include "loratune/image_folder.h"
#include "loratune/loader.h"
#include "loratune/memory_plan.h"
#include "loratune/threads.h"
#include "loratune/training_setup.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

std::string gb(int64_t bytes) { return human_bytes(static_cast<double>(bytes)); }

// On the CPU, what the process's resident set should peak at: while training, the tensors, the data pipeline, the
// loaders' decoded-photo cache (data.cache) and the process baseline the probe measured; or while loading the model,
// if that is more (dense weights before quantising).
struct ResidentMemory {
  int64_t cached_photos = 0, image_cache = 0, training = 0, total = 0;
};

ResidentMemory resident_memory(const TrainConfig& c, const MemoryProfile& p, const MemoryEstimate& e) {
  ResidentMemory r;
  Preprocess preprocess;
  preprocess.resize_size = p.resize_size;
  for (const std::string& folder : {c.data.train, c.data.val}) {
    std::error_code ec;
    if (folder.empty() || !fs::is_directory(folder, ec)) continue;
    const size_t photos = scan_image_folder(folder).samples.size();
    if (!caches_decoded_images(c.data.cache, photos, preprocess)) continue;
    r.cached_photos += static_cast<int64_t>(photos);
    r.image_cache += decoded_cache_bytes(photos, preprocess);
  }
  r.training = e.total + e.host_buffers + r.image_cache + p.process_baseline;
  r.total = std::max(r.training, p.load_peak_rss);
  return r;
}

void print_estimate(const TrainConfig& c, const MemoryProfile& profile, const MemoryEstimate& e, int64_t micro_batch) {
  std::vector<std::vector<std::string>> rows;
  for (const auto& item : e.items) rows.push_back({item.name, gb(item.bytes), item.detail});
  rows.push_back({"predicted peak", gb(e.total), "micro-batch " + std::to_string(micro_batch)});
  std::printf("%s", cli::format_table({"", "bytes", ""}, rows).c_str());
  std::printf("host memory: data pipeline %s (%lld batches of decoded images)%s\n", gb(e.host_buffers).c_str(),
              static_cast<long long>(profile.host_batches), profile.device.is_cuda() ? "" : ", counted on the CPU");
  if (e.host_offload > 0)
    std::printf("pinned host memory (offload): %s (frozen weights %s, saved block inputs %s)\n", gb(e.host_offload).c_str(),
                gb(profile.host_offload_fixed).c_str(), gb(e.host_offload - profile.host_offload_fixed).c_str());
  if (profile.device.is_cuda()) return;
  const ResidentMemory r = resident_memory(c, profile, e);
  std::printf("resident memory while training: %s = tensors %s + data pipeline %s + decoded-photo cache %s (%lld "
              "photos at %lld px, data.cache %s) + process baseline %s (libraries, threads, the allocator's free blocks; "
              "measured by the probe)\n",
              gb(r.training).c_str(), gb(e.total).c_str(), gb(e.host_buffers).c_str(), gb(r.image_cache).c_str(),
              static_cast<long long>(r.cached_photos), static_cast<long long>(profile.resize_size),
              enum_name(c.data.cache).c_str(), gb(profile.process_baseline).c_str());
  std::printf("resident memory while loading the model: %s (measured by the probe)\n",
              gb(profile.load_peak_rss).c_str());
  std::printf("peak resident memory (compare with the peak RSS train prints): %s, %s\n", gb(r.total).c_str(),
              r.total > r.training ? "while loading" : "while training");
}

nlohmann::json estimate_json(const TrainConfig& c, const MemoryProfile& p, const MemoryEstimate& e, int64_t micro_batch) {
  nlohmann::json items = nlohmann::json::array();
  for (const auto& item : e.items) items.push_back({{"name", item.name}, {"bytes", item.bytes}, {"detail", item.detail}});
  nlohmann::json out = {{"micro_batch", micro_batch}, {"checkpoint", p.checkpoint}, {"precision", precision_name(p.precision)},
                        {"total", e.total}, {"host_buffers", e.host_buffers}, {"host_offload", e.host_offload},
                        {"items", items}, {"source", p.source}};
  if (!p.device.is_cuda()) {
    const ResidentMemory r = resident_memory(c, p, e);
    out["resident"] = {{"total", r.total}, {"training", r.training}, {"loading", p.load_peak_rss},
                       {"image_cache", r.image_cache}, {"cached_photos", r.cached_photos},
                       {"process_baseline", p.process_baseline}};
  }
  return out;
}

// Classes for the head's size: the class folders of data.train when it is a folder, else 10.
int64_t class_count(const TrainConfig& c, int64_t given) {
  if (given > 0) return given;
  std::error_code ec;
  int64_t n = 0;
  if (fs::is_directory(c.data.train, ec))
    for (fs::directory_iterator it(c.data.train, ec), end; !ec && it != end; it.increment(ec))
      if (it->is_directory(ec)) ++n;
  return n > 0 ? n : 10;
}

int print_table(const PlanCommand& command) {
  const int64_t budget = parse_memory_size(command.memory.empty() ? "12GB" : command.memory);
  const c10::Device cuda(c10::kCUDA, 0);
  const int64_t usable = usable_memory(budget, cuda);
  if (command.json) {
    // The formula's straight line per setting (bytes = fixed + per_image x micro-batch) and the largest batch.
    nlohmann::json out = nlohmann::json::array();
    for (const auto& shape : standard_architectures()) {
      nlohmann::json settings;
      for (const auto& [name, tuning, checkpoint, quant] :
           {std::tuple{"lora", Tuning::kLora, false, QuantFormat::kNone},
            std::tuple{"lora_checkpoint", Tuning::kLora, true, QuantFormat::kNone},
            std::tuple{"lora_checkpoint_int8", Tuning::kLora, true, QuantFormat::kInt8},
            std::tuple{"lora_checkpoint_nf4", Tuning::kLora, true, QuantFormat::kNf4},
            std::tuple{"lora_checkpoint_offload", Tuning::kLora, true, QuantFormat::kNone},
            std::tuple{"lora_checkpoint_nf4_offload", Tuning::kLora, true, QuantFormat::kNf4},
            std::tuple{"full_checkpoint", Tuning::kFull, true, QuantFormat::kNone}}) {
        const bool offload = std::string(name).find("_offload") != std::string::npos;
        const MemoryProfile p = vit_memory_profile(shape, tuning, checkpoint, quant, offload);
        const int64_t fixed = estimate_memory(p, 0).total;
        settings[name] = {{"fixed", fixed}, {"per_image", estimate_memory(p, 1).total - fixed},
                          {"largest_batch", largest_micro_batch(p, usable)}};
      }
      out.push_back({{"name", shape.name}, {"settings", settings}});
    }
    std::printf("%s\n", out.dump(1).c_str());
    return exit_code::kOk;
  }
  std::printf("Largest micro-batch that fits in %s of GPU memory (%s planned: 512 MB for the CUDA context and 10%% "
              "kept free),\n16-bit autocast, fused attention, LoRA r8 on query/value with frozen weights in 16 bits; "
              "computed from the shapes.\n\n",
              gb(budget).c_str(), gb(usable).c_str());
  std::vector<std::vector<std::string>> rows;
  for (const auto& shape : standard_architectures()) {
    auto cell = [&](Tuning tuning, bool checkpoint, QuantFormat quant = QuantFormat::kNone, bool offload = false) {
      if (tuning == Tuning::kFull && shape.frozen_prefix_per_image > 0) return std::string("-");
      const int64_t b = largest_micro_batch(vit_memory_profile(shape, tuning, checkpoint, quant, offload), usable);
      return b == 0 ? std::string("does not fit") : std::to_string(b);
    };
    const MemoryProfile at32 = vit_memory_profile(shape, Tuning::kLora, true);
    rows.push_back({shape.name, human_count(static_cast<double>(shape.parameters)), std::to_string(shape.image_size),
                    cell(Tuning::kLora, false), cell(Tuning::kLora, true),
                    cell(Tuning::kLora, true, QuantFormat::kInt8), cell(Tuning::kLora, true, QuantFormat::kNf4),
                    cell(Tuning::kLora, true, QuantFormat::kNf4, true), cell(Tuning::kFull, true),
                    gb(estimate_memory(at32, 32).total),
                    gb(estimate_memory(vit_memory_profile(shape, Tuning::kLora, true, QuantFormat::kNf4), 32).total),
                    shape.note});
  }
  std::printf("%s", cli::format_table({"model", "params", "px", "LoRA", "LoRA + ckpt", "+ int8", "+ nf4",
                                       "+ nf4, offload", "full + ckpt", "LoRA + ckpt, batch 32", "+ nf4, batch 32",
                                       "note"},
                                      rows).c_str());
  std::printf("\nint8 / nf4: the blocks' Linear weights quantised (frozen_dtype int8 / nf4), each dequantised while its layer "
              "runs; offload: offload both, the blocks' weights and saved inputs in pinned host memory, two blocks' on "
              "the GPU at a time. Full fine-tuning keeps fp32 weights, gradients and AdamW moments (16 bytes a parameter) and 16-bit "
              "copies; \"-\": its convolutional stages are not modelled.\n");
  return exit_code::kOk;
}

}  // namespace

int run_plan(const PlanCommand& command) {
  return guarded([&] {
    if (command.table) return print_table(command);
    set_compute_threads(parse_threads(command.threads));
    const int64_t budget = command.memory.empty() ? 0 : parse_memory_size(command.memory);
    const TrainConfig c = load_train_config(command.config, command.overrides);
    const int64_t classes = class_count(c, command.classes);
    const c10::Device device = resolve_device(c.device);
    const Precision precision = resolve_precision(c.precision, device);
    const at::ScalarType frozen = frozen_dtype_for(c, precision, device);
    if (!command.json) std::fprintf(stderr, "measuring two small training steps on %s...\n", device.str().c_str());
    const QuantFormat quant = frozen_quant_for(c);
    const MemoryProfile profile = probe_memory(c, classes, precision, frozen, c.gradient_checkpointing, quant);
    const MemoryEstimate estimate = estimate_memory(profile, c.batch_size);
    std::optional<FitResult> fit;
    if (budget > 0) fit = fit_memory(c, classes, budget);
    if (command.json) {
      nlohmann::json out = estimate_json(c, profile, estimate, c.batch_size);
      if (fit && fit->fit) out["fit"] = {{"overrides", fit->fit->overrides}, {"total", fit->fit->estimate.total}};
      if (fit && !fit->fit) out["fit"] = {{"failure", fit->failure}};
      std::printf("%s\n", out.dump(1).c_str());
      return fit && !fit->fit ? exit_code::kRuntime : exit_code::kOk;
    }
    std::printf("Predicted peak memory of %s on %s: %s, frozen weights %s, gradient checkpointing %s, %lld classes\n%s\n\n",
                c.model.c_str(), device.str().c_str(), precision_name(precision).c_str(),
                quant != QuantFormat::kNone
                    ? (quant_format_name(quant) + " in the blocks' Linear layers, the rest " +
                       precision_name(frozen == at::kFloat ? Precision::kFp32 : precision)).c_str()
                    : precision_name(frozen == at::kFloat ? Precision::kFp32 : precision).c_str(),
                c.gradient_checkpointing ? "on" : "off", static_cast<long long>(classes), profile.source.c_str());
    print_estimate(c, profile, estimate, c.batch_size);
    if (!fit) return exit_code::kOk;
    if (!fit->fit) {
      std::fprintf(stderr, "error: %s\n", fit->failure.c_str());
      return exit_code::kRuntime;
    }
    const MemoryFit& f = *fit->fit;
    std::printf("\nFits in %s (%s planned): micro-batch %lld x %lld accumulation, %s, checkpointing %s: %s\n",
                gb(budget).c_str(), gb(usable_memory(budget, device)).c_str(), static_cast<long long>(f.micro_batch),
                static_cast<long long>(f.accumulation), precision_name(f.precision).c_str(), f.checkpoint ? "on" : "off",
                gb(planned_bytes(f.estimate, device)).c_str());
    std::string sets;
    for (const auto& o : f.overrides) sets += " --set " + o;
    std::printf("%s\n", sets.substr(1).c_str());
    if (const std::string cost = fit_cost_note(f); !cost.empty()) std::printf("%s\n", cost.c_str());
    return exit_code::kOk;
  });
}

}  // namespace loratune
