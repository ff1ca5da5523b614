// Offloading to host memory: see block_offload.h.
#include "model/block_offload.h"

#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <tuple>

#include "loratune/errors.h"

namespace loratune {

BlockOffload::BlockOffload(std::vector<torch::jit::Module> blocks, const c10::Device& device, bool weights,
                           bool activations, int64_t first_recomputed)
    : device_(device), weights_(weights), activations_(activations), first_recomputed_(first_recomputed) {
  if (device.is_cuda())
    side_ = c10::impl::VirtualGuardImpl(device.type()).getStreamFromGlobalPool(device, /*isHighPriority=*/false);
  blocks_.resize(blocks.size());
  if (!weights) return;
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < blocks.size(); ++i)
    for (const auto& sub : blocks[i].named_modules()) {
      std::vector<std::tuple<std::string, at::Tensor, bool>> tensors;  // name, tensor, is a parameter
      for (const auto& p : sub.value.named_parameters(/*recurse=*/false)) tensors.emplace_back(p.name, p.value, true);
      for (const auto& b : sub.value.named_buffers(/*recurse=*/false)) tensors.emplace_back(b.name, b.value, false);
      for (auto& [name, t, is_parameter] : tensors) {
        if (t.requires_grad() || t.numel() == 0) continue;  // adapters train; emptied dense weights are nothing
        at::Tensor host = t.device().is_cpu() && !device.is_cuda() ? t.detach() : t.detach().to(at::kCPU);
        if (device.is_cuda()) host = host.pin_memory();
        host_bytes_ += static_cast<int64_t>(host.nbytes());
        if (is_parameter) host_parameters_ += host.numel();
        at::Tensor placeholder = at::empty({0}, host.options().device(device).pinned_memory(false));
        torch::jit::Module owner = sub.value;  // a handle on the same object
        owner.setattr(name, placeholder);
        blocks_[i].slots.push_back({owner, name, host, placeholder});
      }
    }
}

c10::Stream BlockOffload::compute_stream() const {
  return c10::impl::VirtualGuardImpl(device_.type()).getStream(device_);
}

void BlockOffload::wait(std::optional<c10::Event>& event) {
  if (event) event->block(compute_stream());
  event.reset();
}

int64_t BlockOffload::resident_count() const {
  int64_t n = 0;
  for (const auto& b : blocks_) n += !b.on_device.empty();
  return n;
}

void BlockOffload::copy_in(Block& b) {
  if (!b.on_device.empty() || b.slots.empty()) return;
  // Device memory comes from the compute stream (it is used and freed there); the copy runs on the side stream
  // once the compute stream has reached this point, and the compute stream waits for it in enter().
  for (const auto& s : b.slots) b.on_device.push_back(at::empty_like(s.host, s.host.options().device(device_).pinned_memory(false)));
  if (!asynchronous()) {
    for (size_t k = 0; k < b.slots.size(); ++k) b.on_device[k].copy_(b.slots[k].host);
  } else {
    c10::Event allocated(device_.type());
    allocated.record(compute_stream());
    allocated.block(*side_);
    c10::StreamGuard on_side(*side_);
    for (size_t k = 0; k < b.slots.size(); ++k) b.on_device[k].copy_(b.slots[k].host, /*non_blocking=*/true);
    b.ready.emplace(device_.type());
    b.ready->record(*side_);
  }
  peak_resident_ = std::max(peak_resident_, resident_count());
}

void BlockOffload::drop(Block& b) {
  if (b.on_device.empty()) return;
  wait(b.ready);  // a copy in flight must land before its memory is reused
  for (auto& s : b.slots) s.module.setattr(s.name, s.placeholder);
  b.on_device.clear();
}

void BlockOffload::enter(int64_t i, int64_t next) {
  if (!weights_) return;
  for (int64_t k = 0; k < static_cast<int64_t>(blocks_.size()); ++k)
    if (k != i && k != next) drop(blocks_[k]);
  Block& b = blocks_.at(i);
  copy_in(b);
  wait(b.ready);
  for (size_t k = 0; k < b.slots.size(); ++k) b.slots[k].module.setattr(b.slots[k].name, b.on_device[k]);
  if (next >= 0) copy_in(blocks_.at(next));
}

void BlockOffload::leave(int64_t i, bool keep) {
  if (weights_ && !keep) drop(blocks_.at(i));
}

at::Tensor BlockOffload::stash_input(int64_t block, const at::Tensor& input) {
  if (!activations_) return input;
  Stash& s = stashes_[block];
  s = Stash{};
  if (!asynchronous()) {
    s.host = input.detach().clone();
    return s.host;
  }
  s.host = at::empty(input.sizes(), input.options().device(at::kCPU).pinned_memory(true));
  c10::Event produced(device_.type());
  produced.record(compute_stream());
  produced.block(*side_);
  c10::StreamGuard on_side(*side_);
  s.host.copy_(input.detach(), /*non_blocking=*/true);
  // The input's memory is freed on the compute stream soon: not to be reused before this copy has read it.
  c10::impl::VirtualGuardImpl(device_.type()).recordDataPtrOnStream(input.storage().data_ptr(), *side_);
  return s.host;
}

void BlockOffload::prefetch_input(int64_t block) {
  auto it = stashes_.find(block);
  if (it == stashes_.end() || it->second.on_device.defined()) return;
  Stash& s = it->second;
  s.on_device = at::empty(s.host.sizes(), s.host.options().device(device_).pinned_memory(false));
  if (!asynchronous()) {
    s.on_device.copy_(s.host);
    return;
  }
  c10::Event allocated(device_.type());
  allocated.record(compute_stream());
  allocated.block(*side_);
  c10::StreamGuard on_side(*side_);
  s.on_device.copy_(s.host, /*non_blocking=*/true);  // after the stash's copy: same stream
  s.ready.emplace(device_.type());
  s.ready->record(*side_);
}

at::Tensor BlockOffload::restore_input(int64_t block, const at::Tensor& stashed) {
  if (!activations_) return stashed;
  auto it = stashes_.find(block);
  if (it == stashes_.end() || !it->second.host.is_same(stashed))
    throw RuntimeFailure("internal: block " + std::to_string(block) + "'s input was not offloaded by this model");
  prefetch_input(block);
  Stash s = std::move(it->second);
  stashes_.erase(it);
  wait(s.ready);
  return s.on_device;
}

void BlockOffload::before_recompute(int64_t block) {
  const int64_t previous = block > first_recomputed_ ? block - 1 : -1;
  enter(block, previous);
  if (activations_ && previous >= 0) prefetch_input(previous);
}

void BlockOffload::after_recompute(int64_t block) { leave(block, /*keep=*/false); }

}  // namespace loratune
