// Small text helpers shared by config parsing, error messages and reports.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loratune {

// Edit distance between two strings (bytes).
size_t edit_distance(const std::string& a, const std::string& b);

// The candidate closest to `word`, or "" when nothing is reasonably close.
std::string nearest(const std::string& word, const std::vector<std::string>& candidates);

// Order in which digit runs compare as numbers: "blocks.2" before "blocks.10".
bool natural_less(const std::string& a, const std::string& b);

// "a, b, c" (at most `limit` items, then "... (N more)").
std::string join(const std::vector<std::string>& items, const std::string& sep = ", ", size_t limit = 0);

// ASCII letters in lower case (the rest unchanged); `s` without leading and trailing spaces, tabs and line breaks.
std::string to_lower(std::string s);
std::string trim(const std::string& s);

// Human readable counts and sizes: 1.2M, 3.4 GB, 1m05s.
std::string human_count(double n);
std::string human_bytes(double bytes);
std::string human_duration(double seconds);
// 0.1234 -> "12.34%" (with `decimals` digits after the point).
std::string percent(double fraction, int decimals = 2);

// Number of display columns of a UTF-8 string (East Asian wide characters count as two).
size_t display_width(const std::string& utf8);

// True when the bytes are valid UTF-8.
bool is_valid_utf8(const std::string& s);

// `s` with each byte that is not part of valid UTF-8 written as \xNN (for messages and JSON files).
std::string escape_invalid_utf8(const std::string& s);

// `s` as one line of a message: invalid UTF-8 bytes and control characters (newline, escape, ...) as \xNN.
std::string printable(const std::string& s);

// Delimited text (RFC 4180), one record per line: fields split at `separator`; quoted fields may hold separators,
// quotes ("") and line breaks; empty lines are no record. Each record with the line it starts on. InputError naming
// `origin` for a quote left open.
struct DelimitedRecord {
  int64_t line = 0;
  std::vector<std::string> fields;
};
std::vector<DelimitedRecord> parse_delimited(const std::string& text, char separator, const std::string& origin);

// `s` as one CSV field (RFC 4180): quoted, with quotes doubled, where it holds a comma, a quote or a line break.
std::string csv_field(const std::string& s);

}  // namespace loratune
