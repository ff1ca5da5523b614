#include "loratune/block_stack.h"

#include "loratune/errors.h"
#include "model/block_offload.h"
#include "model/gradient_checkpoint.h"

namespace loratune {

BlockStack::BlockStack(const Bundle& bundle) {
  if (!bundle.has_block_structure()) return;
  for (const auto& child : bundle.blocks_module().named_children()) {
    blocks_.push_back(child.value);
    paths_.push_back(bundle.info.blocks + "." + child.name);
    grad_dependent_.push_back(has_grad_mode_dependent_kernels(child.value));
  }
}

BlockStack::~BlockStack() = default;

void BlockStack::assign_trainable(Method method, const std::vector<LoraTarget>& adapters, bool prompted,
                                  const std::vector<std::vector<at::Tensor>>& block_tensors) {
  trains_.assign(blocks_.size(), {});
  prefix_ = 0;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (method == Method::kFull)
      for (const auto& p : blocks_[i].parameters()) trains_[i].push_back(p);
    if (method == Method::kLora)
      for (const auto& t : adapters)
        if (t.module.compare(0, paths_[i].size() + 1, paths_[i] + ".") == 0)
          for (size_t k = 0; k < t.tensors.size(); ++k)
            if (t.trains(k)) trains_[i].push_back(t.tensors[k]);
    if (i < block_tensors.size())
      for (const auto& t : block_tensors[i])
        if (t.requires_grad()) trains_[i].push_back(t);
  }
  if (freezes_base(method) && !prompted)
    while (prefix_ < size() && trains_[prefix_].empty()) ++prefix_;
  if (offload_) offload_->set_first_recomputed(prefix_);
}

at::Tensor BlockStack::run(at::Tensor h, int64_t first, int64_t last, bool checkpoint) {
  const bool recompute = checkpoint && at::GradMode::is_enabled();
  for (int64_t i = first; i < last; ++i) {
    const bool final_block = i + 1 == size();
    if (offload_) offload_->enter(i, final_block ? -1 : i + 1);
    h = recompute ? checkpointed_block(blocks_[i], h, trains_[i], grad_dependent_[i], offload_, i)
                  : run_block(blocks_[i], h);
    if (offload_) offload_->leave(i, /*keep=*/recompute && final_block);  // backward starts with it
  }
  return h;
}

void BlockStack::set_offload(OffloadSettings settings) {
  if (offload_) throw RuntimeFailure("internal: offload is set before the model moves to its device");
  offload_settings_ = settings;
}

void BlockStack::start_offload(const c10::Device& device) {
  offload_ = c10::make_intrusive<BlockOffload>(blocks_, device, offload_settings_.weights, offload_settings_.activations,
                                               prefix_);
}

int64_t BlockStack::offloaded_weight_bytes() const { return offload_ ? offload_->host_weight_bytes() : 0; }

int64_t BlockStack::offloaded_parameter_count() const { return offload_ ? offload_->host_parameter_count() : 0; }

int64_t BlockStack::take_peak_resident_blocks() {
  if (!offload_) return 0;
  const int64_t peak = offload_->peak_resident_blocks();
  offload_->reset_peak();
  return peak;
}

}  // namespace loratune
