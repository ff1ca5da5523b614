// Outputs never replace inputs: every command checks the paths it is about to write against the paths it reads.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace loratune {

// InputError ("<option> <output> is the input ...; write it elsewhere") when `output`, a file or a folder to be
// written, is one of `inputs` (the same file, also through links) or lies inside an input folder. Empty and missing
// inputs are skipped.
void refuse_output_over_inputs(const std::filesystem::path& output, const std::string& option,
                               const std::vector<std::filesystem::path>& inputs);

// What a command writes to a file named by the user; an existing file there is replaced only when it is of the same
// kind (an earlier output), never a photo, a model or anything else that happens to have that name.
enum class OutputKind { kText, kTorchScript };

// InputError ("<option> <output> exists and is not ...") when `output` exists and is not of `kind`.
void refuse_replacing_other_kind(const std::filesystem::path& output, const std::string& option, OutputKind kind);

}  // namespace loratune
