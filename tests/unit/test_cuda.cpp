// What only runs on CUDA: fp16 with the loss scaler's CUDA kernels, bf16, the allocator's peak with and without
// checkpointing, and merged-on-CPU vs adapted-on-GPU. Skipped where LibTorch sees no GPU.
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include "loratune/adapter_binding.h"
#include "loratune/targets.h"
#include "loratune/amp.h"
#include "loratune/device.h"
#include "loratune/memory.h"
#include "loratune/merge.h"
#include "loratune/model.h"
#include "loratune/optim.h"
#include "loratune/safetensors.h"
#include "loratune/train_step.h"
#include "test_support.h"

namespace loratune {
namespace {

using test::fixture;

class Cuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
  const c10::Device gpu{c10::kCUDA, 0};

  std::unique_ptr<Model> lora_model(const std::string& name, at::ScalarType frozen, OffloadSettings offload = {}) {
    torch::manual_seed(0);
    auto m = std::make_unique<Model>(load_bundle(fixture("models/" + name + ".pt")));
    auto targets = resolve_targets(m->module(), LoraSettings{});
    init_adapter_tensors(targets, m->module());
    m->set_adapters(targets, LoraSettings{});
    m->head().init(3);
    m->blocks().set_offload(offload);
    m->to(gpu, frozen);
    return m;
  }
};

TEST_F(Cuda, Fp16StepWithLossScalerSkipsAnInjectedInf) {
  auto model = lora_model("timm_trace", at::kHalf);
  LossScaler scaler(true, LossScaler::Options{});
  AdamW optimizer(model->trainable(), AdamWOptions{});
  const at::Tensor x = at::randn({8, 3, 32, 32}).to(gpu), y = (at::arange(8, at::kLong) % 3).to(gpu);
  auto step = [&](bool inject_inf) {
    {
      AutocastScope autocast(gpu, Precision::kFp16);
      const at::Tensor logits = model->logits(x, true);
      scaler.scale_loss(at::cross_entropy_loss(logits.to(at::kFloat), y)).backward();
    }
    std::vector<at::Tensor> grads;
    for (const auto& t : model->trainable()) grads.push_back(t.tensor.grad());
    EXPECT_EQ(grads[0].scalar_type(), at::kFloat) << "adapters and their gradients stay fp32";
    if (inject_inf) grads[1].view(-1)[0] = INFINITY;
    const bool finite = scaler.unscale(grads);
    if (finite) optimizer.step(1e-3);
    scaler.update(!finite);
    optimizer.zero_grad();
    return finite;
  };
  EXPECT_TRUE(step(false));
  const at::Tensor before = model->head().weight().detach().clone();
  const double scale = scaler.scale();
  EXPECT_FALSE(step(true));
  EXPECT_EQ(scaler.scale(), scale / 2);
  EXPECT_TRUE(at::equal(before, model->head().weight())) << "the step with inf was skipped";
  EXPECT_TRUE(step(false));
}

TEST_F(Cuda, Bf16StepLowersTheLoss) {
  auto model = lora_model("hf_trace", at::kBFloat16);
  AdamW optimizer(model->trainable(), AdamWOptions{});
  const at::Tensor x = at::randn({8, 3, 32, 32}).to(gpu), y = (at::arange(8, at::kLong) % 3).to(gpu);
  double first = 0, last = 0;
  for (int i = 0; i < 20; ++i) {
    at::Tensor loss;
    {
      AutocastScope autocast(gpu, Precision::kBf16);
      loss = at::cross_entropy_loss(model->logits(x, true).to(at::kFloat), y);
    }
    loss.backward();
    optimizer.step(5e-3);
    optimizer.zero_grad();
    (i == 0 ? first : last) = loss.item<double>();
  }
  EXPECT_LT(last, 0.5 * first);
}

TEST_F(Cuda, CheckpointingLowersAllocatorPeak) {
  // Activation memory: the peak above what is allocated before the forward pass. A first step allocates what stays
  // (cuBLAS workspaces of the forward and the autograd threads: tens of MB, more than this model's activations).
  int64_t activations[2];
  for (int checkpoint = 0; checkpoint < 2; ++checkpoint) {
    auto model = lora_model("hf_trace", at::kHalf);
    const at::Tensor x = at::randn({512, 3, 32, 32}).to(gpu), y = (at::arange(512, at::kLong) % 3).to(gpu);
    auto step = [&] {
      AutocastScope autocast(gpu, Precision::kFp16);
      at::cross_entropy_loss(model->logits(x, checkpoint == 1).to(at::kFloat), y).backward();
    };
    step();
    discard_gradients(model->trainable());
    reset_peak_memory(gpu);
    const int64_t before = read_memory(gpu).device_allocated;
    step();
    activations[checkpoint] = read_memory(gpu).device_peak_allocated - before;
  }
  std::printf("CUDA activation peak: %lld bytes without, %lld with checkpointing\n",
              static_cast<long long>(activations[0]), static_cast<long long>(activations[1]));
  EXPECT_LT(activations[1], activations[0] * 0.8);
}

// offload weights / activations: the same step within rounding (copies on a side stream must land before use), at
// most two blocks' weights on the GPU, the blocks' weights off the GPU between steps, and no higher allocator peak.
TEST_F(Cuda, OffloadedStepMatchesWithLessOnTheGpu) {
  const at::Tensor x = at::randn({64, 3, 32, 32}).to(gpu), y = (at::arange(64, at::kLong) % 3).to(gpu);
  struct Result {
    std::vector<at::Tensor> grads;
    int64_t held = 0, peak = 0;
  };
  auto run = [&](OffloadSettings offload) {
    Result r;
    const int64_t empty = read_memory(gpu).device_allocated;
    auto model = lora_model("timm_script", at::kHalf, offload);
    r.held = read_memory(gpu).device_allocated - empty;
    reset_peak_memory(gpu);
    for (int i = 0; i < 2; ++i) {  // the second step reuses what the first left in the side stream's wake
      discard_gradients(model->trainable());
      AutocastScope autocast(gpu, Precision::kFp16);
      at::cross_entropy_loss(model->logits(x, true).to(at::kFloat), y).backward();
    }
    r.peak = read_memory(gpu).device_peak_allocated - empty;
    for (const auto& t : model->trainable()) r.grads.push_back(t.tensor.grad().to(at::kCPU));
    if (offload.weights) EXPECT_LE(model->blocks().take_peak_resident_blocks(), 2);
    return r;
  };
  const Result plain = run({});
  for (const OffloadSettings offload : {OffloadSettings{true, false}, OffloadSettings{false, true}, OffloadSettings{true, true}}) {
    SCOPED_TRACE(std::string(offload.weights ? "weights " : "") + (offload.activations ? "activations" : ""));
    const Result r = run(offload);
    ASSERT_EQ(r.grads.size(), plain.grads.size());
    for (size_t k = 0; k < r.grads.size(); ++k) EXPECT_LT(test::scaled_diff(r.grads[k], plain.grads[k]), 1e-3) << k;
    if (offload.weights) EXPECT_LT(r.held, plain.held) << "the blocks' weights wait in host memory";
    EXPECT_LE(r.peak, plain.peak + (1 << 20));
    std::printf("offload %d/%d: held %lld vs %lld bytes, step peak %lld vs %lld\n", offload.weights, offload.activations,
                static_cast<long long>(r.held), static_cast<long long>(plain.held), static_cast<long long>(r.peak),
                static_cast<long long>(plain.peak));
  }
}

TEST_F(Cuda, MergedOnCpuMatchesAdaptedOnGpu) {
  const auto dir = test::temp_dir("cuda_merge");
  const auto adapter = fixture("models/adapter_timm_trace");
  merge_adapter(fixture("models/timm_trace.pt"), adapter, dir / "merged.pt", MergeOptions{});
  const auto ref = safetensors::read(fixture("models/ref_timm_trace.safetensors")).tensors;
  Model adapted(load_bundle(fixture("models/timm_trace.pt")));
  apply_adapter(adapted, load_adapter(adapter), adapter.string());
  adapted.to(gpu);
  auto merged = load_bundle(dir / "merged.pt").module;
  at::NoGradGuard no_grad;
  const at::Tensor on_gpu = adapted.logits(ref.at("input").to(gpu)).to(at::kCPU);
  const at::Tensor on_cpu = merged.forward({ref.at("input")}).toTensor();
  EXPECT_LT(test::scaled_diff(on_gpu, on_cpu), 1e-4);  // TF32/cuBLAS vs CPU BLAS
  EXPECT_LT(test::scaled_diff(on_cpu, ref.at("adapted_logits")), 1e-5);
}

}  // namespace
}  // namespace loratune
