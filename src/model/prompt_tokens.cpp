#include "loratune/prompt_tokens.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>

#include "loratune/errors.h"

namespace loratune {

TokenLayout token_layout(const Bundle& bundle, Method method) {
  const std::string name = bundle.path.filename().string();
  const std::string what = method == Method::kVpt ? "method vpt joins prompt tokens to the blocks' tokens"
                                                  : "method " + method_name(method) + " adapts the blocks' tokens";
  if (!bundle.has_block_structure())
    throw InputError(what + ": " + name + " has no stem/blocks/head structure (export it with blocks)");
  at::NoGradGuard no_grad;
  auto module = bundle.module;
  c10::Device device(c10::kCPU);
  for (const auto& p : module.parameters()) {
    device = p.device();
    break;
  }
  const int64_t size = bundle.info.image_size;
  auto stem = [&](int64_t batch) {
    return module.get_method("stem")({at::zeros({batch, 3, size, size}, at::TensorOptions().device(device))}).toTensor();
  };
  const at::Tensor one = stem(1), two = stem(2);
  TokenLayout layout;
  if (one.dim() == 3 && two.dim() == 3 && one.size(0) == 1 && two.size(0) == 2 && one.size(1) == two.size(1))
    layout = {1, 0, one.size(2)};
  else if (one.dim() == 3 && two.dim() == 3 && one.size(1) == 1 && two.size(1) == 2 && one.size(0) == two.size(0))
    layout = {0, 1, one.size(2)};
  else
    throw InputError(what + ", but the blocks of " + name + " take " +
                     std::to_string(one.dim()) + "-D inputs of shape " + c10::str(one.sizes()) + " for one image " +
                     "(convolutional stages, such as MobileCLIP's); use method lora there");
  return layout;
}

namespace {

void check_settings(const PromptSettings& settings, const std::string& origin) {
  if (settings.tokens < 1) throw InputError(origin + ": vpt.tokens must be at least 1");
}

}  // namespace

void PromptTokens::init(const PromptSettings& settings, const TokenLayout& layout, int64_t blocks) {
  check_settings(settings, "vpt settings");
  const double bound = std::sqrt(6.0 / static_cast<double>(settings.tokens + layout.width));
  std::vector<at::Tensor> sets;
  for (int64_t i = 0; i < (settings.deep ? blocks : 1); ++i)
    sets.push_back(at::rand({settings.tokens, layout.width}) * (2 * bound) - bound);
  set(settings, layout, blocks, sets, "vpt settings");
}

void PromptTokens::set(const PromptSettings& settings, const TokenLayout& layout, int64_t blocks,
                       const std::vector<at::Tensor>& sets, const std::string& origin) {
  check_settings(settings, origin);
  const size_t expected = settings.deep ? static_cast<size_t>(blocks) : 1;
  if (sets.size() != expected)
    throw InputError(origin + " holds " + std::to_string(sets.size()) + " prompt sets; " +
                     (settings.deep ? "deep prompts need one per block (" + std::to_string(blocks) + ")"
                                    : std::string("shallow prompts are one set")) +
                     ": it was made for another base");
  for (const auto& s : sets)
    if (s.dim() != 2 || s.size(0) != settings.tokens || s.size(1) != layout.width || !s.is_floating_point())
      throw InputError(origin + " holds prompts of shape " + c10::str(s.sizes()) + "; the model takes [" +
                       std::to_string(settings.tokens) + ", " + std::to_string(layout.width) + "]: it was made for "
                       "another base");
  settings_ = settings;
  layout_ = layout;
  sets_.clear();
  for (const auto& s : sets) sets_.push_back(s.detach().to(at::kFloat).clone());
}

void PromptTokens::set_trainable(bool on) {
  for (auto& s : sets_) s.requires_grad_(on);
}

void PromptTokens::to(const c10::Device& device) {
  for (auto& s : sets_) {
    const bool trains = s.requires_grad();
    s = s.detach().to(device).requires_grad_(trains);
  }
}

at::Tensor PromptTokens::join(const at::Tensor& h, int64_t base_tokens, int64_t block) const {
  const at::Tensor& set = sets_.at(settings_.deep ? static_cast<size_t>(block) : 0);
  std::vector<int64_t> sizes(3, -1);
  sizes[static_cast<size_t>(layout_.batch_dim)] = h.size(layout_.batch_dim);
  const at::Tensor prompts = set.to(h.scalar_type()).unsqueeze(layout_.batch_dim).expand(sizes);
  return at::cat({h.narrow(layout_.sequence_dim, 0, base_tokens), prompts}, layout_.sequence_dim);
}

at::Tensor PromptTokens::drop(const at::Tensor& h, int64_t base_tokens) const {
  return h.narrow(layout_.sequence_dim, 0, base_tokens);
}

void PromptTokens::append_trainable(std::vector<NamedTensor>& out) const {
  for (size_t i = 0; i < sets_.size(); ++i)
    if (sets_[i].requires_grad()) out.push_back({"vpt.prompts." + std::to_string(i), sets_[i]});
}

int64_t PromptTokens::parameter_count() const {
  int64_t n = 0;
  for (const auto& s : sets_) n += s.numel();
  return n;
}

}  // namespace loratune
