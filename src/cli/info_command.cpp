#include "cli/common.h"
#include "cli/commands.h"
#include "loratune/errors.h"
#include "loratune/adapter_init.h"
#include "loratune/adapter_variant.h"
#include "loratune/targets.h"
#include "loratune/training_setup.h"
#include "loratune/threads.h"
#include "loratune/import.h"
#include "loratune/prompt_tokens.h"
#include "loratune/safetensors.h"
#include "common/strings.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

bool looks_like_adapter(const fs::path& p) {
  return fs::is_directory(p) || p.extension() == ".safetensors";
}

void print_adapter(const fs::path& path) {
  const Adapter a = load_adapter(path);
  int64_t params = 0;
  for (const auto* list : {&a.targets, &a.text_targets})
    for (const auto& t : *list)
      for (const auto& tensor : t.tensors) params += tensor.numel();
  std::printf("adapter        %s\n", path.c_str());
  std::printf("method         %s\n", method_name(a.method).c_str());
  std::printf("base           %s (fingerprint %s)\n", a.base_name.c_str(),
              a.base_fingerprint.empty() ? "not recorded: written by another tool" : a.base_fingerprint.c_str());
  std::printf("classes        %zu: %s\n", a.classes.size(), join(a.classes, ", ", 20).c_str());
  if (!a.targets.empty() && !a.targets.front().variant->low_rank()) {
    std::printf("adapters       %zu weights, variant %s (%s), %s parameters\n", a.targets.size(),
                a.targets.front().variant->name().c_str(), a.targets.front().variant->summary().c_str(),
                human_count(static_cast<double>(params)).c_str());
    for (const auto& t : a.targets) std::printf("  %s\n", t.describe().c_str());
  } else if (!a.targets.empty()) {
    const std::string start = a.lora.init == default_adapter_init().name() ? "" : ", started with " + a.lora.init;
    std::printf("LoRA           %zu weights, variant %s%s, rank %lld, alpha %g%s, dropout %g, %s parameters\n",
                a.targets.size(), a.targets.front().variant->name().c_str(), start.c_str(), static_cast<long long>(a.lora.rank),
                a.lora.alpha, a.lora.rslora ? " (rsLoRA)" : "", a.lora.dropout, human_count(static_cast<double>(params)).c_str());
    for (const auto& t : a.targets) std::printf("  %s scale %g\n", t.describe().c_str(), t.scale());
  }
  if (!a.text_targets.empty()) {
    std::printf("text tower     %s (fingerprint %s): LoRA on %zu weights (loss contrastive)\n",
                a.text_base_name.c_str(), a.text_base_fingerprint.c_str(), a.text_targets.size());
    for (const auto& t : a.text_targets) std::printf("  %s scale %g\n", t.describe().c_str(), t.scale());
  }
  if (!a.full_weights.empty()) std::printf("full weights   %zu tensors\n", a.full_weights.size());
  if (!a.mlp_adapters.empty()) {
    int64_t n = 0;
    for (const auto& block : a.mlp_adapters)
      for (const auto& t : block) n += t.numel();
    std::printf("adapters       AdaptFormer beside the MLP of %zu blocks: bottleneck %lld, scale %g, %s parameters\n",
                a.mlp_adapters.size(), static_cast<long long>(a.adaptformer.bottleneck), a.adaptformer.scale,
                human_count(static_cast<double>(n)).c_str());
  }
  if (!a.prompt_sets.empty())
    std::printf("prompts        VPT-%s: %zu set(s) of %lld tokens x %lld, %s parameters\n", a.vpt.deep ? "deep" : "shallow",
                a.prompt_sets.size(), static_cast<long long>(a.vpt.tokens),
                static_cast<long long>(a.prompt_sets.front().size(1)),
                human_count(static_cast<double>(a.prompt_sets.size() * a.prompt_sets.front().numel())).c_str());
  if (a.head_weight.defined())
    std::printf("head           %lld classes x %lld features\n", static_cast<long long>(a.head_weight.size(0)),
                static_cast<long long>(a.head_weight.size(1)));
  if (!a.training.empty()) std::printf("training       %s\n", a.training.dump().c_str());
}

void print_model(const fs::path& path, const InfoCommand& command) {
  Bundle b = load_bundle(path);
  int64_t params = 0;
  for (const auto& p : b.module.parameters()) params += p.numel();
  const bool text = b.info.kind == "text_encoder";
  std::printf("model          %s\n", path.c_str());
  std::printf("kind           %s (%s)\n", b.info.kind.c_str(),
              text ? "tokens -> text embeddings; zero-shot heads, adapted with loss contrastive"
                   : b.info.kind == "classifier" ? "images -> logits; merged" : "images -> features");
  std::printf("family         %s%s%s\n", b.info.family.c_str(), b.info.architecture.empty() ? "" : " / ",
              b.info.architecture.c_str());
  if (!b.info.name.empty()) std::printf("name           %s\n", b.info.name.c_str());
  std::printf("parameters     %s, fingerprint %s\n", human_count(static_cast<double>(params)).c_str(), b.fingerprint.c_str());
  std::printf("%s%lld\n", text ? "embeddings     " : "features       ", static_cast<long long>(b.info.feature_dim));
  if (text) {
    const auto& x = b.info.extra;
    const std::string file = x.value("tokenizer", "") == "sentencepiece" ? x.value("tokenizer_file", "?")
                                                                        : x.value("merges_file", "?");
    std::printf("tokenizer      %s, context %s tokens, %s inside\n", x.value("tokenizer", "?").c_str(),
                x.value("context_length", nlohmann::json("?")).dump().c_str(), file.c_str());
    if (x.contains("logit_scale")) std::printf("logit scale    %s\n", x["logit_scale"].dump().c_str());
    return;
  }
  std::printf("preprocessing  resize short side %lld (%s), center crop %lld, mean [%g %g %g], std [%g %g %g]\n",
              static_cast<long long>(b.info.resize_size), b.info.interpolation.c_str(), static_cast<long long>(b.info.image_size),
              b.info.mean[0], b.info.mean[1], b.info.mean[2], b.info.std[0], b.info.std[1], b.info.std[2]);
  if (b.info.kind == "classifier") {
    std::printf("classes        %zu: %s\n", b.info.classes.size(), join(b.info.classes, ", ", 20).c_str());
    return;
  }
  std::printf("blocks         %s\n", b.has_block_structure()
                                       ? (b.info.blocks + " (" + std::to_string(b.blocks().size()) + " blocks; checkpointing per block)").c_str()
                                       : "no stem/blocks/head structure (no per-block checkpointing)");
  const auto candidates = candidate_modules(b.module);
  std::printf("candidate LoRA targets (%zu modules with 2-D weights):\n", candidates.size());
  for (const auto& c : candidates) std::printf("  %s\n", c.c_str());
  TrainConfig config;
  if (!command.config.empty() || !command.overrides.empty()) {
    auto overrides = command.overrides;
    if (command.config.empty()) overrides.insert(overrides.begin(), {"model=" + path.string(), "data.train=-"});
    config = load_train_config(command.config, overrides);
  }
  const char* who = command.config.empty() && command.overrides.empty() ? "the default LoRA settings" : "this config";
  if (config.method == Method::kVpt) {
    const TokenLayout layout = token_layout(b);
    const int64_t sets = config.vpt.deep ? static_cast<int64_t>(b.blocks().size()) : 1;
    const int64_t prompt_params = sets * config.vpt.tokens * layout.width;
    std::printf("%s would train %lld prompt tokens x %lld before %s (VPT-%s), %s parameters (%s of the base)\n", who,
                static_cast<long long>(config.vpt.tokens), static_cast<long long>(layout.width),
                config.vpt.deep ? "every block" : "the first block", config.vpt.deep ? "deep" : "shallow",
                human_count(static_cast<double>(prompt_params)).c_str(),
                percent(static_cast<double>(prompt_params) / params, 3).c_str());
    return;
  }
  if (config.method == Method::kAdaptFormer) {
    const int64_t width = token_layout(b, Method::kAdaptFormer).width, r = config.adaptformer.bottleneck;
    const int64_t n = static_cast<int64_t>(b.blocks().size()) * (2 * r * width + r + width);
    std::printf("%s would train AdaptFormer adapters (bottleneck %lld, scale %g) beside the MLP of each of %zu blocks, "
                "%s parameters (%s of the base)\n", who, static_cast<long long>(r), config.adaptformer.scale,
                b.blocks().size(), human_count(static_cast<double>(n)).c_str(), percent(static_cast<double>(n) / params, 3).c_str());
    return;
  }
  const auto targets = adapted_targets(b, config.lora);
  int64_t adapter_params = 0;
  for (const auto& t : targets) adapter_params += t.variant->parameter_count(t);
  std::printf("%s would adapt %zu weights, %s adapter parameters (%s of the base):\n", who, targets.size(),
              human_count(static_cast<double>(adapter_params)).c_str(),
              percent(static_cast<double>(adapter_params) / params, 3).c_str());
  for (const auto& t : targets) std::printf("  %s\n", t.describe().c_str());
}

}  // namespace

int run_info(const InfoCommand& command) {
  return guarded([&] {
    cli::setup_logging();
    set_compute_threads(parse_threads(command.threads));
    if (command.path.empty()) throw InputError("give a model bundle (.pt) or an adapter (folder or .safetensors)");
    const fs::path path = command.path;
    if (is_checkpoint_source(command.path)) return print_model(path, command), exit_code::kOk;
    if (!fs::exists(path)) throw InputError(path.string() + " does not exist");
    if (looks_like_adapter(path)) print_adapter(path);
    else print_model(path, command);
    return exit_code::kOk;
  });
}

}  // namespace loratune
