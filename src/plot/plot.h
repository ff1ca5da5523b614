// PNG charts for reports: line charts (loss, learning rate, accuracy) and confusion matrices.
// Text is drawn with a TrueType font when one is found (a CJK font renders Korean class names; set LORATUNE_FONT to
// choose one), else with OpenCV's ASCII font; names the font cannot show are replaced by indices with a legend.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace loratune {

struct Series {
  std::string name;
  std::vector<double> x, y;
};

struct ChartOptions {
  std::string title, x_label, y_label;
  bool log_y = false;
  int width = 900, height = 480;
};

// Writes a line chart PNG (atomically).
void write_line_chart(const std::filesystem::path& path, const std::vector<Series>& series, const ChartOptions& options);

// Writes a confusion matrix PNG (rows: true class, columns: predicted; colour by row fraction, counts in cells).
// Returns the legend lines ("3: 고양이") when some names had to be replaced by indices, else an empty list.
std::vector<std::string> write_confusion_matrix(const std::filesystem::path& path,
                                                const std::vector<std::vector<int64_t>>& confusion,
                                                const std::vector<std::string>& classes, const std::string& title);

// Whether class names like these render with the font found on this machine.
bool font_renders(const std::string& utf8);

}  // namespace loratune
