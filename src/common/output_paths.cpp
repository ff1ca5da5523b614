#include "common/output_paths.h"

#include <fstream>

#include "loratune/errors.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

// Absolute, with links and "..", "." resolved as far as the path exists.
fs::path resolved(const fs::path& p) {
  std::error_code ec;
  const fs::path absolute = fs::absolute(p, ec);
  const fs::path canonical = fs::weakly_canonical(absolute, ec);
  return ec ? absolute.lexically_normal() : canonical;
}

// Whether `path` is `folder` or below it, component by component (empty components from trailing slashes ignored).
bool within(const fs::path& path, const fs::path& folder) {
  auto p = path.begin();
  for (const auto& part : folder) {
    if (part.empty()) continue;
    while (p != path.end() && p->empty()) ++p;
    if (p == path.end() || *p != part) return false;
    ++p;
  }
  return true;
}

}  // namespace

void refuse_output_over_inputs(const fs::path& output, const std::string& option, const std::vector<fs::path>& inputs) {
  const fs::path out = resolved(output);
  std::error_code ec;
  const bool output_exists = fs::exists(output, ec);
  for (const auto& input : inputs) {
    if (input.empty() || !fs::exists(input, ec)) continue;
    const std::string where = option + " " + output.string();
    if ((output_exists && fs::equivalent(output, input, ec)) || out == resolved(input))
      throw InputError(where + " is the input " + input.string() + "; write it elsewhere (outputs never replace inputs)");
    if (fs::is_directory(input, ec) && within(out, resolved(input)))
      throw InputError(where + " is inside the input folder " + input.string() + "; write it elsewhere (outputs never "
                       "go into inputs)");
  }
}

void refuse_replacing_other_kind(const fs::path& output, const std::string& option, OutputKind kind) {
  std::error_code ec;
  if (!fs::is_regular_file(output, ec)) return;
  std::ifstream in(output, std::ios::binary);
  std::string head(4096, '\0');
  in.read(head.data(), static_cast<std::streamsize>(head.size()));
  head.resize(static_cast<size_t>(in.gcount()));
  const bool text = head.find('\0') == std::string::npos;
  const bool torchscript = head.compare(0, 4, "PK\x03\x04") == 0;  // a zip archive, as TorchScript files are
  if (kind == OutputKind::kText && !text)
    throw InputError(option + " " + output.string() + " exists and is not a text file (a photo? a model?); it is left "
                     "as it is: choose another name, or remove it first");
  if (kind == OutputKind::kTorchScript && !torchscript)
    throw InputError(option + " " + output.string() + " exists and is not a TorchScript file; it is left as it is: "
                     "choose another name, or remove it first");
}

}  // namespace loratune
