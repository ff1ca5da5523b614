// Pieces of a self-contained HTML page: text that is shown as text whatever it holds (file and class names are
// untrusted), data for the page's script, and photos embedded as JPEG thumbnails.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "common/html_text.h"

namespace loratune::html {

std::string base64(const std::string& bytes);

// The photo at `path` as a data: URI of a JPEG whose longer side is at most `max_side` pixels; empty when it cannot
// be decoded any more (moved, deleted, damaged since the evaluation).
std::optional<std::string> thumbnail(const std::filesystem::path& path, int max_side);

}  // namespace loratune::html
