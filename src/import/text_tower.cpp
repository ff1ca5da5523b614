// CLIP's text tower (transformers and open_clip name its parts differently; the computation is the same).
#include <cmath>

#include "common/files.h"
#include "import/families.h"

namespace loratune::importer {

torch::jit::Module clip_text_tower(ScriptBuilder& b, CheckpointTensors& ckpt, const TextTowerNames& n,
                                   const TextTowerShape& s) {
  torch::jit::Module root = b.container("ImportedTextTower");
  place_parameter(b, root, n.token_embedding, ckpt.take(n.token_embedding, {s.vocab, s.width}));
  place_parameter(b, root, n.position_embedding, ckpt.take(n.position_embedding, {s.context, s.width}));
  for (int64_t i = 0; i < s.layers; ++i)
    place(b, root, n.blocks + "." + std::to_string(i),
          transformer_block(b, ckpt, n.blocks + "." + std::to_string(i) + ".", n.layout, {s.width, s.heads, s.mlp_hidden}));
  place(b, root, n.final_norm, b.layer_norm(ckpt, n.final_norm, s.width, s.eps));
  std::string project;
  if (n.projection_is_linear) {
    const std::string module = n.projection.substr(0, n.projection.rfind('.'));
    place(b, root, module, b.linear(ckpt, module, s.embed_dim, s.width,
                                    n.projection_bias ? ScriptBuilder::Bias::yes : ScriptBuilder::Bias::no));
    project = "self." + module + ".forward(x)";
  } else {
    place_parameter(b, root, n.projection, ckpt.take(n.projection, {s.width, s.embed_dim}));
    project = "torch.matmul(x, self." + n.projection + ")";
  }
  // CLIP's tokenizer gives end-of-text the largest id: its position is the argmax of each row.
  const std::string pool = n.pool_last ? "    x = x[:, -1]\n"
                                       : "    x = x[torch.arange(x.size(0), device=x.device), tokens.argmax(-1)]\n";
  b.define(root, "def forward(self, tokens):\n"
                 "    x = torch.embedding(self." + n.token_embedding + ", tokens)\n"
                 "    x = x + self." + n.position_embedding + "[0:tokens.size(1)]\n" +
                     run_blocks_source("self." + n.blocks, s.layers, "x") +
                 "    x = self." + n.final_norm + ".forward(x)\n" +
                 pool + "    return " + project + "\n");
  return root;
}

ImportedModel clip_text_bundle(const Folder& folder, CheckpointTensors& ckpt, const TextTowerNames& n,
                               const TextTowerShape& s, const std::string& architecture,
                               const std::string& tokenizer_file, const nlohmann::json& tokenizer) {
  const double logit_scale = ckpt.has("logit_scale") ? std::exp(ckpt.take("logit_scale", {}).item<double>()) : 100.0;
  ScriptBuilder b;
  torch::jit::Module module = clip_text_tower(b, ckpt, n, s);
  ckpt.expect_all_taken();
  nlohmann::json m = {{"format", 1}, {"kind", "text_encoder"}, {"family", "clip"}, {"architecture", architecture},
                      {"name", folder.name + " (imported)"}, {"feature_dim", s.embed_dim},
                      {"context_length", s.context}, {"vocab_size", s.vocab}, {"logit_scale", logit_scale}, {"blocks", n.blocks},
                      {"module_prefix", ""}};
  m.update(tokenizer);
  const std::string inside = m.value("tokenizer", "") == "sentencepiece" ? m.value("tokenizer_file", "spiece.model")
                                                                          : m.value("merges_file", "bpe_merges.txt");
  return {module, m, {{inside, read_file(folder.file(tokenizer_file))}}};
}

}  // namespace loratune::importer
