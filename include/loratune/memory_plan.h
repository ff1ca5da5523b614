// Peak memory of a training run before it starts (`loratune plan`), and the settings that fit a memory budget
// (`plan --memory`, `train --fit-memory`).
//
// A run's tensor memory is a fixed part (weights, trainable tensors with their gradients and AdamW moments, runtime
// buffers) plus a part that grows linearly with the micro-batch (the input, activations kept for backward, backward
// buffers). For a model bundle the linear part is measured: two small training steps (micro-batches 2 and 4) on the
// run's device, with the allocator counting tensor bytes, after and during the step; that sees the real kernels
// (fused or plain attention, autocast copies, what autograd saves). Standard ViT shapes without weights use a
// formula of the same form (vit_memory_profile), checked against measurements in docs/benchmarks.md.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "loratune/amp.h"
#include "loratune/config.h"
#include "loratune/quantize.h"

namespace loratune {

inline constexpr int64_t kMiB = int64_t{1} << 20;  // sizes in plans and their messages

// "12GB", "12 GiB", "11.5G", "900MB": G, GB and GiB all mean 2^30 bytes (as GPU memory is counted), M, MB and
// MiB 2^20. InputError with a one-line hint otherwise.
int64_t parse_memory_size(const std::string& text);

// bytes = fixed + per_image * micro_batch
struct LinearBytes {
  int64_t fixed = 0;
  int64_t per_image = 0;
  int64_t at(int64_t micro_batch) const { return fixed + per_image * micro_batch; }
};

// How one setting (precision, frozen dtype, checkpointing) of one model uses memory.
struct MemoryProfile {
  std::string source;  // how the numbers were obtained
  c10::Device device{c10::kCPU};
  Precision precision = Precision::kFp32;
  at::ScalarType frozen_dtype = at::kFloat;
  QuantFormat frozen_quant = QuantFormat::kNone;
  bool checkpoint = false;
  double step_seconds = 0;  // measured profiles: wall time of the probe's step of 4 images
  std::vector<std::pair<std::string, int64_t>> frozen_by_dtype;  // frozen weight bytes per dtype name
  int64_t trainable_parameters = 0;  // each holds 16 bytes: fp32 value, gradient, two AdamW moments
  int64_t extra_fixed = 0;           // the rest of the measured baseline (CUDA: cuBLAS workspaces), or a constant
  int64_t input_per_image = 0;       // the batch on the device
  int64_t trained_blocks = 0;        // blocks that keep activations (no checkpointing) or their outputs
  int64_t block_output_per_image = 0;
  LinearBytes kept;   // activations kept for backward at the end of the forward pass
  LinearBytes extra;  // above `kept` at the step's peak: backward buffers, recomputed blocks, workspaces
  int64_t prefix_peak_per_image = 0;  // formula only: the no-grad frozen prefix's largest activations, when they
                                      // exceed the step's (measured profiles see it in their peak)
  int64_t host_batch_bytes_per_image = 0;  // one decoded image in the data pipeline (host memory)
  int64_t host_batches = 0;                // batches the loader holds (prefetched and in the workers)
  // CPU only: the process's resident memory beyond tensors during the probe's step of 4 images (libraries, thread
  // stacks, the caching allocator's free blocks), measured.
  int64_t process_baseline = 0;
  // CPU only: the process's resident peak while the model loads (with quantised frozen weights: the dense model
  // before quantising), measured. The run's peak RSS is the larger of this and the training peak.
  int64_t load_peak_rss = 0;
  int64_t resize_size = 0;  // the model's: photos are cached (data.cache) at this short side
  // offload (CUDA): what waits in pinned host memory, not on the device: frozen weights, and the checkpointed
  // blocks' saved inputs per image.
  int64_t host_offload_fixed = 0;
  int64_t host_offload_per_image = 0;
};

struct MemoryItem {
  std::string name;
  int64_t bytes = 0;
  std::string detail;
};

// The predicted peak for one micro-batch: items on the device adding up to `total`; the data pipeline's host
// buffers apart (they count against the budget only when the device is the CPU).
struct MemoryEstimate {
  std::vector<MemoryItem> items;
  int64_t total = 0;
  int64_t host_buffers = 0;
  int64_t host_offload = 0;  // offload: pinned host memory (weights and saved block inputs)
};
MemoryEstimate estimate_memory(const MemoryProfile& profile, int64_t micro_batch);

// Memory a run may plan for out of `budget`: 10% is kept free for the allocators' rounding and fragmentation (the
// CUDA caching allocator reserved up to 6.5% above its allocated peak at a 12 GiB cap), and on CUDA 512 MiB more for
// the context and libraries, which live outside the allocator. The data pipeline counts on the CPU.
int64_t usable_memory(int64_t budget, const c10::Device& device);
int64_t planned_bytes(const MemoryEstimate& estimate, const c10::Device& device);

// Largest micro-batch whose estimate fits `usable` bytes (0 if none).
int64_t largest_micro_batch(const MemoryProfile& profile, int64_t usable);

// Measures the profile of `config`'s run on its device with this precision, frozen dtype, quantisation and
// checkpointing: builds the model as training does (`classes` sets the head size) and runs steps of micro-batches
// 2 and 4.
MemoryProfile probe_memory(const TrainConfig& config, int64_t classes, Precision precision, at::ScalarType frozen_dtype,
                           bool checkpoint, QuantFormat frozen_quant = QuantFormat::kNone);

// The settings chosen for a budget, as --set overrides of the config.
struct MemoryFit {
  int64_t micro_batch = 0, accumulation = 1;
  bool checkpoint = false;
  Precision precision = Precision::kFp32;
  at::ScalarType frozen_dtype = at::kFloat;
  QuantFormat frozen_quant = QuantFormat::kNone;
  bool offload = false;        // offload both (CUDA)
  double step_time_ratio = 0;  // quantised or offloaded fits: the probe's step time over the plain one's (same settings)
  MemoryEstimate estimate;
  std::vector<std::string> overrides;  // "batch_size=16", ...
};
struct FitResult {
  std::optional<MemoryFit> fit;
  std::string failure;  // one line when nothing fits: the minimum needed and with which settings
};
// Tries the precisions and frozen dtypes the config leaves open ("auto"), checkpointing off and on, and the
// micro-batches that divide the effective batch (batch_size x grad_accum_steps); picks the fastest that fits
// (16-bit over fp32, no checkpointing over checkpointing, larger micro-batches). When nothing fits that way and the
// config leaves the frozen weights unquantised (method lora), int8 and then nf4 weights with checkpointing; on CUDA, when
// that fails too, offload both, then offload both with nf4 weights. InputError
// when the budget is below the frozen weights alone in the most compact form tried.
FitResult fit_memory(const TrainConfig& config, int64_t classes, int64_t budget);
// For a fit with quantised frozen weights or offload, its cost in time as measured by the probes; "" otherwise.
std::string fit_cost_note(const MemoryFit& fit);

// Standard shapes for `plan --table` (no weights needed).
struct ArchitectureShape {
  std::string name;
  int64_t image_size = 224, patch = 16;
  int64_t tokens = 0;  // sequence length of the trained blocks (patches + class/register tokens)
  int64_t dim = 0, mlp = 0, heads = 0, blocks = 0;
  int64_t parameters = 0;               // whole image encoder
  int64_t frozen_prefix_per_image = 0;  // largest no-grad activation before the trained blocks (hybrid models)
  std::string note;
};
std::vector<ArchitectureShape> standard_architectures();

enum class Tuning { kLora, kFull };
// The formula for a transformer with fused (sdpa) attention on CUDA under 16-bit autocast: LoRA r8 on query/value
// without dropout and frozen weights in 16 bits (or the blocks' Linear weights in `quant`), or full fine-tuning with
// fp32 master weights. `offload` (LoRA with checkpointing): offload both, the blocks' Linear weights and saved inputs
// in host memory, two blocks' on the GPU.
MemoryProfile vit_memory_profile(const ArchitectureShape& shape, Tuning tuning, bool checkpoint,
                                 QuantFormat quant = QuantFormat::kNone, bool offload = false);

}  // namespace loratune
