#include "plot/plot.h"

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#ifdef LORATUNE_WITH_FREETYPE
#include <opencv2/freetype.hpp>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mutex>

#include "loratune/errors.h"
#include "common/files.h"
#include "common/strings.h"

namespace fs = std::filesystem;

namespace loratune {
namespace {

const cv::Scalar kBlack(30, 30, 30), kGrey(200, 200, 200), kWhite(255, 255, 255);
const cv::Scalar kPalette[] = {{180, 119, 31}, {14, 127, 255}, {44, 160, 44}, {40, 39, 214}, {189, 103, 148}, {75, 86, 140}};

// Draws text with a TrueType font when available, else with OpenCV's Hershey font (ASCII only).
class Text {
 public:
  static Text& get() {
    static Text instance;
    return instance;
  }
  bool renders(const std::string& s) const {
    const bool ascii = std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
    return ascii || cjk_;
  }
  cv::Size size(const std::string& s, int height) const {
    int baseline = 0;
#ifdef LORATUNE_WITH_FREETYPE
    if (ft_) return ft_->getTextSize(s, height, -1, &baseline);
#endif
    return cv::getTextSize(s, cv::FONT_HERSHEY_SIMPLEX, height / 30.0, 1, &baseline);
  }
  // `org`: bottom-left corner of the text.
  void draw(cv::Mat& img, const std::string& s, cv::Point org, int height, const cv::Scalar& color) const {
#ifdef LORATUNE_WITH_FREETYPE
    if (ft_) {
      ft_->putText(img, s, org, height, color, -1, cv::LINE_AA, true);
      return;
    }
#endif
    cv::putText(img, s, org, cv::FONT_HERSHEY_SIMPLEX, height / 30.0, color, 1, cv::LINE_AA);
  }

 private:
  Text() {
#ifdef LORATUNE_WITH_FREETYPE
    std::vector<std::pair<std::string, bool>> fonts;  // path, has CJK glyphs
    if (const char* env = std::getenv("LORATUNE_FONT")) fonts.push_back({env, true});
    fonts.insert(fonts.end(), {{"/usr/share/fonts/truetype/nanum/NanumGothic.ttf", true},
                               {"/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", true},
                               {"/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", false}});
    for (const auto& [path, cjk] : fonts) {
      if (!fs::exists(path)) continue;
      try {
        ft_ = cv::freetype::createFreeType2();
        ft_->loadFontData(path, 0);
        cjk_ = cjk;
        return;
      } catch (const cv::Exception&) {
        ft_.release();
      }
    }
#endif
  }
#ifdef LORATUNE_WITH_FREETYPE
  cv::Ptr<cv::freetype::FreeType2> ft_;
#endif
  bool cjk_ = false;
};

std::mutex g_text_mutex;  // FreeType objects are not thread-safe

void write_png(const fs::path& path, const cv::Mat& img) {
  std::vector<uchar> bytes;
  if (!cv::imencode(".png", img, bytes)) throw RuntimeFailure("cannot encode " + path.string());
  write_file_atomic(path, std::string(bytes.begin(), bytes.end()));
}

// Round tick step: 1, 2 or 5 times a power of ten.
double nice_step(double range, int target) {
  const double raw = range / std::max(1, target);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

std::string tick_label(double v) {
  char buf[32];
  if (v != 0 && (std::abs(v) < 1e-3 || std::abs(v) >= 1e5)) std::snprintf(buf, sizeof buf, "%.0e", v);
  else std::snprintf(buf, sizeof buf, "%g", std::abs(v) < 1e-12 ? 0.0 : v);
  return buf;
}

}  // namespace

bool font_renders(const std::string& utf8) {
  std::lock_guard<std::mutex> lock(g_text_mutex);
  return Text::get().renders(utf8);
}

void write_line_chart(const fs::path& path, const std::vector<Series>& series, const ChartOptions& o) {
  std::lock_guard<std::mutex> lock(g_text_mutex);
  const Text& text = Text::get();
  cv::Mat img(o.height, o.width, CV_8UC3, kWhite);
  const int left = 80, right = 20, top = 70, bottom = 60;
  const cv::Rect area(left, top, o.width - left - right, o.height - top - bottom);
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  auto ty = [&](double y) { return o.log_y ? std::log10(y) : y; };
  for (const auto& s : series)
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i]) || (o.log_y && s.y[i] <= 0)) continue;
      x0 = std::min(x0, s.x[i]), x1 = std::max(x1, s.x[i]);
      y0 = std::min(y0, ty(s.y[i])), y1 = std::max(y1, ty(s.y[i]));
    }
  text.draw(img, o.title, {left, 32}, 22, kBlack);
  if (!std::isfinite(x0)) {
    text.draw(img, "no data", {area.x + area.width / 2 - 30, area.y + area.height / 2}, 18, kBlack);
    write_png(path, img);
    return;
  }
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) y1 = y0 + (y0 == 0 ? 1 : std::abs(y0) * 0.1);
  const double pad = (y1 - y0) * 0.05;
  y0 -= pad, y1 += pad;
  auto px = [&](double x) { return area.x + static_cast<int>((x - x0) / (x1 - x0) * area.width); };
  auto py = [&](double y) { return area.y + area.height - static_cast<int>((ty(y) - y0) / (y1 - y0) * area.height); };

  // grid and ticks
  const double xs = nice_step(x1 - x0, 8), ys = nice_step(y1 - y0, 6);
  for (double v = std::ceil(x0 / xs) * xs; v <= x1 + 1e-9; v += xs) {
    cv::line(img, {px(v), area.y}, {px(v), area.y + area.height}, kGrey, 1);
    const std::string l = tick_label(v);
    text.draw(img, l, {px(v) - text.size(l, 14).width / 2, area.y + area.height + 20}, 14, kBlack);
  }
  for (double v = std::ceil(y0 / ys) * ys; v <= y1 + 1e-12; v += ys) {
    const int y = area.y + area.height - static_cast<int>((v - y0) / (y1 - y0) * area.height);
    cv::line(img, {area.x, y}, {area.x + area.width, y}, kGrey, 1);
    const std::string l = tick_label(o.log_y ? std::pow(10.0, v) : v);
    text.draw(img, l, {area.x - 8 - text.size(l, 14).width, y + 5}, 14, kBlack);
  }
  cv::rectangle(img, area, kBlack, 1);
  text.draw(img, o.x_label, {area.x + area.width / 2 - text.size(o.x_label, 16).width / 2, o.height - 15}, 16, kBlack);
  text.draw(img, o.y_label, {8, area.y - 10}, 16, kBlack);

  std::vector<std::vector<cv::Point>> points(series.size());
  for (size_t k = 0; k < series.size(); ++k) {
    const auto& s = series[k];
    const cv::Scalar color = kPalette[k % std::size(kPalette)];
    auto& pts = points[k];
    for (size_t i = 0; i < s.x.size(); ++i)
      if (std::isfinite(s.y[i]) && (!o.log_y || s.y[i] > 0)) pts.push_back({px(s.x[i]), py(s.y[i])});
    if (pts.size() == 1) cv::circle(img, pts[0], 4, color, cv::FILLED, cv::LINE_AA);
    if (pts.size() > 1) cv::polylines(img, pts, false, color, 2, cv::LINE_AA);
    if (pts.size() <= 40)
      for (const auto& p : pts) cv::circle(img, p, 3, color, cv::FILLED, cv::LINE_AA);
  }

  // Legend in the right-hand corner (top or bottom) that covers fewer data points.
  int legend_w = 0;
  for (const auto& s : series) legend_w = std::max(legend_w, text.size(s.name, 15).width);
  legend_w += 45;
  const int legend_h = 22 * static_cast<int>(series.size()) + 8;
  const int legend_x = area.x + area.width - legend_w;
  const cv::Rect top_box(legend_x, area.y, legend_w, legend_h);
  const cv::Rect bottom_box(legend_x, area.y + area.height - legend_h, legend_w, legend_h);
  auto covered = [&](const cv::Rect& box) {
    size_t n = 0;
    for (const auto& pts : points)
      for (const auto& p : pts) n += box.contains(p);
    return n;
  };
  const int legend_y = covered(bottom_box) < covered(top_box) ? bottom_box.y : top_box.y;
  for (size_t k = 0; k < series.size(); ++k) {
    const int ly = legend_y + 20 + 22 * static_cast<int>(k);
    cv::line(img, {legend_x + 5, ly - 5}, {legend_x + 30, ly - 5}, kPalette[k % std::size(kPalette)], 3);
    text.draw(img, series[k].name, {legend_x + 37, ly}, 15, kBlack);
  }
  write_png(path, img);
}

std::vector<std::string> write_confusion_matrix(const fs::path& path, const std::vector<std::vector<int64_t>>& cm,
                                                const std::vector<std::string>& classes, const std::string& title) {
  std::lock_guard<std::mutex> lock(g_text_mutex);
  const Text& text = Text::get();
  const int n = static_cast<int>(classes.size());
  bool all_render = true;
  for (const auto& c : classes) all_render = all_render && text.renders(c);
  std::vector<std::string> labels, legend;
  for (int i = 0; i < n; ++i) {
    std::string l = all_render ? classes[i] : std::to_string(i);
    if (all_render && display_width(l) > 24) l = l.substr(0, 22) + "..";
    labels.push_back(l);
    if (!all_render) legend.push_back(std::to_string(i) + ": " + classes[i]);
  }
  const int cell = std::clamp(640 / std::max(n, 1), 14, 60);
  const int font = std::clamp(cell / 3, 9, 16);
  int label_w = 0;
  for (const auto& l : labels) label_w = std::max(label_w, text.size(l, font).width);
  const int left = label_w + 60, top = label_w + 70;
  const int w = left + cell * n + 30, h = top + cell * n + 50 + (legend.empty() ? 0 : 20);
  cv::Mat img(h, std::max(w, legend.empty() ? 420 : 700), CV_8UC3, kWhite);
  text.draw(img, title, {10, 28}, 20, kBlack);
  text.draw(img, "true class (rows) x predicted (columns)", {10, 50}, 14, kBlack);
  for (int r = 0; r < n; ++r) {
    int64_t total = 0;
    for (int c = 0; c < n; ++c) total += cm[r][c];
    for (int c = 0; c < n; ++c) {
      const double f = total ? static_cast<double>(cm[r][c]) / total : 0.0;
      const cv::Scalar color(255 - 150 * f, 255 - 200 * f, 255 - 230 * f);
      const cv::Rect box(left + c * cell, top + r * cell, cell, cell);
      cv::rectangle(img, box, color, cv::FILLED);
      cv::rectangle(img, box, kGrey, 1);
      if (n <= 30) {
        const std::string v = std::to_string(cm[r][c]);
        const cv::Size sz = text.size(v, font);
        text.draw(img, v, {box.x + (cell - sz.width) / 2, box.y + (cell + sz.height) / 2}, font, f > 0.5 ? kWhite : kBlack);
      }
    }
    text.draw(img, labels[r], {left - 8 - text.size(labels[r], font).width, top + r * cell + (cell + font) / 2 - 2}, font, kBlack);
  }
  // Column labels, rotated: drawn horizontally on a strip, then turned 90 degrees.
  cv::Mat strip(cell * n, label_w + 10, CV_8UC3, kWhite);
  for (int c = 0; c < n; ++c) text.draw(strip, labels[c], {5, c * cell + (cell + font) / 2 - 2}, font, kBlack);
  cv::Mat rotated;
  cv::rotate(strip, rotated, cv::ROTATE_90_COUNTERCLOCKWISE);
  rotated.copyTo(img(cv::Rect(left, top - rotated.rows - 5, rotated.cols, rotated.rows)));
  if (!legend.empty())
    text.draw(img, "class names need a font this machine lacks: see confusion_matrix_legend.txt", {10, h - 15}, 13, kBlack);
  write_png(path, img);
  return legend;
}

}  // namespace loratune
