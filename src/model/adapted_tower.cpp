#include "model/adapted_tower.h"

#include "lora/adapter_host.h"

namespace loratune {
namespace {

void move_tensors(LoraTarget& t, const c10::Device& device) {
  for (auto& tensor : t.tensors)
    if (tensor.device() != device) tensor = tensor.to(device).detach().requires_grad_(tensor.requires_grad());
}

}  // namespace

AdaptedTower::AdaptedTower(Bundle bundle)
    : bundle_(std::move(bundle)), host_(std::make_unique<AdapterHost>(bundle_.module)) {}

AdaptedTower::~AdaptedTower() = default;

void AdaptedTower::set_adapters(std::vector<LoraTarget> targets, double dropout, const c10::Device& device,
                                const std::string& what) {
  for (auto& t : targets) {
    t.variant->check(t, what);
    move_tensors(t, device);
  }
  host_->prepare(targets);
  host_->attach(targets, dropout);
  targets_ = std::move(targets);
}

void AdaptedTower::clear_adapters() {
  host_->detach();
  targets_.clear();
}

void AdaptedTower::move_adapters(const c10::Device& device, double dropout) {
  for (auto& t : targets_) move_tensors(t, device);
  if (!targets_.empty()) host_->attach(targets_, dropout);
}

void AdaptedTower::set_adapters_trainable(Method method) {
  for (const auto& t : targets_)
    for (size_t k = 0; k < t.tensors.size(); ++k) t.tensors[k].requires_grad_(method == Method::kLora && t.trains(k));
}

void AdaptedTower::append_trainable(std::vector<NamedTensor>& out) const {
  for (const auto& t : targets_)
    for (size_t k = 0; k < t.tensors.size(); ++k)
      if (t.trains(k)) out.push_back({t.tensor_name(k), t.tensors[k]});
}

std::vector<at::Tensor> AdaptedTower::adapter_tensors() const {
  std::vector<at::Tensor> out;
  for (const auto& t : targets_) out.insert(out.end(), t.tensors.begin(), t.tensors.end());
  return out;
}

int64_t AdaptedTower::adapter_parameter_count() const {
  int64_t n = 0;
  for (const auto& tensor : adapter_tensors()) n += tensor.numel();
  return n;
}

}  // namespace loratune
