// One tower of a Model, the image backbone or a CLIP text encoder: its bundle, the graph rewrite that carries its
// adapters, and those adapters. The Model holds one per tower, so both are adapted, moved and trained alike.
#pragma once

#include <torch/script.h>

#include <memory>
#include <string>
#include <vector>

#include "loratune/bundle.h"
#include "loratune/lora.h"
#include "loratune/method.h"
#include "loratune/named_tensor.h"

namespace loratune {

class AdapterHost;

class AdaptedTower {
 public:
  explicit AdaptedTower(Bundle bundle);
  ~AdaptedTower();
  AdaptedTower(const AdaptedTower&) = delete;
  AdaptedTower& operator=(const AdaptedTower&) = delete;

  Bundle& bundle() { return bundle_; }
  const Bundle& bundle() const { return bundle_; }
  AdapterHost& host() { return *host_; }
  const AdapterHost& host() const { return *host_; }
  const std::vector<LoraTarget>& adapters() const { return targets_; }

  // Checks the targets against their variants (errors name them `what`), puts their tensors on `device`, then
  // prepares the module types and binds the tensors.
  void set_adapters(std::vector<LoraTarget> targets, double dropout, const c10::Device& device, const std::string& what);
  void clear_adapters();
  // The adapter tensors onto `device` (gradients kept as they are), bound again.
  void move_adapters(const c10::Device& device, double dropout);
  // Which adapter tensors train: under method lora, those their variant's specs train; none otherwise.
  void set_adapters_trainable(Method method);
  // Those tensors, named as the optimiser and checkpoints name them.
  void append_trainable(std::vector<NamedTensor>& out) const;
  // Every adapter tensor, in target order; and their sizes summed.
  std::vector<at::Tensor> adapter_tensors() const;
  int64_t adapter_parameter_count() const;

 private:
  Bundle bundle_;
  std::unique_ptr<AdapterHost> host_;
  std::vector<LoraTarget> targets_;
};

}  // namespace loratune
