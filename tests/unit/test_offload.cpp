// Offloading (offload: weights / activations): the schedule run on the CPU with plain copies. An offloaded step
// equals the ordinary one bit for bit, at most two blocks' weights are in place at a time, and a block whose weights
// were not brought in fails instead of running on nothing. CUDA (side stream, allocator peak): test_cuda.cpp.
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>

#include "loratune/adapter_binding.h"
#include "loratune/lora.h"
#include "loratune/model.h"
#include "loratune/safetensors.h"
#include "loratune/targets.h"
#include "test_support.h"

namespace loratune {
namespace {

using test::fixture;

struct OffloadStep {
  at::Tensor logits;
  std::vector<at::Tensor> grads;  // adapters', then the head's
};

// A LoRA model on the fixture `name`, adapters in every block, or only in the last one (a frozen prefix before it).
std::unique_ptr<Model> lora_model(const std::string& name, bool last_block_only, QuantFormat quant,
                                  OffloadSettings offload) {
  torch::manual_seed(0);
  auto m = std::make_unique<Model>(load_bundle(fixture("models/" + name + ".pt")));
  auto targets = resolve_targets(m->module(), LoraSettings{}, m->bundle().info.blocks);
  if (last_block_only) {
    std::string last;
    for (const auto& child : m->bundle().blocks_module().named_children()) last = m->bundle().info.blocks + "." + child.name + ".";
    std::vector<LoraTarget> kept;
    for (auto& t : targets)
      if (t.module.compare(0, last.size(), last) == 0) kept.push_back(std::move(t));
    targets = std::move(kept);
  }
  init_adapter_tensors(targets, m->module());
  {
    at::NoGradGuard no_grad;
    for (auto& t : targets)
      for (auto& tensor : t.tensors) tensor.normal_(0, 0.1);  // B starts at zero: make every adapter count
  }
  m->set_adapters(targets, LoraSettings{});
  m->head().init(3);
  m->blocks().set_offload(offload);
  m->to(c10::Device(c10::kCPU), at::kFloat, quant);
  return m;
}

OffloadStep step(Model& model, const at::Tensor& input, const at::Tensor& probe) {
  for (const auto& t : model.trainable()) t.tensor.mutable_grad() = at::Tensor();
  OffloadStep s;
  s.logits = model.logits(input, /*checkpoint=*/true);
  (s.logits * probe).sum().backward();
  for (const auto& t : model.trainable()) s.grads.push_back(t.tensor.grad().clone());
  s.logits = s.logits.detach();
  return s;
}

// Every frozen Linear weight inside the blocks: what weight offload takes away between uses.
int64_t block_weights_in_place(Model& model) {
  int64_t n = 0;
  for (const auto& p : model.bundle().blocks_module().named_parameters())
    if (!p.value.requires_grad() && p.value.numel() > 0) ++n;
  return n;
}

class Offload : public ::testing::TestWithParam<std::tuple<std::string, std::string, std::string>> {};

TEST_P(Offload, StepEqualsTheOrdinaryStepWithTwoBlocksInPlaceAtMost) {
  const auto& [layout, what, quant_name] = GetParam();
  const QuantFormat quant = quant_name == "nf4" ? QuantFormat::kNf4 : QuantFormat::kNone;
  const OffloadSettings settings{what != "activations", what != "weights"};
  for (bool last_block_only : {false, true}) {
    SCOPED_TRACE(last_block_only ? "adapters in the last block" : "adapters in every block");
    auto plain = lora_model(layout, last_block_only, quant, {});
    auto offloaded = lora_model(layout, last_block_only, quant, settings);
    EXPECT_EQ(offloaded->base_parameter_count(), plain->base_parameter_count());
    const int64_t blocks = plain->blocks().size();
    ASSERT_GE(blocks, 2);
    if (settings.weights) EXPECT_EQ(block_weights_in_place(*offloaded), 0) << "weights wait in host memory";
    const at::Tensor input = at::randn({2, 3, 32, 32}), probe = at::randn({2, 3});
    for (int repeat = 0; repeat < 2; ++repeat) {
      const OffloadStep a = step(*plain, input, probe), b = step(*offloaded, input, probe);
      EXPECT_TRUE(at::equal(a.logits, b.logits));
      ASSERT_EQ(a.grads.size(), b.grads.size());
      for (size_t k = 0; k < a.grads.size(); ++k) EXPECT_TRUE(at::equal(a.grads[k], b.grads[k])) << k;
      if (settings.weights) {
        const int64_t peak = offloaded->blocks().take_peak_resident_blocks();
        EXPECT_GE(peak, 1);
        EXPECT_LE(peak, 2) << "the running block and the next one only";
        if (blocks > 2) EXPECT_EQ(peak, 2) << "the next block's copy starts while one runs";
        EXPECT_EQ(block_weights_in_place(*offloaded), 0) << "backward put every block's weights away";
      }
    }
    at::NoGradGuard no_grad;  // evaluation: no recompute
    EXPECT_TRUE(at::equal(plain->logits(input), offloaded->logits(input)));
    if (settings.weights) EXPECT_LE(offloaded->blocks().take_peak_resident_blocks(), 2);
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, Offload,
                         ::testing::Combine(::testing::Values("timm_script", "hf_trace", "torchvision_script",
                                                              "timm_deep_script"),
                                            ::testing::Values("weights", "activations", "both"),
                                            ::testing::Values("dense", "nf4")),
                         [](const auto& info) {  // <layout>_<offloaded>_<weights>: filters can name a layout
                           return std::get<0>(info.param) + std::string("_") + std::get<1>(info.param) + "_" +
                                  std::get<2>(info.param);
                         });

TEST(OffloadSchedule, ABlockWhoseWeightsWereNotBroughtInFails) {
  auto model = lora_model("timm_script", false, QuantFormat::kNone, {true, false});
  at::NoGradGuard no_grad;
  auto block = model->bundle().blocks_module().named_children().begin();
  torch::jit::Module first = (*block).value;
  EXPECT_ANY_THROW(first.forward({at::randn({2, 5, 32})}));
}

TEST(OffloadSchedule, NeedsMethodLoraAndBlocks) {
  Model full(load_bundle(fixture("models/timm_script.pt")));
  full.set_method(Method::kFull);
  full.blocks().set_offload({true, false});
  EXPECT_THROW(full.to(c10::Device(c10::kCPU)), InputError);
}

}  // namespace
}  // namespace loratune
