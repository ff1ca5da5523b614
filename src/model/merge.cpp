#include "loratune/merge.h"
#include "loratune/adapter_variant.h"

#include <ATen/core/grad_mode.h>
#include <cctype>
#include <sstream>
#include <tuple>

#include "loratune/adapter_binding.h"
#include "common/output_paths.h"
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

// A TorchScript module path as an expression on `root`: getattr for names that are not identifiers ("0").
std::string module_expression(const std::string& root, const std::string& path) {
  std::string expr = root;
  for (size_t start = 0; start < path.size();) {
    const size_t dot = path.find('.', start);
    const std::string name = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    const bool identifier = !name.empty() && !std::isdigit(static_cast<unsigned char>(name[0])) &&
                            name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") ==
                                std::string::npos;
    expr = identifier ? expr + "." + name : "getattr(" + expr + ", \"" + name + "\")";
    start = dot == std::string::npos ? path.size() : dot + 1;
  }
  return expr;
}

// The base with method vpt's prompt sets inside: images -> features, computed as Model runs it (stem, the sets
// joined before the blocks, dropped before the head). Prompts cannot fold into weights.
torch::jit::Module make_prompted_backbone(const Bundle& base, const Adapter& adapter) {
  const TokenLayout layout = token_layout(base);
  torch::jit::Module m("loratune.PromptedBackbone");
  m.register_module("base", base.module);
  for (size_t i = 0; i < adapter.prompt_sets.size(); ++i)
    m.register_parameter("prompts_" + std::to_string(i), adapter.prompt_sets[i].to(at::kFloat).clone(), false);
  const std::string seq = std::to_string(layout.sequence_dim);
  const std::string expand = layout.batch_dim == 0 ? ".unsqueeze(0).expand(h.size(0), -1, -1)"
                                                   : ".unsqueeze(1).expand(-1, h.size(1), -1)";
  const std::string base_tokens = layout.sequence_dim == 1 ? "h[:, :n]" : "h[:n]";  // slices: ONNX export maps them
  std::ostringstream code;
  code << "def forward(self, images: Tensor) -> Tensor:\n"
       << "    h = self.base.stem(images)\n"
       << "    n = h.size(" << seq << ")\n";
  size_t i = 0;
  for (const auto& block : base.blocks_module().named_children()) {
    if (i == 0 || adapter.vpt.deep) {
      const std::string set = "self.prompts_" + std::to_string(adapter.vpt.deep ? i : 0);
      code << "    h = torch.cat([" << base_tokens << ", " << set << ".to(h.dtype)" << expand << "], " << seq << ")\n";
    }
    const bool tuple = block.value.get_method("forward").function().getSchema().returns().at(0).type()->kind() ==
                       c10::TypeKind::TupleType;
    code << "    h = " << module_expression("self.base", base.info.blocks + "." + block.name) << ".forward(h)"
         << (tuple ? "[0]" : "") << "\n";
    ++i;
  }
  code << "    return self.base.head(" << base_tokens << ")\n";
  m.define(code.str());
  m.eval();
  return m;
}

// Folds each target's adapter into its rows of `module`'s weights at `strength`; `report` (if given) lists them.
void fold_targets(const torch::jit::Module& module, const std::vector<LoraTarget>& targets, double strength,
                  std::vector<std::string>* report, const std::string& tower = "") {
  at::NoGradGuard no_grad;
  for (const auto& t : targets) {
    at::Tensor w = submodule_at(module, t.module).attr(t.param).toTensor();
    at::Tensor rows = w.narrow(0, t.row_begin, t.rows);
    if (t.variant->bias_code() != nullptr) {  // the bias first: SSF's merged bias reads nothing of the weight
      at::Tensor b = submodule_at(module, t.module).attr(t.bias_param()).toTensor();
      at::Tensor bias_rows = b.narrow(0, t.row_begin, t.rows);
      bias_rows.copy_(t.variant->merged_bias_rows(t, bias_rows, strength).to(b.scalar_type()));
    }
    rows.copy_(t.variant->merged_rows(t, rows, strength).to(w.scalar_type()));
    if (report)
      report->push_back(tower + t.describe() +
                        (t.variant->low_rank() ? " += " + std::to_string(t.scale() * strength) + " * B@A"
                                               : " folded at strength " + std::to_string(strength)));
  }
}

// Method full: every stored base weight moved from the base towards the trained one by `strength`.
void interpolate_full_weights(const torch::jit::Module& module, const Adapter& adapter, const std::string& prefix,
                              double strength) {
  at::NoGradGuard no_grad;
  for (const auto& p : module.named_parameters()) {
    auto it = adapter.full_weights.find(strip_prefix(p.name, prefix));
    if (it == adapter.full_weights.end()) continue;
    const at::Tensor base = p.value.to(at::kFloat);
    p.value.copy_((base + (it->second.to(at::kFloat) - base) * strength).to(p.value.scalar_type()));
  }
}

// The merged file must not replace what it is made from.
void refuse_overwriting_inputs(const fs::path& base, const fs::path& adapter, const fs::path& output) {
  std::error_code ec;
  if (fs::is_directory(output, ec))
    throw InputError("--output " + output.string() + " is a folder; give a file name for the merged model");
  refuse_output_over_inputs(output, "--output", {base, adapter});
  refuse_replacing_other_kind(output, "--output", OutputKind::kTorchScript);
}

// Folds the adapter's text targets into a fresh load of `text_path`, checks the written file against the adapted
// tower (strength 1) or the weights merged in memory, and puts it at `output`.
void merge_text_tower(const Adapter& adapter, const fs::path& base_path, const fs::path& text_path,
                      const fs::path& output, const MergeOptions& options, const std::string& origin,
                      MergeReport& report) {
  Bundle fresh = load_bundle(text_path);
  if (fresh.info.kind != "text_encoder")
    throw InputError(text_path.string() + " is not a text encoder bundle; pass the text tower " + origin +
                     " was trained with (--text-model)");
  const std::vector<LoraTarget> targets = bind_text_targets(adapter, fresh, origin);
  const int64_t context = fresh.info.extra.value("context_length", int64_t{77});
  at::Generator gen = at::detail::createCPUGenerator(options.probe_seed);
  const at::Tensor probe = at::randint(1, 100, {options.probe_batch, context}, gen, at::kLong);
  fold_targets(fresh.module, targets, options.strength, &report.merged, "text ");
  at::Tensor expected;
  {
    at::NoGradGuard no_grad;
    if (options.strength == 1.0) {
      Model adapted(load_bundle(base_path));
      adapted.set_text_tower(load_bundle(text_path));
      apply_adapter(adapted, adapter, origin);
      expected = adapted.text_features(probe);
    } else {
      expected = fresh.module.forward({probe}).toTensor();  // interpolated weights have no unmerged counterpart
    }
  }
  auto check = [&](const fs::path& written) {
    at::NoGradGuard no_grad;
    auto merged = torch::jit::load(written.string());
    merged.eval();
    report.text_max_abs_diff = (merged.forward({probe}).toTensor() - expected).abs().max().item<double>();
    if (!(report.text_max_abs_diff < kMergeTolerance))
      throw RuntimeFailure("the merged text tower differs from the adapted one by " +
                           std::to_string(report.text_max_abs_diff) + " on probe tokens (limit " +
                           std::to_string(kMergeTolerance) + "); " + output.string() + " was not written");
  };
  BundleInfo info = fresh.info;
  info.name = (info.name.empty() ? text_path.filename().string() : info.name) + " + " + fs::path(origin).filename().string();
  info.extra["merged_into"] = fresh.fingerprint;
  save_bundle(fresh.module, info, output, check, fresh.extra_files);
  report.text_output = output.string();
}

// The head of the merged classifier: as trained; remade from the merged text tower (loss contrastive, with prompts);
// or, for a head that started from zero-shot, moved from that start by the strength (WiSE-FT: strength 0 is the
// zero-shot classifier). A randomly initialised head has no such start and stays as trained.
struct MergedHead {
  at::Tensor weight, bias;
  bool from_text = false;
};

MergedHead merged_head(const Adapter& adapter, const fs::path& text_output, const MergeOptions& options,
                       MergeReport& report) {
  MergedHead head{adapter.head_weight, adapter.head_bias};
  if (options.features_only) return head;
  if (!text_output.empty() && options.text_head && !adapter.prompts.is_null()) {
    std::tie(head.weight, head.bias) = options.text_head(text_output, adapter.prompts, adapter.classes);
    head.from_text = true;
    report.merged.push_back("head made from the merged text tower's class embeddings");
  } else if (adapter.initial_head_weight.defined() && options.strength != 1.0) {
    head.weight = adapter.initial_head_weight + (adapter.head_weight - adapter.initial_head_weight) * options.strength;
    head.bias = adapter.initial_head_bias + (adapter.head_bias - adapter.initial_head_bias) * options.strength;
    report.merged.push_back("head interpolated from its zero-shot start at strength " + std::to_string(options.strength));
  }
  return head;
}

// What the merged file must compute on `probe`: the unmerged adapted model (strength 1), or at another strength
// (interpolated weights have no unmerged counterpart) the merge applied in memory to an unmerged load of the base.
at::Tensor expected_output(const fs::path& base_path, const Adapter& adapter, const Bundle& fresh,
                           const MergedHead& head, const MergeOptions& options, const std::string& origin,
                           const at::Tensor& probe) {
  Model adapted(load_bundle(base_path));
  apply_adapter(adapted, adapter, origin);
  if (!adapter.head_weight.defined() || options.features_only) adapted.head().init(1);
  if (options.strength != 1.0) {
    fold_targets(adapted.module(), bind_targets(adapter, fresh, origin), options.strength, nullptr);
    adapted.clear_adapters();
    if (!adapter.full_weights.empty()) {  // apply_adapter put the trained weights in: moved from the base's instead
      const Bundle base = load_bundle(base_path);
      std::map<std::string, at::Tensor> originals;
      for (const auto& p : base.module.named_parameters()) originals[p.name] = p.value;
      at::NoGradGuard no_grad;
      for (const auto& p : adapted.module().named_parameters())
        p.value.copy_(originals[p.name] + (p.value - originals[p.name]) * options.strength);
    }
  }
  if (!options.features_only && (options.strength != 1.0 || head.from_text)) adapted.head().set(head.weight, head.bias);
  at::NoGradGuard no_grad;
  return options.features_only ? adapted.features(probe) : adapted.logits(probe);
}

}  // namespace

fs::path merged_text_path(const fs::path& output) {
  return output.parent_path() / (output.stem().string() + "_text" + output.extension().string());
}

MergeReport merge_adapter(const fs::path& base_path, const fs::path& adapter_path, const fs::path& output,
                          const MergeOptions& options) {
  if (!(options.strength >= 0.0 && options.strength <= 1.0)) {
    std::ostringstream got;
    got << options.strength;
    throw InputError("merge strength must be between 0 and 1 (got " + got.str() + ")");
  }
  refuse_overwriting_inputs(base_path, adapter_path, output);
  Adapter adapter = load_adapter(adapter_path);
  const std::string origin = adapter_path.string();
  if (adapter.method == Method::kVpt && options.strength != 1.0)
    throw InputError("merge --strength moves weights from the base towards the trained ones; " + origin +
                     " is method vpt, whose prompt tokens go in whole: leave --strength at 1");
  if (adapter.method == Method::kAdaptFormer && options.strength != 1.0)
    throw InputError("merge --strength moves weights from the base towards the trained ones; " + origin +
                     " is method adaptformer, whose adapters go in whole: leave --strength at 1");
  if (!options.features_only && !adapter.head_weight.defined())
    throw InputError(origin + " has no classification head; merge with --features-only to write a backbone");

  Bundle fresh = load_bundle(base_path);
  auto text_path = [&] { return options.text_model.empty() ? text_model_for(fresh) : text_tower_path(options.text_model); };
  if (has_targets_outside(adapter, fresh) && (!options.text_model.empty() || fresh.info.extra.contains("text_model")))
    route_text_targets(adapter, fresh, load_bundle(text_path()));
  check_adapter_base(adapter, fresh, origin);
  MergeReport report;
  fold_targets(fresh.module, bind_targets(adapter, fresh, origin), options.strength, &report.merged);
  if (!adapter.full_weights.empty()) {
    interpolate_full_weights(fresh.module, adapter, fresh.info.module_prefix, options.strength);
    report.merged.push_back(std::to_string(adapter.full_weights.size()) + " base weights interpolated at strength " +
                            std::to_string(options.strength));
  }
  // Text targets (loss contrastive): the text tower merged at the same strength beside the output.
  fs::path text_output;
  if (!adapter.text_targets.empty()) {
    text_output = merged_text_path(output);
    refuse_overwriting_inputs(text_path(), adapter_path, text_output);
    merge_text_tower(adapter, base_path, text_path(), text_output, options, origin, report);
  }
  const MergedHead head = merged_head(adapter, text_output, options, report);

  // The check: the file as written against the expected output on a seeded probe batch, before it replaces `output`.
  const int64_t s = fresh.info.image_size;
  at::Generator gen = at::detail::createCPUGenerator(options.probe_seed);
  const at::Tensor probe = at::randn({options.probe_batch, 3, s, s}, gen);
  const at::Tensor expected = expected_output(base_path, adapter, fresh, head, options, origin, probe);
  auto check = [&](const fs::path& written) {
    at::NoGradGuard no_grad;
    auto merged = torch::jit::load(written.string());
    merged.eval();
    const at::Tensor got = merged.forward({probe}).toTensor();
    report.max_abs_diff = (got - expected).abs().max().item<double>();
    if (!(report.max_abs_diff < kMergeTolerance))
      throw RuntimeFailure("the merged model differs from the adapted one by " + std::to_string(report.max_abs_diff) +
                           " on a probe batch (limit " + std::to_string(kMergeTolerance) + "); " + output.string() +
                           " was not written");
  };

  BundleInfo info = fresh.info;
  info.name = (info.name.empty() ? base_path.filename().string() : info.name) + " + " + adapter_path.filename().string();
  info.extra["merged_into"] = fresh.fingerprint;  // adapters are refused on it: they apply to that base
  torch::jit::Module backbone = fresh.module;
  if (adapter.method == Method::kAdaptFormer) {
    // The blocks' rewritten code and the adapters' tensors go into the file with them.
    MlpAdapters inside;
    inside.set(adapter.adaptformer, fresh, adapter.mlp_adapters, origin);
    report.merged.push_back("AdaptFormer adapters of " + std::to_string(adapter.mlp_adapters.size()) +
                            " blocks kept inside the model (they cannot fold into weights)");
  }
  if (adapter.method == Method::kVpt) {
    // The prompts sit in the module's own forward: block by block training of the file would skip them.
    backbone = make_prompted_backbone(fresh, adapter);
    info.blocks = "";
    info.module_prefix = "base." + info.module_prefix;
    report.merged.push_back(std::to_string(adapter.prompt_sets.size()) + " prompt set(s) of " +
                            std::to_string(adapter.vpt.tokens) + " tokens kept inside the model (they cannot fold "
                            "into weights)");
  }
  if (options.features_only) {
    save_bundle(backbone, info, output, check);
  } else {
    info.kind = "classifier";
    info.classes = adapter.classes;
    info.blocks = info.blocks.empty() ? "" : "backbone." + info.blocks;
    info.module_prefix = "backbone." + info.module_prefix;
    auto classifier = make_classifier(backbone, head.weight, head.bias, adapter.normalize_features);
    save_bundle(classifier, info, output, check);
  }
  report.output = output.string();
  return report;
}

}  // namespace loratune
