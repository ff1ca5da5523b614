#include "report/html.h"

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <vector>

#include "common/strings.h"
#include "loratune/image.h"

namespace loratune::html {

std::string base64(const std::string& bytes) {
  static const char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  for (size_t i = 0; i < bytes.size(); i += 3) {
    const size_t n = std::min<size_t>(3, bytes.size() - i);
    uint32_t v = 0;
    for (size_t k = 0; k < 3; ++k) v = v << 8 | (k < n ? static_cast<unsigned char>(bytes[i + k]) : 0u);
    for (size_t k = 0; k < 4; ++k) out += k <= n ? kAlphabet[(v >> (18 - 6 * k)) & 63] : '=';
  }
  return out;
}

std::optional<std::string> thumbnail(const std::filesystem::path& path, int max_side) {
  std::string error;
  const std::optional<cv::Mat> rgb = decode_image(path, error);
  if (!rgb || rgb->empty()) return std::nullopt;
  const double scale = std::min(1.0, static_cast<double>(max_side) / std::max(rgb->cols, rgb->rows));
  cv::Mat small, bgr;
  cv::resize(*rgb, small, cv::Size(std::max(1, static_cast<int>(rgb->cols * scale)),
                                   std::max(1, static_cast<int>(rgb->rows * scale))),
             0, 0, cv::INTER_AREA);
  cv::cvtColor(small, bgr, cv::COLOR_RGB2BGR);
  std::vector<uchar> jpeg;
  if (!cv::imencode(".jpg", bgr, jpeg, {cv::IMWRITE_JPEG_QUALITY, 80})) return std::nullopt;
  return "data:image/jpeg;base64," + base64(std::string(jpeg.begin(), jpeg.end()));
}

}  // namespace loratune::html
