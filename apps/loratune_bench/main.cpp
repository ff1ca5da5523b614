// Measurements for scripts/bench/ and scripts/gpu/ (one JSON line on stdout per run). Arguments are key=value.
//   loratune_bench step   model=M batch=B precision=fp32|bf16|fp16 checkpoint=0|1 steps=N [device=cpu|cuda]
//                         [threads=2|auto] [last_blocks=N] [save=ADAPTER_DIR] [probe=INPUT.safetensors] [phase_steps=N]
//                         [frozen=int8|nf4]
//       LoRA (r8, alpha 16, q/v) training steps on one fixed batch: median step time, peak memory (RSS, CUDA
//       allocator, and the peak tensor bytes that `loratune plan` predicts), and with
//       phase_steps the mean seconds of forward, backward and optimizer over N more steps; optionally
//       saves the adapter and writes the trained model's logits on the probe input to <probe>.logits.safetensors.
//   loratune_bench logits model=M adapter=A input=IN.safetensors out=OUT.safetensors [device=cpu|cuda]
//       Logits of base + adapter (loratune's or PEFT's) on an input.
//   loratune_bench allreduce model=M [iterations=50]       (each worker, with RANK, WORLD_SIZE, MASTER_ADDR/PORT)
//       Median time to sum the model's LoRA r8 q/v gradients over the data-parallel workers.
//   loratune_bench maxbatch model=M [precision=fp16] [checkpoint=1] [start=8] [max=4096] [device=cuda]
//       The largest batch whose training step fits in memory (cap it with LORATUNE_CUDA_MEMORY_GB=12).
//   loratune_bench import source=FOLDER|hf:ID output=FILE [tower=text]
//       `loratune import` where the CLI is not built (the GPU machine has no OpenCV).
//   loratune_bench loader folder=F batch=B workers=W batches=N        (builds with OpenCV only)
//       Images per second of the threaded photo loader.
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "loratune/adapter_binding.h"
#include "loratune/amp.h"
#include "loratune/cpu_allocator.h"
#include "loratune/device.h"
#include "loratune/errors.h"
#include "loratune/import.h"
#include "loratune/memory.h"
#include "loratune/model.h"
#include "loratune/threads.h"
#include "loratune/optim.h"
#include "loratune/process_group.h"
#include "loratune/safetensors.h"
#include "loratune/train_step.h"
#include "loratune/training_setup.h"
#ifdef LORATUNE_WITH_VISION
#include "loratune/image.h"
#include "loratune/transform.h"
#include "loratune/loader.h"
#endif

using namespace loratune;
using Clock = std::chrono::steady_clock;
using Args = std::map<std::string, std::string>;

namespace {

std::string get(const Args& a, const std::string& key, const std::string& fallback = "") {
  auto it = a.find(key);
  if (it != a.end()) return it->second;
  if (fallback.empty()) throw InputError("missing argument " + key + "=...");
  return fallback;
}

void sync(const c10::Device& device) {
  if (device.is_cuda()) at::zeros({1}, at::TensorOptions().device(device)).item<float>();
}

// The model as `loratune train` builds it (seed 0, LoRA r8 on q/v without dropout, a 10-class head), on `device`
// with frozen weights in 16 bits under mixed precision on CUDA, as `loratune train` does by default; frozen=int8|nf4
// quantises the blocks' Linear weights (frozen_dtype int8 / nf4).
std::unique_ptr<Model> benchmark_model(const Args& a, const c10::Device& device, Precision precision,
                                       std::vector<std::string>& class_names) {
  nlohmann::json config = {{"model", get(a, "model")}, {"data", {{"train", "-"}}}, {"lora", {{"dropout", 0.0}}}};
  if (a.count("last_blocks")) config["lora"]["last_blocks"] = std::stoll(a.at("last_blocks"));
  class_names.clear();
  for (int c = 0; c < 10; ++c) class_names.push_back("class_" + std::to_string(c));
  auto model = build_training_model(parse_train_config(config, "benchmark"), class_names);
  const QuantFormat quant = parse_quant_format(get(a, "frozen", "none"), "frozen");
  model->to(device, precision != Precision::kFp32 && device.is_cuda() ? compute_dtype(precision) : at::kFloat, quant);
  return model;
}

// The median of `v` after the warm-up steps (the first fifth, at least 2), and how many steps it covers.
std::pair<double, size_t> median_after_warmup(std::vector<double> v) {
  v.erase(v.begin(), v.begin() + std::min<size_t>(std::max<size_t>(2, v.size() / 5), v.size() - 1));
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.size()};
}

// --save: the adapter as trained; --probe FILE: the logits of FILE's "input" into FILE.logits.safetensors.
void write_requested_outputs(const Args& a, Model& model, const std::vector<std::string>& class_names,
                             const c10::Device& device) {
  if (a.count("save")) save_adapter(a.at("save"), adapter_from_model(model, class_names, {}));
  if (a.count("probe")) {
    const auto input = safetensors::read(a.at("probe")).tensors.at("input");
    at::NoGradGuard no_grad;
    safetensors::write(a.at("probe") + ".logits.safetensors", {{"logits", model.logits(input.to(device)).to(at::kCPU)}});
  }
}

int step_benchmark(const Args& a) {
  const c10::Device device = resolve_device(get(a, "device", "cpu"));
  const int64_t batch = std::stoll(get(a, "batch"));
  const bool checkpoint = get(a, "checkpoint", "0") == "1";
  const int steps = std::stoi(get(a, "steps"));
  const Precision precision = resolve_precision(get(a, "precision", "fp32"), device);
  std::vector<std::string> class_names;
  auto built = benchmark_model(a, device, precision, class_names);
  Model& model = *built;
  const int64_t setup_peak = peak_memory(device);
  reset_peak_memory(device);
  AdamW optimizer(model.trainable(), AdamWOptions{});
  LossScaler scaler(precision == Precision::kFp16, LossScaler::Options{});
  const int64_t s = model.bundle().info.image_size;
  const at::Tensor x = at::randn({batch, 3, s, s}).to(device);
  const at::Tensor y = (at::arange(batch, at::kLong) % 10).to(device);
  // One training step; with `phases`, waits for the device after each part and adds the part's seconds there.
  auto train_step = [&](std::vector<double>* phases) {
    auto mark = [&](size_t part, Clock::time_point& since) {
      if (!phases) return;
      sync(device);
      const auto now = Clock::now();
      (*phases)[part] += std::chrono::duration<double>(now - since).count();
      since = now;
    };
    auto since = Clock::now();
    at::Tensor logits;
    {
      AutocastScope autocast(device, precision);
      logits = model.logits(x, checkpoint);
    }
    mark(0, since);
    backward_micro_batch(logits, y, 1.0, scaler);
    mark(1, since);
    apply_step(optimizer, scaler, 1e-4, 1.0);
    mark(2, since);
  };
  // Step time, and the host's share of it: the time to issue the step's work (equal to the step time when the
  // device waits for the host).
  // threads=auto: the tuner sees every step, as in training.
  ThreadTuner threads(parse_threads(get(a, "threads", "2")));
  std::vector<double> times, host_times;
  for (int i = 0; i < steps; ++i) {
    sync(device);
    const auto t0 = Clock::now();
    train_step(nullptr);
    host_times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    sync(device);
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    threads.record(times.back(), batch);
  }
  const auto [median, timed_steps] = median_after_warmup(times);
  // The mean over the same steps: what a run pays, probes of threads=auto included.
  const double mean = std::accumulate(times.end() - static_cast<std::ptrdiff_t>(timed_steps), times.end(), 0.0) /
                      static_cast<double>(timed_steps);
  std::string thread_counts;
  for (const int n : threads.history()) thread_counts += (thread_counts.empty() ? "" : ",") + std::to_string(n);
  const double host_median = median_after_warmup(host_times).first;
  // Where the time goes (separate steps: waiting between the parts removes their overlap with the host).
  const int phase_steps = std::stoi(get(a, "phase_steps", "0"));
  std::vector<double> phases(3, 0.0);
  for (int i = 0; i < phase_steps; ++i) train_step(&phases);
  write_requested_outputs(a, model, class_names, device);
  const MemoryReading m = read_memory(device);
  const int64_t peak_tensors = tensor_bytes(device).peak;
  const double per_step = std::max(phase_steps, 1);
  std::printf("{\"median_step_s\": %.5f, \"mean_step_s\": %.5f, \"threads\": [%s], \"images_per_s\": %.2f, \"steps\": %zu, "
              "\"peak_rss\": %lld, \"setup_peak\": %lld, \"device_peak_allocated\": %lld, \"peak_tensor_bytes\": %lld, "
              "\"host_s\": %.5f, \"forward_s\": %.5f, \"backward_s\": %.5f, \"optimizer_s\": %.5f}\n",
              median, mean, thread_counts.c_str(), batch / median, timed_steps, static_cast<long long>(m.peak_rss),
              static_cast<long long>(setup_peak), static_cast<long long>(m.device_peak_allocated), static_cast<long long>(peak_tensors), host_median, phases[0] / per_step,
              phases[1] / per_step, phases[2] / per_step);
  return 0;
}

// The largest batch whose training step (forward, backward, update) fits: doubling from `start`, then bisection,
// in one process (an out-of-memory step frees what it held). Cap the memory with LORATUNE_CUDA_MEMORY_GB.
int largest_batch(const Args& a) {
  const c10::Device device = resolve_device(get(a, "device", "cuda"));
  const bool checkpoint = get(a, "checkpoint", "1") == "1";
  const Precision precision = resolve_precision(get(a, "precision", "fp16"), device);
  std::vector<std::string> class_names;
  auto model = benchmark_model(a, device, precision, class_names);
  AdamW optimizer(model->trainable(), AdamWOptions{});
  LossScaler scaler(precision == Precision::kFp16, LossScaler::Options{});
  const int64_t s = model->bundle().info.image_size;
  std::map<int64_t, int64_t> peaks;  // batch -> peak allocated; -1: out of memory
  auto fits = [&](int64_t batch) {
    bool ok = true;
    try {
      const at::Tensor x = at::randn({batch, 3, s, s}, at::TensorOptions().device(device));
      const at::Tensor y = at::arange(batch, at::TensorOptions().dtype(at::kLong).device(device)) % 10;
      reset_peak_memory(device);
      for (int step = 0; step < 2; ++step) {
        at::Tensor logits;
        {
          AutocastScope autocast(device, precision);
          logits = model->logits(x, checkpoint);
        }
        backward_micro_batch(logits, y, 1.0, scaler);
        apply_step(optimizer, scaler, 1e-4, 1.0);
      }
      peaks[batch] = peak_memory(device);
    } catch (const std::exception& e) {
      if (!is_out_of_memory(e)) throw;
      ok = false;
      peaks[batch] = -1;
    }
    discard_gradients(model->trainable());
    release_cached_device_memory();
    return ok;
  };
  int64_t good = 0, bad = std::stoll(get(a, "max", "4096")) + 1;
  for (int64_t b = std::stoll(get(a, "start", "8")); b < bad; b *= 2) {
    if (!fits(b)) {
      bad = b;
      break;
    }
    good = b;
  }
  while (bad - good > 1) {
    const int64_t mid = (good + bad) / 2;
    (fits(mid) ? good : bad) = mid;
  }
  std::string tried;
  for (const auto& [batch, peak] : peaks) tried += (tried.empty() ? "" : ", ") + std::string("\"") + std::to_string(batch) +
                                                   "\": " + std::to_string(peak);
  std::printf("{\"largest_batch\": %lld, \"peak_allocated\": %lld, \"tried\": {%s}}\n", static_cast<long long>(good),
              static_cast<long long>(good > 0 ? peaks[good] : -1), tried.c_str());
  return 0;
}

// One data-parallel worker (start it with torchrun's variables): the time of summing the model's LoRA gradients
// over the workers, as the trainer does once per optimiser step.
int all_reduce_benchmark(const Args& a) {
  const WorkerEnvironment env = worker_environment();
  auto group = ProcessGroup::join(env, distributed_timeout());
  std::vector<std::string> class_names;
  auto model = benchmark_model(a, c10::Device(c10::kCPU), Precision::kFp32, class_names);
  std::vector<at::Tensor> grads;
  int64_t floats = 0;
  for (const auto& t : model->trainable()) {
    grads.push_back(at::randn_like(t.tensor));
    floats += t.tensor.numel();
  }
  const int iterations = std::stoi(get(a, "iterations", "50"));
  std::vector<double> times;
  for (int i = 0; i < iterations + 5; ++i) {
    group->barrier();
    const auto t0 = Clock::now();
    group->sum(grads);
    if (i >= 5) times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  if (group->rank() == 0)
    std::printf("{\"workers\": %d, \"floats\": %lld, \"median_s\": %.6f, \"p90_s\": %.6f}\n", group->size(),
                static_cast<long long>(floats), times[times.size() / 2], times[times.size() * 9 / 10]);
  return 0;
}

int logits_of_adapter(const Args& a) {
  const c10::Device device = resolve_device(get(a, "device", "cpu"));
  Model model(load_bundle(get(a, "model")));
  apply_adapter(model, load_adapter(get(a, "adapter")), get(a, "adapter"));
  model.to(device);
  const auto input = safetensors::read(get(a, "input")).tensors.at("input");
  at::NoGradGuard no_grad;
  safetensors::write(get(a, "out"), {{"logits", model.logits(input.to(device)).to(at::kCPU)}});
  std::printf("{\"written\": \"%s\"}\n", get(a, "out").c_str());
  return 0;
}

#ifdef LORATUNE_WITH_VISION
int loader_benchmark(const Args& a) {
  LoaderOptions o;
  o.batch_size = std::stoll(get(a, "batch"));
  o.shuffle = o.augment = o.drop_last = true;
  o.workers = std::stoi(get(a, "workers"));
  o.cache = CacheMode::kOff;
  Preprocess p;
  p.image_size = 224;
  p.resize_size = 256;
  p.interpolation = 1;
  p.mean = {0.485f, 0.456f, 0.406f};
  p.std = {0.229f, 0.224f, 0.225f};
  ImageBatchSource source(scan_image_folder(get(a, "folder")), p, o);
  const int batches = std::stoi(get(a, "batches"));
  source.start_epoch(0, 0);
  source.next();  // warm-up: threads started, first batch decoded
  const auto t0 = Clock::now();
  int64_t images = 0;
  for (int i = 0; i < batches; ++i) {
    auto b = source.next();
    if (!b) source.start_epoch(i + 1, 0), b = source.next();
    images += b->images.size(0);
  }
  const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("{\"images_per_s\": %.2f, \"images\": %lld}\n", images / dt, static_cast<long long>(images));
  return 0;
}
#endif

}  // namespace

// The text tower of a CLIP with tower=text.
int import_checkpoint_to_file(const Args& a) {
  const Tower tower = get(a, "tower", "image") == "text" ? Tower::text : Tower::image;
  ImportedModel m = import_checkpoint(get(a, "source"), tower);
  m.metadata.erase("text_model");
  save_bundle(m.module, BundleInfo::from_json(m.metadata, get(a, "source")), get(a, "output"), {}, m.extra_files);
  std::printf("wrote %s\n", get(a, "output").c_str());
  return 0;
}

int main(int argc, char** argv) {
  if (!std::getenv("LORATUNE_PLAIN_ALLOCATOR")) install_caching_cpu_allocator();
  if (argc < 2) {
    std::fprintf(stderr, "usage: loratune_bench step|logits|maxbatch|allreduce|import|loader key=value ... (see apps/loratune_bench/main.cpp)\n");
    return 2;
  }
  Args args;
  for (int i = 2; i < argc; ++i) {
    const std::string kv = argv[i];
    const size_t eq = kv.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "error: expected key=value, got %s\n", argv[i]);
      return 2;
    }
    args[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  set_compute_threads(parse_threads(get(args, "threads", "2")));
  if (const char* limit = std::getenv("LORATUNE_CUDA_MEMORY_GB")) limit_device_memory(std::stod(limit));
  try {
    const std::string mode = argv[1];
    if (mode == "step") return step_benchmark(args);
    if (mode == "logits") return logits_of_adapter(args);
    if (mode == "maxbatch") return largest_batch(args);
    if (mode == "allreduce") return all_reduce_benchmark(args);
    if (mode == "import") return import_checkpoint_to_file(args);
#ifdef LORATUNE_WITH_VISION
    if (mode == "loader") return loader_benchmark(args);
#endif
    std::fprintf(stderr, "error: unknown mode %s\n", argv[1]);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 4;
  }
}
