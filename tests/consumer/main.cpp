// Loads a bundle, attaches an adapter and prints the logits of a constant image: consumer BUNDLE ADAPTER
#include <cstdio>

#include "loratune/loratune.h"

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  loratune::Model model(loratune::load_bundle(argv[1]));
  loratune::apply_adapter(model, loratune::load_adapter(argv[2]), argv[2]);
  const int64_t s = model.bundle().info.image_size;
  at::NoGradGuard no_grad;
  const at::Tensor logits = model.logits(at::full({1, 3, s, s}, 0.5));
  for (int64_t i = 0; i < logits.size(1); ++i) std::printf("%.7f\n", logits[0][i].item<double>());
  return 0;
}
