// Untrusted text (file and class names) on a generated HTML page: as text, or as JSON data for the page's script.
// The report and the export's web page write their names through these.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace loratune::html {

// `s` for an HTML text node or a quoted attribute value: & < > " ' escaped; invalid UTF-8 bytes shown as \xNN.
std::string escape(const std::string& s);

// `j` as JSON that can sit inside <script type="application/json">: < > & written as \u003c \u003e \u0026 (no
// "</script>" can end the element early), invalid UTF-8 replaced.
std::string script_json(const nlohmann::json& j);

}  // namespace loratune::html
