#include "report/svg.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <utility>
#include <vector>

#include "report/html.h"

namespace loratune::svg {
namespace {

const char* const kPalette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"};

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4g", v);
  return buf;
}

std::string px(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

// About `count` round tick values covering [lo, hi].
std::vector<double> ticks(double lo, double hi, int count) {
  const double span = hi - lo, raw = span / count, magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  double step = magnitude;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * magnitude >= raw) {
      step = m * magnitude;
      break;
    }
  std::vector<double> out;
  for (double t = std::ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push_back(std::abs(t) < step * 1e-9 ? 0 : t);
  return out;
}

std::string text(double x, double y, const std::string& s, const char* anchor = "middle", const char* extra = "") {
  return "<text x=\"" + px(x) + "\" y=\"" + px(y) + "\" text-anchor=\"" + anchor + "\"" + extra + ">" + html::escape(s) +
         "</text>";
}

std::string open_svg(int width, int height, const std::string& title) {
  return "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\" viewBox=\"0 0 " + std::to_string(width) + " " +
         std::to_string(height) + "\" width=\"" + std::to_string(width) + "\" height=\"" + std::to_string(height) +
         "\" role=\"img\" aria-label=\"" + html::escape(title) + "\">" +
         text(width / 2.0, 18, title, "middle", " class=\"title\"");
}

}  // namespace

std::string line_chart(const std::vector<Series>& series, const ChartOptions& options) {
  const int w = options.width, h = options.height;
  const double left = 64, right = w - 16, top = 32, bottom = h - 44;
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const Series& s : series)
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i)
      if (std::isfinite(s.x[i]) && std::isfinite(s.y[i]) && (!options.log_y || s.y[i] > 0)) {
        const double y = options.log_y ? std::log10(s.y[i]) : s.y[i];
        x0 = std::min(x0, s.x[i]), x1 = std::max(x1, s.x[i]), y0 = std::min(y0, y), y1 = std::max(y1, y);
      }
  std::string out = open_svg(w, h, options.title);
  if (!std::isfinite(x0)) return out + text(w / 2.0, h / 2.0, "no data yet", "middle", " class=\"muted\"") + "</svg>";
  if (x1 == x0) x0 -= 1, x1 += 1;
  if (y1 == y0) y0 -= std::max(1e-3, std::abs(y0) * 0.1), y1 += std::max(1e-3, std::abs(y1) * 0.1);
  const double pad = (y1 - y0) * 0.05;
  y0 -= pad, y1 += pad;
  auto sx = [&](double x) { return left + (x - x0) / (x1 - x0) * (right - left); };
  auto sy = [&](double y) { return bottom - (y - y0) / (y1 - y0) * (bottom - top); };
  for (double t : ticks(y0, y1, 5)) {
    out += "<line class=\"grid\" x1=\"" + px(left) + "\" x2=\"" + px(right) + "\" y1=\"" + px(sy(t)) + "\" y2=\"" +
           px(sy(t)) + "\"/>";
    out += text(left - 6, sy(t) + 4, number(options.log_y ? std::pow(10.0, t) : t), "end");
  }
  for (double t : ticks(x0, x1, 8)) out += text(sx(t), bottom + 16, number(t));
  out += "<rect class=\"frame\" x=\"" + px(left) + "\" y=\"" + px(top) + "\" width=\"" + px(right - left) +
         "\" height=\"" + px(bottom - top) + "\"/>";
  out += text((left + right) / 2, h - 8, options.x_label);
  out += text(14, (top + bottom) / 2, options.y_label, "middle",
              (" transform=\"rotate(-90 14 " + px((top + bottom) / 2) + ")\"").c_str());
  for (size_t k = 0; k < series.size(); ++k) {
    const Series& s = series[k];
    const char* colour = kPalette[k % std::size(kPalette)];
    std::vector<std::pair<double, double>> drawn;
    for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i)
      if (std::isfinite(s.x[i]) && std::isfinite(s.y[i]) && (!options.log_y || s.y[i] > 0))
        drawn.emplace_back(sx(s.x[i]), sy(options.log_y ? std::log10(s.y[i]) : s.y[i]));
    std::string points;
    for (const auto& [x, y] : drawn) points += px(x) + "," + px(y) + " ";
    out += "<polyline fill=\"none\" stroke-width=\"1.8\" stroke=\"" + std::string(colour) + "\" points=\"" + points +
           "\"><title>" + html::escape(s.name) + "</title></polyline>";
    if (drawn.size() == 1)  // a line of one point draws nothing
      out += "<circle r=\"3\" fill=\"" + std::string(colour) + "\" cx=\"" + px(drawn[0].first) + "\" cy=\"" + px(drawn[0].second) + "\"/>";
    out += "<rect x=\"" + px(left + 10) + "\" y=\"" + px(top + 8 + 16 * k) + "\" width=\"12\" height=\"3\" fill=\"" + colour + "\"/>";
    out += text(left + 28, top + 13 + 16 * k, s.name, "start");
  }
  return out + "</svg>";
}

std::string reliability_diagram(const std::vector<CalibrationBin>& bins, int width, int height) {
  const double left = 52, right = width - 16, top = 32, bottom = height - 44;
  auto sx = [&](double x) { return left + x * (right - left); };
  auto sy = [&](double y) { return bottom - y * (bottom - top); };
  std::string out = open_svg(width, height, "reliability diagram");
  for (double t : {0.0, 0.25, 0.5, 0.75, 1.0}) {
    out += "<line class=\"grid\" x1=\"" + px(left) + "\" x2=\"" + px(right) + "\" y1=\"" + px(sy(t)) + "\" y2=\"" +
           px(sy(t)) + "\"/>";
    out += text(left - 6, sy(t) + 4, number(t), "end") + text(sx(t), bottom + 16, number(t));
  }
  for (const CalibrationBin& b : bins) {
    if (b.count == 0) continue;
    const double x = sx(b.lower) + 1, bar_width = sx(b.upper) - sx(b.lower) - 2;
    const std::string tip = "<title>confidence " + number(b.lower) + "-" + number(b.upper) + ": " +
                            std::to_string(b.count) + " photos, accuracy " + number(100 * b.accuracy) +
                            "%, mean confidence " + number(100 * b.confidence) + "%</title>";
    out += "<rect class=\"bar\" x=\"" + px(x) + "\" y=\"" + px(sy(b.accuracy)) + "\" width=\"" + px(bar_width) +
           "\" height=\"" + px(sy(0) - sy(b.accuracy)) + "\">" + tip + "</rect>";
    const double gap_top = std::max(b.accuracy, b.confidence), gap_bottom = std::min(b.accuracy, b.confidence);
    out += "<rect class=\"gap\" x=\"" + px(x) + "\" y=\"" + px(sy(gap_top)) + "\" width=\"" + px(bar_width) +
           "\" height=\"" + px(sy(gap_bottom) - sy(gap_top)) + "\">" + tip + "</rect>";
  }
  out += "<line class=\"diagonal\" x1=\"" + px(sx(0)) + "\" y1=\"" + px(sy(0)) + "\" x2=\"" + px(sx(1)) + "\" y2=\"" +
         px(sy(1)) + "\"/>";
  out += "<rect class=\"frame\" x=\"" + px(left) + "\" y=\"" + px(top) + "\" width=\"" + px(right - left) +
         "\" height=\"" + px(bottom - top) + "\"/>";
  out += text((left + right) / 2, height - 8, "confidence (top-1 probability)");
  out += text(14, (top + bottom) / 2, "accuracy", "middle",
              (" transform=\"rotate(-90 14 " + px((top + bottom) / 2) + ")\"").c_str());
  return out + "</svg>";
}

}  // namespace loratune::svg
