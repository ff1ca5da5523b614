// The HTML report: one self-contained page (thumbnails embedded, no network) of training runs and evaluations:
// settings, curves, per-class table, a clickable confusion matrix, the misclassified photos, calibration, and a
// side-by-side comparison of two evaluations of the same photos.
#pragma once

#include <string>
#include <vector>

#include "report/records.h"

namespace loratune {

struct ReportOptions {
  int max_thumbnails = 500;  // photos embedded as thumbnails (errors first, most confident first); the rest by name
  int thumbnail_side = 112;  // pixels, longer side
  int max_tiles = 500;       // photo tiles one grid shows; the count of the rest after them
};

// Names the sources in the page: the folder names, made unique with their parents where two are equal.
std::string render_report(const std::vector<RunRecord>& runs, const std::vector<EvalRecord>& evals,
                          const ReportOptions& options = {});

}  // namespace loratune
