// A tensor with the name it is trained, checkpointed and stored under.
#pragma once

#include <ATen/Tensor.h>

#include <string>

namespace loratune {

struct NamedTensor {
  std::string name;
  at::Tensor tensor;
};

}  // namespace loratune
