// Memory of standard image encoders from their shapes: the formula behind `plan --table`.
#include "loratune/memory_plan.h"

namespace loratune {
namespace {

constexpr int64_t kLoraRank = 8;
constexpr int64_t kTableClasses = 10;

ArchitectureShape vit(const std::string& name, int64_t dim, int64_t heads, int64_t blocks, int64_t parameters,
                      int64_t patch = 16, int64_t mlp = 0) {
  ArchitectureShape s;
  s.name = name;
  s.patch = patch;
  s.tokens = (s.image_size / patch) * (s.image_size / patch) + 1;
  s.dim = dim;
  s.mlp = mlp > 0 ? mlp : 4 * dim;
  s.heads = heads;
  s.blocks = blocks;
  s.parameters = parameters;
  return s;
}

// MobileCLIP S0/S2 (MCi0/MCi2): convolutional stages, then attention blocks on 8x8 tokens at 256 px. Only the
// attention stage trains; the stages before it run without gradients, and their largest activation is the stem's
// output at half resolution (in and out, 16 bits) next to the input's 16-bit copy.
ArchitectureShape mobileclip_hybrid(const std::string& name, int64_t stem_channels, int64_t dim, int64_t blocks,
                                    int64_t parameters) {
  ArchitectureShape s;
  s.name = name;
  s.image_size = 256;
  s.patch = 32;
  s.tokens = 64;
  s.dim = dim;
  s.mlp = 3 * dim;
  s.heads = dim / 32;
  s.blocks = blocks;
  s.parameters = parameters;
  s.frozen_prefix_per_image = (s.image_size / 2) * (s.image_size / 2) * stem_channels * 2 * 2 + 3 * s.image_size * s.image_size * 2;
  s.note = "approximate: attention blocks with a 3x convolutional MLP taken as a ViT block";
  return s;
}

}  // namespace

std::vector<ArchitectureShape> standard_architectures() {
  ArchitectureShape mobileclip_b = vit("MobileCLIP-B", 768, 12, 12, 86'300'000);
  mobileclip_b.note = "ViT-B/16 image encoder";
  ArchitectureShape internvit_6b = vit("InternViT-6B", 3200, 25, 45, 5'900'000'000, 14, 12800);
  internvit_6b.note = "its shape at 224 px (its 448 px release has 4x the tokens)";
  return {vit("ViT-Ti/16", 192, 3, 12, 5'700'000),
          vit("ViT-S/16", 384, 6, 12, 22'100'000),
          vit("ViT-B/16", 768, 12, 12, 86'600'000),
          vit("ViT-L/16", 1024, 16, 24, 304'300'000),
          vit("ViT-H/14", 1280, 16, 32, 632'000'000, 14),
          vit("ViT-g/14", 1408, 16, 40, 1'011'000'000, 14, 6144),
          vit("ViT-bigG/14", 1664, 16, 48, 1'845'000'000, 14, 8192),
          internvit_6b,
          mobileclip_hybrid("MobileCLIP-S0", 64, 512, 2, 11'400'000),
          mobileclip_hybrid("MobileCLIP-S2", 80, 640, 4, 35'700'000),
          mobileclip_b};
}

MemoryProfile vit_memory_profile(const ArchitectureShape& s, Tuning tuning, bool checkpoint, QuantFormat quant,
                                 bool offload) {
  // Bytes one image keeps per block under 16-bit autocast with fused attention (N tokens, D width, M MLP width,
  // h heads), from what autograd saves: each LayerNorm's fp32 input (4ND each), the attention's q, k, v and output
  // (8ND) and its log-sum-exp (4hN), the GELU input (2NM); LoRA adds its input (2ND) and the rank-r products; full
  // fine-tuning saves every Linear's input instead (q/k/v and fc1 inputs, the fc2 input 2NM). Backward holds about
  // 2NM + 12ND more (gradients of the MLP and of the block's input and output): that term was fitted to the peaks
  // measured on an H200 (docs/benchmarks.md: ViT-B/L/H at 12 GiB), which the whole formula meets within 4% (LoRA without dropout).
  const int64_t n = s.tokens, d = s.dim, m = s.mlp, h = s.heads;
  const bool lora = tuning == Tuning::kLora;
  const int64_t block = lora ? 18 * n * d + 2 * n * m + 4 * n * kLoraRank * 2 + 4 * h * n
                             : 20 * n * d + 4 * n * m + 4 * h * n;
  const int64_t backward = 2 * n * m + 12 * n * d;
  MemoryProfile p;
  p.source = "computed from the architecture's shapes (CUDA, 16-bit autocast, fused attention)";
  p.device = c10::Device(c10::kCUDA, 0);
  p.precision = Precision::kFp16;
  p.checkpoint = checkpoint;
  const int64_t lora_parameters = s.blocks * 2 * kLoraRank * 2 * d;
  const int64_t head_parameters = d * kTableClasses + kTableClasses;
  const int64_t linear = s.blocks * (4 * d * d + 2 * d * m);  // the blocks' Linear weights
  if (lora && offload) {
    // offload both: the blocks' Linear weights wait in host memory, two blocks' on the GPU at a time (the rest of
    // the blocks' tensors, norms and biases, is counted as if it stayed); the checkpointed blocks' saved inputs too.
    const int64_t rows = s.blocks * (4 * d + m + d);
    const int64_t stored = quant == QuantFormat::kInt8 ? linear + 4 * rows
                           : quant == QuantFormat::kNf4 ? linear / 2 + linear / 64 + 4 * (linear / 64 / 256 + 1)
                                                        : 2 * linear;
    const int64_t two_blocks = stored * std::min<int64_t>(2, s.blocks) / std::max<int64_t>(1, s.blocks);
    p.frozen_dtype = at::kHalf;
    p.frozen_quant = quant;
    p.frozen_by_dtype = {{"fp16", (s.parameters - linear) * 2},
                         {"Linear weights of 2 blocks (offload), " +
                              (quant == QuantFormat::kNone ? std::string("fp16") : quant_format_name(quant)),
                          two_blocks}};
    p.host_offload_fixed = stored - two_blocks;
    p.trainable_parameters = lora_parameters + head_parameters;
    p.extra_fixed = quant == QuantFormat::kNone ? 0 : 4 * d * m;
  } else if (lora && quant != QuantFormat::kNone) {
    // The blocks' Linear weights quantised (int8: a byte each and an fp32 scale per row; NF4: half a byte, an int8
    // scale per 64 and the group scales), the rest 16-bit; one layer's weight is dense while it runs: its 16-bit
    // copy and the index or fp32 temporaries of its dequantisation, about 4 bytes an element.
    const int64_t rows = s.blocks * (4 * d + m + d);
    const int64_t stored = quant == QuantFormat::kInt8 ? linear + 4 * rows : linear / 2 + linear / 64 + 4 * (linear / 64 / 256 + 1);
    p.frozen_dtype = at::kHalf;
    p.frozen_quant = quant;
    p.frozen_by_dtype = {{"fp16", (s.parameters - linear) * 2}, {quant_format_name(quant) + ", quantised Linear weights", stored}};
    p.trainable_parameters = lora_parameters + head_parameters;
    p.extra_fixed = 4 * d * m;
  } else if (lora) {
    p.frozen_dtype = at::kHalf;
    p.frozen_by_dtype = {{"fp16", s.parameters * 2}};
    p.trainable_parameters = lora_parameters + head_parameters;
  } else {
    p.frozen_dtype = at::kFloat;
    p.trainable_parameters = s.parameters + head_parameters;
  }
  // cuBLAS workspaces and other buffers (measured 90-113 MB); full fine-tuning adds autocast's 16-bit weight copies.
  p.extra_fixed += 96 * kMiB + (lora ? 0 : 2 * s.parameters);
  p.input_per_image = 3 * s.image_size * s.image_size * 4;
  p.trained_blocks = s.blocks;
  p.block_output_per_image = n * d * 2;
  if (checkpoint && lora && offload) {
    p.kept.per_image = std::min<int64_t>(2, s.blocks) * p.block_output_per_image;  // in flight to or from the host
    p.host_offload_per_image = s.blocks * p.block_output_per_image;
    p.extra.per_image = block + backward;
  } else if (checkpoint) {
    p.kept.per_image = s.blocks * p.block_output_per_image;
    p.extra.per_image = block + backward;
  } else {
    p.kept.per_image = s.blocks * block;
    p.extra.per_image = backward;
  }
  p.prefix_peak_per_image = s.frozen_prefix_per_image;
  return p;
}

}  // namespace loratune
