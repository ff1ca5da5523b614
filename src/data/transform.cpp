#include "loratune/transform.h"

#include <opencv2/imgproc.hpp>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "loratune/errors.h"

namespace loratune {

Preprocess Preprocess::from_bundle(const BundleInfo& info) {
  Preprocess p;
  p.image_size = info.image_size;
  p.resize_size = info.resize_size;
  p.mean = info.mean;
  p.std = info.std;
  if (info.interpolation == "bilinear") p.interpolation = cv::INTER_LINEAR;
  else if (info.interpolation == "bicubic") p.interpolation = cv::INTER_CUBIC;
  else if (info.interpolation == "nearest") p.interpolation = cv::INTER_NEAREST;
  else if (info.interpolation == "area") p.interpolation = cv::INTER_AREA;
  else throw InputError("unknown interpolation " + info.interpolation);
  return p;
}

namespace {

// Resizes to exactly (w, h). Large reductions are first area-averaged to twice the target, which avoids the
// aliasing of plain bilinear/bicubic sampling (PIL and torchvision antialias too).
cv::Mat resize_to(const cv::Mat& src, int w, int h, int interpolation) {
  cv::Mat in = src;
  if (src.cols > 2 * 2 * w && src.rows > 2 * 2 * h) cv::resize(src, in, cv::Size(2 * w, 2 * h), 0, 0, cv::INTER_AREA);
  cv::Mat out;
  cv::resize(in, out, cv::Size(w, h), 0, 0, interpolation);
  return out;
}

cv::Mat center_crop(const cv::Mat& img, int64_t size) {
  const int s = static_cast<int>(size);
  const int x = std::max(0, (img.cols - s) / 2), y = std::max(0, (img.rows - s) / 2);
  return img(cv::Rect(x, y, std::min(s, img.cols), std::min(s, img.rows)));
}

}  // namespace

cv::Mat resize_short_side(const cv::Mat& rgb, int64_t short_side, int interpolation) {
  const double scale = static_cast<double>(short_side) / std::min(rgb.cols, rgb.rows);
  const int w = std::max<int>(static_cast<int>(short_side), static_cast<int>(std::lround(rgb.cols * scale)));
  const int h = std::max<int>(static_cast<int>(short_side), static_cast<int>(std::lround(rgb.rows * scale)));
  if (w == rgb.cols && h == rgb.rows) return rgb;
  return resize_to(rgb, rgb.cols <= rgb.rows ? static_cast<int>(short_side) : w,
                   rgb.rows <= rgb.cols ? static_cast<int>(short_side) : h, interpolation);
}

cv::Mat eval_transform(const cv::Mat& rgb, const Preprocess& p) {
  return center_crop(resize_short_side(rgb, p.resize_size, p.interpolation), p.image_size);
}

cv::Mat train_transform(const cv::Mat& rgb, const Preprocess& p, const AugmentConfig& augment, Rng& rng) {
  if (!augment.enabled) return eval_transform(rgb, p);
  const int size = static_cast<int>(p.image_size);
  const double area = static_cast<double>(rgb.cols) * rgb.rows;
  cv::Rect crop;
  bool found = false;
  for (int attempt = 0; attempt < 10 && !found; ++attempt) {  // as torchvision's RandomResizedCrop
    const double target = area * rng.uniform(augment.scale_min, augment.scale_max);
    const double ratio = std::exp(rng.uniform(std::log(augment.ratio_min), std::log(augment.ratio_max)));
    const double wd = std::sqrt(target * ratio), hd = std::sqrt(target / ratio);
    if (!(wd < rgb.cols + 1.0 && hd < rgb.rows + 1.0)) continue;  // also NaN/inf from extreme ratios
    const int w = static_cast<int>(std::lround(wd)), h = static_cast<int>(std::lround(hd));
    if (w > 0 && h > 0 && w <= rgb.cols && h <= rgb.rows) {
      crop = cv::Rect(static_cast<int>(rng.below(rgb.cols - w + 1)), static_cast<int>(rng.below(rgb.rows - h + 1)), w, h);
      found = true;
    }
  }
  if (!found) {  // fall back to a center crop within the ratio bounds
    const double in_ratio = static_cast<double>(rgb.cols) / rgb.rows;
    double wd = rgb.cols, hd = rgb.rows;
    if (in_ratio < augment.ratio_min) hd = wd / augment.ratio_min;
    else if (in_ratio > augment.ratio_max) wd = hd * augment.ratio_max;
    const int w = static_cast<int>(std::lround(std::clamp(wd, 1.0, static_cast<double>(rgb.cols))));
    const int h = static_cast<int>(std::lround(std::clamp(hd, 1.0, static_cast<double>(rgb.rows))));
    crop = cv::Rect((rgb.cols - w) / 2, (rgb.rows - h) / 2, w, h);
  }
  cv::Mat out = resize_to(rgb(crop), size, size, p.interpolation);
  if (augment.hflip && rng.uniform() < 0.5) cv::flip(out, out, 1);
  return out;
}

void to_normalized_chw(const cv::Mat& rgb, const Preprocess& p, at::Tensor out) {
  const int n = static_cast<int>(p.image_size);
  if (rgb.cols != n || rgb.rows != n || rgb.type() != CV_8UC3)
    throw RuntimeFailure("internal: image is not " + std::to_string(n) + "x" + std::to_string(n) + " RGB after the transform");
  float* dst = out.data_ptr<float>();
  const size_t plane = static_cast<size_t>(n) * n;
  float scale[3], shift[3];
  for (int c = 0; c < 3; ++c) scale[c] = 1.0f / (255.0f * p.std[c]), shift[c] = -p.mean[c] / p.std[c];
  for (int y = 0; y < n; ++y) {
    const uchar* row = rgb.ptr<uchar>(y);
    for (int x = 0; x < n; ++x)
      for (int c = 0; c < 3; ++c) dst[c * plane + static_cast<size_t>(y) * n + x] = row[3 * x + c] * scale[c] + shift[c];
  }
}

}  // namespace loratune
