// Trains as `loratune train --config CONFIG` does, in one library call: consumer_train CONFIG
#include <cstdio>

#include "loratune/text.h"
#include "loratune/vision.h"

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  try {
    loratune::TrainingRunOptions options;
    options.zero_shot = loratune::zero_shot_head_initializer();
    const loratune::TrainingRun run = loratune::run_training(loratune::load_train_config(argv[1], {}), options);
    std::printf("%lld steps\n", static_cast<long long>(run.summary.steps));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
