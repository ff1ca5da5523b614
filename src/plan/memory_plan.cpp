#include "loratune/memory_plan.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <map>
#include <tuple>

#include "common/strings.h"
#include "loratune/cpu_allocator.h"
#include "loratune/device.h"
#include "loratune/errors.h"
#include "loratune/memory.h"
#include "loratune/model.h"
#include "loratune/train_step.h"
#include "loratune/training_setup.h"
#include "quant/frozen_weights.h"

namespace loratune {
namespace {

constexpr int64_t kGiB = int64_t{1} << 30;
constexpr int64_t kCudaContext = 512 * kMiB;
constexpr double kFitMargin = 0.10;
constexpr int64_t kTrainableBytes = 16;  // fp32 value, gradient and the two AdamW moments

std::string precision_name(at::ScalarType t) {
  return t == at::kHalf ? "fp16" : t == at::kBFloat16 ? "bf16" : t == at::kFloat ? "fp32" : std::string(c10::toString(t));
}

int64_t frozen_bytes(const MemoryProfile& p) {
  int64_t sum = 0;
  for (const auto& [name, bytes] : p.frozen_by_dtype) sum += bytes;
  return sum;
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

}  // namespace

int64_t parse_memory_size(const std::string& text) {
  const std::string hint = "memory \"" + text + "\": give a size such as 12GB, 11.5GiB or 900MB";
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  double value = 0;
  try {
    size_t used = 0;
    value = std::stod(text.substr(0, i), &used);
    if (used != i) throw InputError(hint);
  } catch (const std::logic_error&) {
    throw InputError(hint);
  }
  std::string unit;
  for (size_t j = i; j < text.size(); ++j)
    if (!std::isspace(static_cast<unsigned char>(text[j]))) unit += static_cast<char>(std::toupper(static_cast<unsigned char>(text[j])));
  double scale = 0;
  if (unit == "G" || unit == "GB" || unit == "GIB") scale = static_cast<double>(kGiB);
  else if (unit == "M" || unit == "MB" || unit == "MIB") scale = static_cast<double>(kMiB);
  else if (unit == "T" || unit == "TB" || unit == "TIB") scale = static_cast<double>(kGiB) * 1024;
  if (scale == 0 || !std::isfinite(value) || value <= 0 || value * scale > 1e15) throw InputError(hint);
  return static_cast<int64_t>(value * scale);
}

MemoryEstimate estimate_memory(const MemoryProfile& p, int64_t b) {
  MemoryEstimate e;
  for (const auto& [name, bytes] : p.frozen_by_dtype)
    e.items.push_back({"frozen weights (" + name + ")", bytes, ""});
  e.items.push_back({"trainable tensors, gradients, AdamW", p.trainable_parameters * kTrainableBytes,
                     "parameters: " + human_count(static_cast<double>(p.trainable_parameters)) + " x 16 bytes"});
  if (p.extra_fixed > 0)
    e.items.push_back({"runtime buffers", p.extra_fixed,
                       p.device.is_cuda() ? "cuBLAS workspaces, autocast copies" : "autocast copies, other buffers"});
  e.items.push_back({"input batch", p.input_per_image * b, "fp32, " + std::to_string(b) + " images"});
  int64_t before_step = 0;  // held before the forward pass
  for (const auto& item : e.items) before_step += item.bytes;
  const std::string per_block = human_bytes(static_cast<double>(p.block_output_per_image * b));
  e.items.push_back({"activations kept for backward", p.kept.at(b),
                     p.host_offload_per_image > 0 ? "outputs of 2 blocks in flight, " + per_block +
                                                        " each (the others in host memory: offload)"
                     : p.checkpoint ? "outputs of " + std::to_string(p.trained_blocks) + " blocks, " + per_block +
                                        " each (checkpointing)"
                                  : "all of " + std::to_string(p.trained_blocks) + " blocks, about " +
                                        human_bytes(p.trained_blocks > 0 ? static_cast<double>(p.kept.at(b)) / p.trained_blocks : 0) +
                                        " each, with stem and head"});
  e.items.push_back({"backward buffers and workspace", p.extra.at(b),
                     p.checkpoint ? "one block recomputed, its gradients, the largest op's workspace"
                                  : "gradients in flight, the largest op's workspace"});
  e.total = before_step + p.kept.at(b) + p.extra.at(b);
  const int64_t prefix_peak = before_step + p.prefix_peak_per_image * b;
  if (prefix_peak > e.total) {
    e.items.push_back({"frozen prefix (no gradients)", prefix_peak - e.total, "its largest activations exceed the step's"});
    e.total = prefix_peak;
  }
  e.host_buffers = p.host_batch_bytes_per_image * b * p.host_batches;
  e.host_offload = p.host_offload_fixed + p.host_offload_per_image * b;
  return e;
}

int64_t usable_memory(int64_t budget, const c10::Device& device) {
  const int64_t after_context = device.is_cuda() ? budget - kCudaContext : budget;
  return static_cast<int64_t>(static_cast<double>(after_context) * (1.0 - kFitMargin));
}

int64_t planned_bytes(const MemoryEstimate& e, const c10::Device& device) {
  return e.total + (device.is_cuda() ? 0 : e.host_buffers);
}

int64_t largest_micro_batch(const MemoryProfile& p, int64_t usable) {
  auto fits = [&](int64_t b) { return planned_bytes(estimate_memory(p, b), p.device) <= usable; };
  if (!fits(1)) return 0;
  int64_t good = 1, bad = 2;
  while (fits(bad)) {
    good = bad;
    bad *= 2;
    if (bad > (int64_t{1} << 24)) return good;
  }
  while (bad - good > 1) {
    const int64_t mid = (good + bad) / 2;
    (fits(mid) ? good : bad) = mid;
  }
  return good;
}

namespace {

// Bytes of the frozen tensors (parameters without gradients and buffers) of the model's towers, by storage type.
std::vector<std::pair<std::string, int64_t>> frozen_by_dtype(Model& model, QuantFormat frozen_quant) {
  std::map<std::string, int64_t> frozen;
  std::vector<torch::jit::Module> towers{model.module()};  // with loss contrastive the text tower too
  if (model.has_text_tower()) towers.push_back(model.text_bundle().module);
  for (const auto& tower : towers) {
    for (const auto& param : tower.parameters(/*recurse=*/true))
      if (!param.requires_grad()) frozen[precision_name(param.scalar_type())] += static_cast<int64_t>(param.nbytes());
    for (const auto& buffer : tower.named_buffers(/*recurse=*/true))
      frozen[is_quantized_weight_buffer(buffer.name) ? quant_format_name(frozen_quant) + ", quantised Linear weights"
                                                     : precision_name(buffer.value.scalar_type())] +=
          static_cast<int64_t>(buffer.value.nbytes());
  }
  return {frozen.begin(), frozen.end()};
}

// Tensor bytes of one training step: kept after the forward (activations for the backward), and at the peak.
struct StepReading {
  int64_t kept = 0, peak = 0;
};

// Runs one optimiser step of `b` random images (and prompts, for loss contrastive) and reads the device's bytes.
class StepProbe {
 public:
  StepProbe(Model& model, const TrainConfig& config, const MemoryProfile& profile, int64_t classes)
      : model_(model), config_(config), p_(profile), classes_(classes),
        optimizer_(make_optimizer(config, model)), scaler_(make_loss_scaler(config, profile.precision)) {}

  StepReading step(int64_t b) {
    const int64_t size = model_.bundle().info.image_size;
    const at::Tensor x = at::randn({b, 3, size, size}).to(p_.device);
    const at::Tensor y = (at::arange(b, at::kLong) % classes_).to(p_.device);
    const int64_t base = tensor_bytes(p_.device).current;
    reset_peak_memory(p_.device);
    StepReading r;
    if (model_.has_text_tower()) {  // loss contrastive: a prompt per image through the text tower
      const int64_t context = model_.text_bundle().info.extra.value("context_length", int64_t{77});
      const at::Tensor tokens = at::randint(1, 100, {b, context}, at::kLong).to(p_.device);
      at::Tensor loss;
      {
        AutocastScope autocast(p_.device, p_.precision);
        loss = contrastive_loss(model_.features(x, p_.checkpoint), model_.text_features(tokens, p_.checkpoint), 100.0);
      }
      r.kept = tensor_bytes(p_.device).current - base;
      backward_loss(loss, 1.0, *scaler_);
    } else {
      at::Tensor logits;
      {
        AutocastScope autocast(p_.device, p_.precision);
        logits = model_.logits(x, p_.checkpoint);
      }
      r.kept = tensor_bytes(p_.device).current - base;
      backward_micro_batch(logits, y, 1.0, *scaler_);
    }
    apply_step(*optimizer_, *scaler_, config_.optim.lr, config_.optim.grad_clip);
    r.peak = tensor_bytes(p_.device).peak - base;
    return r;
  }

 private:
  Model& model_;
  const TrainConfig& config_;
  const MemoryProfile& p_;
  int64_t classes_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<LossScaler> scaler_;
};

// The line through two readings at 2 and 4 images.
LinearBytes line_through(int64_t at2, int64_t at4) {
  LinearBytes l;
  l.per_image = std::max<int64_t>(0, (at4 - at2) / 2);
  l.fixed = std::max<int64_t>(0, at2 - 2 * l.per_image);
  return l;
}

}  // namespace

MemoryProfile probe_memory(const TrainConfig& config, int64_t classes, Precision precision, at::ScalarType frozen_dtype,
                           bool checkpoint, QuantFormat frozen_quant) {
  const CachingCpuAllocatorScope allocator;  // tensor bytes on the CPU are counted there
  TrainConfig c = config;
  c.head.init = HeadInit::kRandom;  // a zero-shot head has the same size
  c.gradient_checkpointing = checkpoint;
  std::vector<std::string> names;
  for (int64_t i = 0; i < classes; ++i) names.push_back("class " + std::to_string(i));
  MemoryProfile p;
  p.device = resolve_device(c.device);
  p.precision = precision;
  p.frozen_dtype = frozen_dtype;
  p.frozen_quant = frozen_quant;
  p.checkpoint = checkpoint;
  p.source = "measured on " + p.device.str() + ": training steps of 2 and 4 images";

  // The model as training holds it.
  const TensorBytes before_model = tensor_bytes(p.device);
  reset_peak_memory(p.device);
  auto model = build_training_model(c, names);
  if (p.device.is_cuda()) model->blocks().set_offload(offload_settings_for(c));
  model->to(p.device, frozen_dtype, frozen_quant);
  if (!p.device.is_cuda()) p.load_peak_rss = read_memory(p.device).peak_rss;
  p.host_offload_fixed = model->blocks().offloaded_weight_bytes();
  model->set_training(true);
  for (const auto& t : model->trainable()) p.trainable_parameters += t.tensor.numel();
  p.frozen_by_dtype = frozen_by_dtype(*model, frozen_quant);
  const int64_t size = model->bundle().info.image_size;
  p.resize_size = model->bundle().info.resize_size;
  p.input_per_image = 3 * size * size * static_cast<int64_t>(sizeof(float));
  p.host_batch_bytes_per_image = p.input_per_image;
  p.host_batches = std::max<int64_t>(1, c.data.prefetch_batches) + 1;  // prefetched, and the one being filled

  // Steps of 2 and 4 images; the first allocates gradients, AdamW moments and the device's workspaces.
  StepProbe probe(*model, c, p, classes);
  probe.step(2);
  const int64_t baseline = tensor_bytes(p.device).current - before_model.current;
  p.extra_fixed = std::max<int64_t>(0, baseline - frozen_bytes(p) - p.trainable_parameters * kTrainableBytes);
  const StepReading r2 = probe.step(2);
  const auto start = std::chrono::steady_clock::now();
  const StepReading r4 = probe.step(4);
  (void)at::zeros({1}, at::TensorOptions().device(p.device)).cpu();  // waits for the device's queued work
  p.step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!p.device.is_cuda())
    p.process_baseline = std::max<int64_t>(0, read_memory(p.device).peak_rss - tensor_bytes(p.device).peak);
  p.kept = line_through(r2.kept, r4.kept);
  p.extra = line_through(r2.peak - r2.kept, r4.peak - r4.kept);
  p.trained_blocks = model->blocks().trained_count();
  {
    at::NoGradGuard no_grad;
    AutocastScope autocast(p.device, precision);
    p.block_output_per_image = model->block_output_bytes(at::randn({1, 3, size, size}).to(p.device));
  }
  if (model->blocks().offload().activations) p.host_offload_per_image = p.trained_blocks * p.block_output_per_image;
  return p;
}

namespace {

struct Candidate {
  Precision precision;
  at::ScalarType frozen_dtype;
  bool checkpoint;
  QuantFormat quant = QuantFormat::kNone;
  bool offload = false;  // offload both (CUDA)
};

// The settings `train` would use for each open choice of precision and frozen dtype (as prepare_training decides:
// 16-bit frozen weights on CUDA, or where the config asks for them, with fp32 as the fallback).
std::vector<Candidate> candidates(const TrainConfig& c, const c10::Device& device) {
  std::vector<Precision> precisions;
  if (c.precision != "auto") precisions.push_back(resolve_precision(c.precision, device));
  else if (device.is_cuda()) precisions = {cuda_bf16_supported() ? Precision::kBf16 : Precision::kFp16, Precision::kFp32};
  else precisions = {Precision::kBf16, Precision::kFp32};
  std::vector<Candidate> out;
  for (const Precision p : precisions) {
    std::vector<at::ScalarType> frozen = {at::kFloat};
    if (frozen_dtype_for(c, p, device) != at::kFloat) frozen.insert(frozen.begin(), compute_dtype(p));
    for (const at::ScalarType f : frozen)
      for (const bool ckpt : {false, true}) out.push_back({p, f, ckpt, frozen_quant_for(c)});
  }
  return out;
}

// Quantised frozen weights when nothing else fits: int8, then nf4, with checkpointing, in the first precision tried.
std::vector<Candidate> quantized_candidates(const TrainConfig& c, const c10::Device& device) {
  if (!adapts_frozen_base(c.method) || frozen_quant_for(c) != QuantFormat::kNone) return {};
  const Candidate first = candidates(c, device).front();
  return {{first.precision, first.frozen_dtype, true, QuantFormat::kInt8},
          {first.precision, first.frozen_dtype, true, QuantFormat::kNf4}};
}

// On CUDA, when quantising is not enough either: offload both, without and then with nf4 weights.
std::vector<Candidate> offload_candidates(const TrainConfig& c, const c10::Device& device) {
  if (!device.is_cuda() || !adapts_frozen_base(c.method) || c.offload != OffloadMode::kNone)
    return {};
  const Candidate first = candidates(c, device).front();
  return {{first.precision, first.frozen_dtype, true, frozen_quant_for(c), true},
          {first.precision, first.frozen_dtype, true, QuantFormat::kNf4, true}};
}

std::vector<std::string> overrides_for(const TrainConfig& c, const MemoryFit& f) {
  std::vector<std::string> out = {"batch_size=" + std::to_string(f.micro_batch),
                                  "grad_accum_steps=" + std::to_string(f.accumulation),
                                  std::string("gradient_checkpointing=") + (f.checkpoint ? "true" : "false"),
                                  "precision=" + precision_name(f.precision)};
  if (f.offload) out.push_back("offload=both");
  if (f.frozen_quant != QuantFormat::kNone)
    out.push_back("frozen_dtype=" + quant_format_name(f.frozen_quant));
  else if (c.method != Method::kFull && f.precision != Precision::kFp32)
    out.push_back(std::string("frozen_dtype=") + (f.frozen_dtype == at::kFloat ? "fp32" : "compute"));
  return out;
}

}  // namespace

std::string fit_cost_note(const MemoryFit& f) {
  if (f.frozen_quant == QuantFormat::kNone && !f.offload) return "";
  std::vector<std::string> parts;
  if (f.frozen_quant != QuantFormat::kNone)
    parts.push_back("frozen Linear weights quantised to " + quant_format_name(f.frozen_quant) +
                    " (each layer dequantises its weight when it runs)");
  if (f.offload)
    parts.push_back("offload both (the blocks' weights and saved inputs wait in pinned host memory and are copied in "
                    "one block ahead)");
  std::string note = join(parts, " and ") + ": nothing cheaper fits";
  if (f.step_time_ratio > 0) {
    char ratio[32];
    std::snprintf(ratio, sizeof ratio, "%.2fx", f.step_time_ratio);
    note += std::string("; the probe's step took ") + ratio + " the plain one's";
  }
  return note;
}

namespace {

// "fp16, frozen weights int8, checkpointing, offload both".
std::string settings_text(const Candidate& cand) {
  return precision_name(cand.precision) + ", frozen weights " +
         (cand.quant != QuantFormat::kNone ? quant_format_name(cand.quant) : precision_name(cand.frozen_dtype)) +
         (cand.checkpoint ? ", checkpointing" : "") + (cand.offload ? ", offload both" : "");
}

// Throughput model: 16-bit steps about twice as fast, checkpointing costs a quarter, tiny micro-batches waste.
double throughput_score(const Candidate& cand, int64_t micro_batch) {
  return static_cast<double>(std::min<int64_t>(micro_batch, 32)) * (cand.precision == Precision::kFp32 ? 1.0 : 2.0) *
         (cand.checkpoint ? 0.75 : 1.0) * (cand.frozen_dtype == at::kFloat ? 1.0 : 1.01);
}

// The search over candidate settings: each is probed; the best-scoring one that fits is kept, and the smallest needs
// are remembered to say what would be needed when nothing fits.
class FitSearch {
 public:
  FitSearch(const TrainConfig& config, int64_t classes, const c10::Device& device, int64_t usable)
      : config_(config), classes_(classes), device_(device), usable_(usable),
        effective_(config.batch_size * config.grad_accum_steps) {}

  bool found() const { return result_.fit.has_value(); }

  void consider(const Candidate& cand) {
    MemoryProfile p;
    try {
      TrainConfig c = config_;
      if (cand.offload) c.offload = OffloadMode::kBoth;
      p = probe_memory(c, classes_, cand.precision, cand.frozen_dtype, cand.checkpoint, cand.quant);
    } catch (const c10::Error& e) {  // e.g. a graph that breaks with 16-bit frozen weights: train would not use it
      last_error_ = e.what_without_backtrace();
      return;
    }
    if (cand.quant == QuantFormat::kNone && !cand.offload)
      unquantized_seconds_[{cand.precision, cand.frozen_dtype, cand.checkpoint}] = p.step_seconds;
    if (smallest_frozen_ < 0 || frozen_bytes(p) < smallest_frozen_) {
      smallest_frozen_ = frozen_bytes(p);
      smallest_frozen_settings_ = settings_text(cand);
    }
    if (frozen_bytes(p) > usable_) return;
    const MemoryEstimate one = estimate_memory(p, 1);
    if (smallest_need_ < 0 || planned_bytes(one, device_) < smallest_need_) {
      smallest_need_ = planned_bytes(one, device_);
      smallest_settings_ = settings_text(cand) + ", micro-batch 1";
    }
    int64_t m = std::min(largest_micro_batch(p, usable_), effective_);
    while (m > 0 && effective_ % m != 0) --m;  // micro-batches that divide the effective batch keep it
    if (m == 0) return;
    const double score = throughput_score(cand, m);
    if (score <= best_score_) return;
    best_score_ = score;
    result_.fit = fit_of(cand, p, m);
  }

  // The best fit, or what the smallest run would need.
  FitResult result(int64_t budget) const {
    if (smallest_frozen_ < 0) throw RuntimeFailure("no setting could run a training step: " + first_line(last_error_));
    if (smallest_need_ < 0)
      throw InputError("memory " + human_bytes(static_cast<double>(budget)) + " is below what the frozen weights alone "
                       "take (" + human_bytes(static_cast<double>(smallest_frozen_)) + " with " +
                       smallest_frozen_settings_ + ", of " + human_bytes(static_cast<double>(usable_)) +
                       " usable): choose a smaller model");
    FitResult out = result_;
    if (!out.fit)
      out.failure = "nothing fits in " + human_bytes(static_cast<double>(budget)) + " (" +
                    human_bytes(static_cast<double>(usable_)) + " usable): the smallest run needs " +
                    human_bytes(static_cast<double>(smallest_need_)) + " (" + smallest_settings_ + ")";
    return out;
  }

 private:
  MemoryFit fit_of(const Candidate& cand, const MemoryProfile& p, int64_t m) const {
    MemoryFit f;
    f.micro_batch = m;
    f.accumulation = effective_ / m;
    f.checkpoint = cand.checkpoint;
    f.precision = cand.precision;
    f.frozen_dtype = cand.frozen_dtype;
    f.frozen_quant = cand.quant;
    f.offload = cand.offload;
    const auto plain = unquantized_seconds_.find({cand.precision, cand.frozen_dtype, cand.checkpoint});
    if ((cand.quant != QuantFormat::kNone || cand.offload) && plain != unquantized_seconds_.end() && plain->second > 0)
      f.step_time_ratio = p.step_seconds / plain->second;
    f.estimate = estimate_memory(p, m);
    f.overrides = overrides_for(config_, f);
    return f;
  }

  const TrainConfig& config_;
  int64_t classes_;
  c10::Device device_;
  int64_t usable_, effective_;
  FitResult result_;
  double best_score_ = 0;
  int64_t smallest_need_ = -1, smallest_frozen_ = -1;
  std::string smallest_settings_, smallest_frozen_settings_, last_error_;
  std::map<std::tuple<Precision, at::ScalarType, bool>, double> unquantized_seconds_;  // step time without quant/offload
};

}  // namespace

FitResult fit_memory(const TrainConfig& config, int64_t classes, int64_t budget) {
  const c10::Device device = resolve_device(config.device);
  FitSearch search(config, classes, device, usable_memory(budget, device));
  for (const Candidate& cand : candidates(config, device)) search.consider(cand);
  // When the cheaper choices do not fit: quantise the frozen weights (int8 before nf4); when that does not either,
  // keep the blocks' weights and saved inputs in host memory.
  for (const auto& more : {quantized_candidates(config, device), offload_candidates(config, device)})
    for (const Candidate& cand : more) {
      if (search.found()) break;
      search.consider(cand);
    }
  return search.result(budget);
}

}  // namespace loratune
