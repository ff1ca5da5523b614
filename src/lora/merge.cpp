#include "loratune/merge.h"

#include <sstream>

#include "loratune/errors.h"
#include "loratune/model.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

// A TorchScript classifier around a backbone: images -> logits.
torch::jit::Module make_classifier(const torch::jit::Module& backbone, const at::Tensor& weight, const at::Tensor& bias,
                                   bool normalize_features) {
  torch::jit::Module classifier("loratune.Classifier");
  classifier.register_module("backbone", backbone);
  classifier.register_parameter("head_weight", weight.detach().clone(), false);
  classifier.register_parameter("head_bias", bias.detach().clone(), false);
  classifier.define(normalize_features ? R"(
def forward(self, images: Tensor) -> Tensor:
    features = self.backbone.forward(images)
    features = features / features.pow(2).sum(-1, keepdim=True).sqrt()
    return torch.linear(features, self.head_weight, self.head_bias)
)"
                                        : R"(
def forward(self, images: Tensor) -> Tensor:
    return torch.linear(self.backbone.forward(images), self.head_weight, self.head_bias)
)");
  classifier.eval();
  return classifier;
}

}  // namespace

MergeReport merge_adapter(const fs::path& base_path, const fs::path& adapter_path, const fs::path& output,
                          const MergeOptions& options) {
  if (!(options.strength >= 0.0 && options.strength <= 1.0)) {
    std::ostringstream got;
    got << options.strength;
    throw InputError("merge strength must be between 0 and 1 (got " + got.str() + ")");
  }
  const Adapter adapter = load_adapter(adapter_path);
  const std::string origin = adapter_path.string();
  if (!options.features_only && !adapter.head_weight.defined())
    throw InputError(origin + " has no classification head; merge with --features-only to write a backbone");

  Bundle fresh = load_bundle(base_path);
  check_adapter_base(adapter, fresh, origin);
  MergeReport report;
  {
    at::NoGradGuard no_grad;
    for (const auto& t : bind_targets(adapter, fresh, origin)) {
      at::Tensor w = submodule_at(fresh.module, t.module).attr(t.param).toTensor();
      const at::Tensor delta = at::mm(t.B.to(at::kFloat), t.A.to(at::kFloat)) * (t.scale() * options.strength);
      at::Tensor rows = w.narrow(0, t.row_begin, t.rows);
      rows.copy_((rows.to(at::kFloat) + delta).to(w.scalar_type()));
      report.merged.push_back(t.describe() + " += " + std::to_string(t.scale() * options.strength) + " * B@A");
    }
    if (!adapter.full_weights.empty()) {
      for (const auto& p : fresh.module.named_parameters()) {
        auto it = adapter.full_weights.find(strip_prefix(p.name, fresh.info.module_prefix));
        if (it == adapter.full_weights.end()) continue;
        const at::Tensor base = p.value.to(at::kFloat);
        p.value.copy_((base + (it->second.to(at::kFloat) - base) * options.strength).to(p.value.scalar_type()));
      }
      report.merged.push_back(std::to_string(adapter.full_weights.size()) + " base weights interpolated at strength " +
                              std::to_string(options.strength));
    }
  }

  BundleInfo info = fresh.info;
  info.name = (info.name.empty() ? base_path.filename().string() : info.name) + " + " + adapter_path.filename().string();
  if (options.features_only) {
    save_bundle(fresh.module, info, output);
  } else {
    info.kind = "classifier";
    info.classes = adapter.classes;
    info.blocks = info.blocks.empty() ? "" : "backbone." + info.blocks;
    info.module_prefix = "backbone." + info.module_prefix;
    auto classifier = make_classifier(fresh.module, adapter.head_weight, adapter.head_bias, adapter.normalize_features);
    save_bundle(classifier, info, output);
  }
  report.output = output.string();

  // Check: the file as written against the unmerged model, on a seeded probe batch.
  Model adapted(load_bundle(base_path));
  apply_adapter(adapted, adapter, origin);
  if (!adapter.head_weight.defined() || options.features_only) adapted.init_head(1);
  const int64_t s = fresh.info.image_size;
  at::Generator gen = at::detail::createCPUGenerator(options.probe_seed);
  const at::Tensor probe = at::randn({options.probe_batch, 3, s, s}, gen);
  at::NoGradGuard no_grad;
  at::Tensor expected;
  if (options.strength == 1.0) {
    expected = options.features_only ? adapted.features(probe) : adapted.logits(probe);
  } else {
    // Interpolated weights have no unmerged counterpart: compare against merged weights applied in memory instead.
    for (auto& t : adapted.adapters()) t.B.mul_(options.strength);
    if (!adapter.full_weights.empty()) {
      Bundle base = load_bundle(base_path);
      auto module = adapted.module();
      auto base_params = base.module.named_parameters();
      std::map<std::string, at::Tensor> originals;
      for (const auto& p : base_params) originals[p.name] = p.value;
      for (const auto& p : module.named_parameters()) p.value.copy_(originals[p.name] + (p.value - originals[p.name]) * options.strength);
    }
    expected = options.features_only ? adapted.features(probe) : adapted.logits(probe);
  }
  auto merged = torch::jit::load(output.string());
  merged.eval();
  const at::Tensor got = merged.forward({probe}).toTensor();
  report.max_abs_diff = (got - expected).abs().max().item<double>();
  return report;
}

}  // namespace loratune
