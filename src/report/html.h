// Pieces of a self-contained HTML page: text that is shown as text whatever it holds (file and class names are
// untrusted), data for the page's script, and photos embedded as JPEG thumbnails.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace loratune::html {

// `s` for an HTML text node or a quoted attribute value: & < > " ' escaped; invalid UTF-8 bytes shown as \xNN.
std::string escape(const std::string& s);

// `j` as JSON that can sit inside <script type="application/json">: < > & written as \u003c \u003e \u0026 (no
// "</script>" can end the element early), invalid UTF-8 replaced.
std::string script_json(const nlohmann::json& j);

std::string base64(const std::string& bytes);

// The photo at `path` as a data: URI of a JPEG whose longer side is at most `max_side` pixels; empty when it cannot
// be decoded any more (moved, deleted, damaged since the evaluation).
std::optional<std::string> thumbnail(const std::filesystem::path& path, int max_side);

}  // namespace loratune::html
