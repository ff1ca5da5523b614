// The memory planner against measurements: a training step on the CPU (tensor bytes counted by the caching
// allocator) and the CUDA peaks measured on an H200 (docs/benchmarks.md) for the formula of standard shapes.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include "loratune/cpu_allocator.h"
#include "loratune/errors.h"
#include "loratune/memory.h"
#include "loratune/memory_plan.h"
#include "loratune/model.h"
#include "loratune/train_step.h"
#include "loratune/training_setup.h"
#include "test_support.h"

namespace loratune {
namespace {

TrainConfig tiny_config(bool checkpoint, const std::string& precision) {
  nlohmann::json j = {{"model", test::fixture("models/hf_trace.pt").string()},
                      {"data", {{"train", "-"}}},
                      {"lora", {{"dropout", 0.1}}},
                      {"precision", precision},
                      {"gradient_checkpointing", checkpoint},
                      {"device", "cpu"}};
  return parse_train_config(j, "test");
}

// Peak tensor bytes of two real training steps of `batch` images, from before the model is built.
int64_t measured_step_peak(const TrainConfig& c, int64_t batch, int64_t classes) {
  install_caching_cpu_allocator();
  const c10::Device cpu(c10::kCPU);
  const int64_t before = tensor_bytes(cpu).current;
  reset_peak_memory(cpu);
  std::vector<std::string> names;
  for (int64_t i = 0; i < classes; ++i) names.push_back("c" + std::to_string(i));
  auto model = build_training_model(c, names);
  model->set_training(true);
  auto optimizer = make_optimizer(c, *model);
  auto scaler = make_loss_scaler(c, resolve_precision(c.precision, cpu));
  const int64_t s = model->bundle().info.image_size;
  const at::Tensor x = at::randn({batch, 3, s, s}), y = at::arange(batch, at::kLong) % classes;
  for (int step = 0; step < 2; ++step) {
    at::Tensor logits;
    {
      AutocastScope autocast(cpu, resolve_precision(c.precision, cpu));
      logits = model->logits(x, c.gradient_checkpointing);
    }
    backward_micro_batch(logits, y, 1.0, *scaler);
    apply_step(*optimizer, *scaler, c.optim.lr, c.optim.grad_clip);
  }
  return tensor_bytes(cpu).peak - before;
}

TEST(MemoryPlan, PredictsTheMeasuredPeakOfATrainingStep) {
  for (const bool checkpoint : {false, true})
    for (const std::string precision : {"fp32", "bf16"}) {
      const TrainConfig c = tiny_config(checkpoint, precision);
      const MemoryProfile p = probe_memory(c, 5, resolve_precision(precision, c10::Device(c10::kCPU)), at::kFloat, checkpoint);
      for (const int64_t batch : {1, 12, 48}) {
        const int64_t predicted = estimate_memory(p, batch).total;
        const int64_t measured = measured_step_peak(c, batch, 5);
        EXPECT_NEAR(static_cast<double>(predicted) / measured, 1.0, 0.05)
            << precision << (checkpoint ? " checkpointing" : "") << " batch " << batch << ": predicted " << predicted
            << ", measured " << measured;
      }
    }
}

TEST(MemoryPlan, EstimateAddsUpAndGrowsLinearly) {
  const TrainConfig c = tiny_config(true, "fp32");
  c10::SetCPUAllocator(c10::GetDefaultCPUAllocator(), /*priority=*/1);  // a caller without the caching allocator
  const MemoryProfile p = probe_memory(c, 3, Precision::kFp32, at::kFloat, true);
  EXPECT_EQ(c10::GetCPUAllocator(), c10::GetDefaultCPUAllocator()) << "probing leaves the caller's allocator";
  install_caching_cpu_allocator();
  EXPECT_EQ(p.trained_blocks, 2);
  EXPECT_GT(p.kept.per_image, 0);
  EXPECT_GT(p.extra.per_image, 0);
  const MemoryEstimate e8 = estimate_memory(p, 8), e16 = estimate_memory(p, 16), e24 = estimate_memory(p, 24);
  int64_t sum = 0;
  for (const auto& item : e8.items) sum += item.bytes;
  EXPECT_EQ(sum, e8.total);
  EXPECT_EQ(e24.total - e16.total, e16.total - e8.total);
  EXPECT_EQ(largest_micro_batch(p, planned_bytes(e16, p.device)), 16);  // on the CPU the data pipeline counts too
  EXPECT_EQ(largest_micro_batch(p, planned_bytes(e16, p.device) - 1), 15);
}

TEST(MemoryPlan, ParsesMemorySizes) {
  EXPECT_EQ(parse_memory_size("12GB"), int64_t{12} << 30);
  EXPECT_EQ(parse_memory_size("12 GiB"), int64_t{12} << 30);
  EXPECT_EQ(parse_memory_size("11.5g"), static_cast<int64_t>(11.5 * (int64_t{1} << 30)));
  EXPECT_EQ(parse_memory_size("900MB"), int64_t{900} << 20);
  for (const char* bad : {"", "12", "GB", "-1GB", "0GB", "1.2.3GB", "12 potatoes", "1e400GB", "nanGB"})
    EXPECT_THROW(parse_memory_size(bad), InputError) << bad;
}

TEST(MemoryPlan, FitKeepsTheEffectiveBatchAndRefusesTooLittleMemory) {
  TrainConfig c = tiny_config(false, "fp32");
  c.batch_size = 16;
  const MemoryProfile p = probe_memory(c, 3, Precision::kFp32, at::kFloat, false);
  const int64_t budget = estimate_memory(p, 6).total * 10 / 9 + planned_bytes(estimate_memory(p, 0), p.device) / 20;
  const FitResult r = fit_memory(c, 3, budget);
  ASSERT_TRUE(r.fit) << r.failure;
  EXPECT_EQ(r.fit->micro_batch * r.fit->accumulation, 16);
  EXPECT_LE(planned_bytes(r.fit->estimate, p.device), usable_memory(budget, p.device));
  EXPECT_THROW(fit_memory(c, 3, 1024), InputError);  // below the frozen weights
}

// The formula for standard shapes against the peaks the CUDA allocator reported on an H200 (torch 2.11, LoRA r8
// q/v, fp16, frozen weights fp16; scripts/gpu/bench_peft.py, docs/benchmarks.md).
TEST(MemoryPlan, FormulaMeetsTheCudaPeaksMeasuredOnAnH200) {
  std::map<std::string, ArchitectureShape> shapes;
  for (const auto& s : standard_architectures()) shapes[s.name] = s;
  struct Measured {
    const char* model;
    bool checkpoint;
    int64_t batch, peak;
  };
  for (const Measured& m : {Measured{"ViT-B/16", true, 1024, 12059095552}, Measured{"ViT-L/16", true, 583, 12353142272},
                            Measured{"ViT-H/14", true, 294, 12387840512}, Measured{"ViT-B/16", true, 32, 627935744},
                            Measured{"ViT-B/16", false, 32, 1980095488}, Measured{"ViT-B/16", true, 8, 356072960}}) {
    const int64_t predicted = estimate_memory(vit_memory_profile(shapes.at(m.model), Tuning::kLora, m.checkpoint), m.batch).total;
    EXPECT_NEAR(static_cast<double>(predicted) / m.peak, 1.0, 0.05)
        << m.model << " batch " << m.batch << (m.checkpoint ? " checkpointing" : "") << ": predicted " << predicted;
  }
}

}  // namespace
}  // namespace loratune
