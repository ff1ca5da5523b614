#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <fstream>

#include "loratune/image.h"

namespace loratune {

std::optional<cv::Mat> decode_image(const std::filesystem::path& path, std::string& error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    error = "cannot open";
    return std::nullopt;
  }
  std::vector<uchar> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.empty()) {
    error = "empty file (0 bytes)";
    return std::nullopt;
  }
  cv::Mat bgr;
  try {
    // IMREAD_COLOR: 3 channels, 8 bits (greyscale expanded, alpha dropped, 16-bit scaled), EXIF orientation applied.
    bgr = cv::imdecode(bytes, cv::IMREAD_COLOR);
  } catch (const cv::Exception& e) {
    error = std::string("cannot decode: ") + e.what();
    return std::nullopt;
  }
  if (bgr.empty() || bgr.cols < 1 || bgr.rows < 1) {
    error = "cannot decode (damaged or unsupported image)";
    return std::nullopt;
  }
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return rgb;
}

}  // namespace loratune
