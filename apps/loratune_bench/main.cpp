// Measurements for scripts/bench/run_benchmarks.py (one JSON line on stdout per run):
//   loratune_bench step   MODEL BATCH PRECISION CHECKPOINT STEPS   training step time and peak RSS
//   loratune_bench loader FOLDER BATCH WORKERS BATCHES             images/s of the photo loader (train transform)
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "loratune/amp.h"
#include "loratune/cpu_allocator.h"
#include "loratune/image.h"
#include "loratune/loader.h"
#include "loratune/memory.h"
#include "loratune/model.h"
#include "loratune/optim.h"

using namespace loratune;
using Clock = std::chrono::steady_clock;

namespace {

int step_benchmark(const std::string& model_path, int64_t batch, const std::string& precision_name, bool checkpoint,
                   int steps) {
  torch::manual_seed(0);
  Model model(load_bundle(model_path));
  auto targets = resolve_targets(model.module(), LoraSettings{});
  init_adapter_tensors(targets);
  model.set_adapters(targets, 0.0);
  model.init_head(10);
  const c10::Device cpu(c10::kCPU);
  const Precision precision = resolve_precision(precision_name, cpu);
  AdamW optimizer(model.trainable(), AdamWOptions{});
  const int64_t s = model.bundle().info.image_size;
  const at::Tensor x = at::randn({batch, 3, s, s});
  const at::Tensor y = at::arange(batch, at::kLong) % 10;
  const int64_t setup_peak = read_memory(cpu).peak_rss;
  std::vector<double> times;
  for (int i = 0; i < steps; ++i) {
    const auto t0 = Clock::now();
    at::Tensor logits;
    {
      AutocastScope autocast(cpu, precision);
      logits = model.logits(x, checkpoint);
    }
    at::cross_entropy_loss(logits.to(at::kFloat), y).backward();
    clip_grad_norm(model.trainable(), 1.0);
    optimizer.step(1e-4);
    optimizer.zero_grad();
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::vector<double> timed(times.begin() + std::min<size_t>(2, times.size() - 1), times.end());
  std::sort(timed.begin(), timed.end());
  std::printf("{\"median_step_s\": %.5f, \"steps\": %zu, \"peak_rss\": %lld, \"setup_peak_rss\": %lld}\n",
              timed[timed.size() / 2], timed.size(), static_cast<long long>(read_memory(cpu).peak_rss),
              static_cast<long long>(setup_peak));
  return 0;
}

int loader_benchmark(const std::string& folder, int64_t batch, int workers, int batches) {
  LoaderOptions o;
  o.batch_size = batch;
  o.shuffle = o.augment = o.drop_last = true;
  o.workers = workers;
  o.cache = "off";
  Preprocess p;
  p.image_size = 224;
  p.resize_size = 256;
  p.interpolation = 1;
  p.mean = {0.485f, 0.456f, 0.406f};
  p.std = {0.229f, 0.224f, 0.225f};
  ImageBatchSource source(scan_image_folder(folder), p, o);
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

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> a(argv + 1, argv + argc);
  at::set_num_threads(2);
  if (!std::getenv("LORATUNE_PLAIN_ALLOCATOR")) install_caching_cpu_allocator();
  if (a.size() == 6 && a[0] == "step") return step_benchmark(a[1], std::stoll(a[2]), a[3], a[4] == "1", std::stoi(a[5]));
  if (a.size() == 5 && a[0] == "loader") return loader_benchmark(a[1], std::stoll(a[2]), std::stoi(a[3]), std::stoi(a[4]));
  std::fprintf(stderr, "usage: loratune_bench step MODEL BATCH fp32|bf16 CHECKPOINT(0|1) STEPS\n"
                       "       loratune_bench loader FOLDER BATCH WORKERS BATCHES\n");
  return 2;
}
