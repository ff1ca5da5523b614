#include "cli/common.h"
#include "cli/commands.h"
#include "loratune/errors.h"
#include "loratune/merge.h"
#include "loratune/threads.h"
#include "loratune/zero_shot.h"

namespace loratune {

int run_merge(const MergeCommand& command) {
  return guarded([&] {
    cli::setup_logging();
    set_compute_threads(parse_threads(command.threads));  // one pass over fixed work: auto is the load-aware start
    if (command.base.empty() || command.adapter.empty() || command.output.empty())
      throw InputError("merge needs --base, --adapter and --output");
    MergeOptions options;
    options.strength = command.strength;
    options.features_only = command.features_only;
    options.text_model = command.text_model;
    options.text_head = prompt_head_maker();
    const MergeReport r = merge_adapter(command.base, command.adapter, command.output, options);
    for (const auto& line : r.merged) std::printf("merged %s\n", line.c_str());
    if (!r.text_output.empty())
      std::printf("wrote %s (text tower, max |merged - adapted| = %.3g on probe tokens)\n", r.text_output.c_str(),
                  r.text_max_abs_diff);
    std::printf("wrote %s (%s)\n", r.output.c_str(), command.features_only ? "backbone bundle" : "TorchScript classifier");
    std::printf("check on a probe batch: max |merged - adapted| = %.3g %s\n", r.max_abs_diff,
                r.max_abs_diff < 1e-4 ? "(ok)" : "(LARGER THAN EXPECTED)");
    return exit_code::kOk;  // larger differences than kMergeTolerance fail before the output is written
  });
}

}  // namespace loratune
