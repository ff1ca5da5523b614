// loratune: LoRA fine-tuning of pretrained vision models on your own photos. The commands and their flags are the
// table of src/cli/command_line.cpp; their options and defaults, the structs of src/cli/commands.h.
#include "cli/command_line.h"
#include "loratune/cpu_allocator.h"

int main(int argc, char** argv) {
  loratune::install_caching_cpu_allocator();
  return loratune::run_command_line(argc, argv);
}
