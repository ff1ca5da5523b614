// Charts as inline SVG for the HTML report: crisp at any zoom, text in the page's fonts (Korean included).
#pragma once

#include <string>
#include <vector>

#include "loratune/metrics.h"
#include "plot/plot.h"

namespace loratune::svg {

// Line chart of `series` (points with non-finite values left out); an empty-state box when none has points.
std::string line_chart(const std::vector<Series>& series, const ChartOptions& options);

// Reliability diagram: accuracy per confidence bin as bars, the diagonal of perfect calibration, each bin's count.
std::string reliability_diagram(const std::vector<CalibrationBin>& bins, int width = 420, int height = 360);

}  // namespace loratune::svg
